"""Argument checks that argparse cannot make by itself, for every entry point: one error each, with the fix.

* :func:`check_args` — LossTransform's flags (``train.py`` and the launcher);
* :func:`check_loop_args` / :func:`resolve_model_dtype` — ``train.py``'s training loop and ``--model-dtype``;
* :func:`check_lr` — a learning rate the optimizer can apply to the weights (every training entry point);
  :func:`check_lr_base` — the same for the lr computed from ``--lr-base`` without ``--lr`` (train.py, the launcher);
* :func:`check_launch_args` — what ``python -m lt_timm.launch`` cannot run (reported through the script's parser);
* :func:`check_detection_args` / :func:`check_match_args` — ``train_detection.py``;
* :func:`check_resumed_flags` / :func:`resumed_changes` / :func:`resumed_folder` — ``--resume`` against the run it
  continues: the options that define the experiment (every option but :data:`RESUME_FREE` and
  :data:`RESUME_RECOVERY`) must be the run's, ``--resume FILE`` continues in FILE's run folder.
"""
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import UserError
from ..layout import EPOCH_MODES
from .flags import LAUNCH_LOSSES, LT_ARG_DEFAULTS

__all__ = ['check_args', 'check_loop_args', 'resolve_model_dtype', 'check_lr', 'check_launch_args',
           'check_detection_args', 'check_match_args', 'check_augment_args', 'anchor_size_entries', 'RESUME_FREE',
           'RESUME_RECOVERY', 'DETECTION_RESUME_FREE', 'DETECTION_RESUME_RECOVERY', 'check_resumed_flags',
           'resumed_changes', 'resumed_folder', 'lr_base_scale_rule', 'lr_from_base', 'check_lr_base']


def check_args(args: Any) -> None:
    """Reject flag values that would make a run silently wrong, with the fix in the message."""
    if not (math.isfinite(args.lt_rho) and args.lt_rho >= 0):
        raise ValueError(f'--lt-rho must be a finite number >= 0 (e.g. 1.0), got {args.lt_rho}.')
    batch_size = getattr(args, 'batch_size', None)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f'-b/--batch-size must be >= 1, got {batch_size}.')
    epochs = getattr(args, 'epochs', None)
    if epochs is not None and epochs < 1:
        raise ValueError(f'--epochs must be >= 1, got {epochs}.')
    aug_repeats = getattr(args, 'aug_repeats', 0) or 0
    if float(aug_repeats) != int(aug_repeats) or aug_repeats < 0:
        raise ValueError(f'--aug-repeats must be a whole number >= 0, got {aug_repeats}.')
    if getattr(args, 'loss', 'ce') == 'losstransform' and aug_repeats < 2:
        raise ValueError(
            f'--loss losstransform needs --aug-repeats >= 2 (replicas of each image to compare), got {aug_repeats}; '
            f'add e.g. --aug-repeats 3.')
    original = getattr(args, 'lt_epoch', 'v1') == 'original'  # -b counts images there, each m rows
    if aug_repeats and batch_size is not None and aug_repeats > batch_size and not original:
        raise ValueError(
            f'--aug-repeats {int(aug_repeats)} is larger than the batch size {batch_size}; all replicas of an image '
            f'must fit in one batch: raise -b or lower --aug-repeats.')
    _check_mixup_batch(args, batch_size, int(aug_repeats) if original else 1)


def _check_mixup_batch(args: Any, batch_size: Optional[int], rows_per_image: int) -> None:
    """timm's Mixup / FastCollateMixup pair row i with row B-1-i and assert an even batch: refuse an odd one before
    anything is built (timm stops with an AssertionError at the first step, after making the run folder)."""
    mixing = (getattr(args, 'mixup', 0) or 0) > 0 or (getattr(args, 'cutmix', 0) or 0) > 0 \
        or getattr(args, 'cutmix_minmax', None) is not None
    rows = (batch_size or 0) * max(rows_per_image, 1)
    if mixing and rows % 2:
        per = f' (-b {batch_size} images x --aug-repeats {rows_per_image})' if rows_per_image > 1 else ''
        raise ValueError(f'--mixup/--cutmix need an even number of rows per step (timm mixes row i with row B-1-i), '
                         f'got {rows}{per}; pass an even -b/--batch-size.')


def check_loop_args(args: Any) -> None:
    """The training-loop options that argparse cannot check by itself (one clear error each)."""
    if args.grad_accum_steps < 1:
        raise UserError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}.')
    if args.val_interval < 1:
        raise UserError(f'--val-interval must be >= 1, got {args.val_interval}.')
    if args.dist_bn not in ('reduce', 'broadcast', ''):
        raise UserError(f'--dist-bn must be "reduce", "broadcast" or "" (off), got {args.dist_bn!r}.')
    if args.aug_splits == 1 or args.aug_splits < 0:
        raise UserError(f'--aug-splits must be 0 or >= 2, got {args.aug_splits}.')


def resolve_model_dtype(model_dtype: Optional[str], amp: bool) -> Optional[torch.dtype]:
    """``--model-dtype`` as timm checks it: float32/float16/bfloat16, and not together with ``--amp``."""
    if not model_dtype:
        return None
    if model_dtype not in ('float32', 'float16', 'bfloat16'):
        raise UserError(f'--model-dtype must be float32, float16 or bfloat16, got {model_dtype!r}.')
    dtype = getattr(torch, model_dtype)
    if amp and dtype != torch.float32:
        raise UserError(f'--model-dtype {model_dtype} cannot be combined with --amp (AMP needs float32 weights); '
                        f'use one of them.')
    return dtype


def check_lr(lr: Optional[float], flag: str = '--lr', dtype: Optional[torch.dtype] = None) -> None:
    """A learning rate the optimizer can apply: finite, >= 0, and a number of the weights' ``dtype`` (float32 unless
    given). torch's optimizers convert it to that type at the first step and stop with a traceback ('value cannot
    be converted to type float without overflow') when it is larger; ``None``: not set, nothing to check."""
    if lr is None:
        return
    if not (math.isfinite(lr) and lr >= 0):
        raise UserError(f'{flag} must be a finite number >= 0, got {lr}; pass e.g. {flag} 0.1.')
    dtype = dtype or torch.float32
    top = torch.finfo(dtype).max
    if lr > top:
        name = str(dtype).replace('torch.', '')
        raise UserError(f'{flag} {lr:g} is larger than the largest {name} number ({top:.4g}), so the optimizer cannot '
                        f'apply it to the {name} weights; pass a smaller {flag} (e.g. 0.1).')


def lr_from_base(args: Any, world_size: int) -> Tuple[float, int, str]:
    """timm's rule for a run without ``--lr``: ``--lr-base`` times global batch / ``--lr-base-size`` (the square root
    of that ratio for the ``sqrt`` scale, :func:`lr_base_scale_rule`); returns ``(lr, global batch, scale)``."""
    batch = args.batch_size * world_size * max(1, getattr(args, 'grad_accum_steps', 1) or 1)
    scale = lr_base_scale_rule(getattr(args, 'lr_base_scale', ''), getattr(args, 'opt', ''))
    ratio = batch / getattr(args, 'lr_base_size', 256)
    return args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio), batch, scale


def check_lr_base(args: Any, dtype: Optional[torch.dtype] = None, world_size: Optional[int] = None) -> None:
    """A run without ``--lr`` computes it from ``--lr-base`` (:func:`lr_from_base`; ``world_size`` None: from
    ``WORLD_SIZE``): that lr must pass :func:`check_lr` too, said as ``--lr-base``'s; a script without ``--lr-base``:
    nothing to check."""
    lr_base = getattr(args, 'lr_base', None)
    if getattr(args, 'lr', None) is not None or lr_base is None:
        return
    if not (math.isfinite(lr_base) and lr_base >= 0):
        raise UserError(f'--lr-base must be a finite number >= 0, got {lr_base}; pass e.g. --lr-base 0.1.')
    lr_base_size = getattr(args, 'lr_base_size', 256)
    if not lr_base_size or lr_base_size < 1:
        raise UserError(f'--lr-base-size must be >= 1 (the batch size --lr-base is given for), got {lr_base_size}; '
                        f'pass e.g. --lr-base-size 256.')
    lr, batch, scale = lr_from_base(args, world_size or int(os.environ.get('WORLD_SIZE', '1')))
    try:
        check_lr(lr, '--lr', dtype)
    except UserError:
        raise UserError(f'--lr-base {lr_base:g} gives the learning rate {lr:g} for a global batch of {batch} '
                        f'({scale} scaling), more than the weights\' dtype can hold; pass a smaller --lr-base or '
                        f'--lr (e.g. --lr 0.1).') from None


def _weights_dtype(args: Any) -> Optional[torch.dtype]:
    """The weights' dtype of a timm script's run: its ``--model-dtype`` (float32 when not given or not one)."""
    name = getattr(args, 'model_dtype', None)
    return getattr(torch, name) if name in ('float16', 'bfloat16') else None


_LAUNCH_REFUSED_WITH_REPEATS = (('train_img_sizes', '--train-img-sizes'), ('train_batch_sizes', '--train-batch-sizes'),
                                ('train_batches_per_epoch', '--train-batches-per-epoch'))


def check_launch_args(args: Any, error: Callable[[str], None]) -> None:
    """The launcher's flags (YAML defaults bypass argparse's choices) and the script options it cannot run with;
    ``error`` is the script parser's ``error`` (exit 2 with its usage)."""
    if args.loss not in LAUNCH_LOSSES:
        error(f'--loss {args.loss!r} is not supported by lt_timm.launch; choose one of {", ".join(LAUNCH_LOSSES)} '
              f'(use the script\'s own --bce-loss/--jsd-loss/--smoothing flags for the base loss).')
    if args.lt_epoch not in EPOCH_MODES:
        error(f'--lt-epoch must be one of {", ".join(EPOCH_MODES)}, got {args.lt_epoch!r}.')
    try:
        check_args(args)
        for flag in ('--lr', '--warmup-lr', '--min-lr'):  # --lr None: the script computes it (from --lr-base)
            check_lr(getattr(args, flag[2:].replace('-', '_'), None), flag, _weights_dtype(args))
        check_lr_base(args, _weights_dtype(args))
    except (ValueError, UserError) as e:
        error(str(e))
    repeats = int(getattr(args, 'aug_repeats', 0) or 0)
    if repeats and getattr(args, 'naflex_loader', False):
        error('--aug-repeats with --naflex-loader is not supported by lt_timm.launch (the NaFlex loader has '
              'its own sampler); drop --naflex-loader.')
    if repeats and (getattr(args, 'aug_splits', 0) or 0) > 0:
        error('--aug-splits (AugMix/JSD splits) cannot be combined with --aug-repeats; use one of them.')
    if repeats and getattr(args, 'use_multi_epochs_loader', False):
        error('--use-multi-epochs-loader is not supported with --aug-repeats (it caches the batch order).')
    if args.loss == 'losstransform' and getattr(args, 'jsd_loss', False):
        error('--jsd-loss cannot be combined with --loss losstransform (JSD is its own consistency loss).')
    for dest, flag in _LAUNCH_REFUSED_WITH_REPEATS:
        if repeats and getattr(args, dest, None) is not None:
            error(f'{flag} is not supported with --aug-repeats under lt_timm.launch (the grouped sampler '
                  f'fixes the batch size and the epoch length).')


def check_detection_args(args: Any, error: Callable[[str], None]) -> None:
    """``train_detection.py``'s data and batch flags; ``error`` is its parser's ``error`` (exit 2 with its usage)."""
    if not args.data_dir:
        error('no dataset given: pass --data-dir DIR')
    if args.aug_repeats < 1:
        error('--aug-repeats must be >= 1')
    if args.batch_size < 1:
        error(f'-b/--batch-size must be >= 1, got {args.batch_size}')
    if args.lt_epoch != 'original' and args.batch_size < args.aug_repeats:  # original: -b images, m rows each
        error(f'-b/--batch-size ({args.batch_size}) must be >= --aug-repeats ({args.aug_repeats})')


def check_match_args(model: str, match: str, match_iou: float, area_ratio: float = 0.8) -> None:
    """``--lt-match`` / ``--lt-match-iou`` / ``--lt-area-ratio`` against ``--model``: one-line UserErrors naming the
    fix."""
    if model == 'retinanet' and match == 'gt':
        raise UserError('--model retinanet has no RoI heads to evaluate the ground-truth instances of --lt-match gt '
                        '(the default); pass --lt-match predicted (instances matched from the model\'s detections).')
    if not 0.0 < match_iou <= 1.0:
        raise UserError(f'--lt-match-iou {match_iou} is not an IoU threshold; pass a value in (0, 1], e.g. 0.5.')
    if not 0.0 < area_ratio <= 1.0:
        raise UserError(f'--lt-area-ratio {area_ratio} is not an area ratio (min / max of two replicas\' areas); '
                        f'pass a value in (0, 1], e.g. 0.8.')


def check_augment_args(args: Any) -> None:
    """``train_detection.py``'s augmentation flags together: a crop replaces scale + translation; copy-paste needs a
    probability and a scale range, and instance masks (Mask R-CNN on COCO; not VOC's box annotations)."""
    if args.crop_scale is not None:
        lo, hi = args.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise UserError(f'--crop-scale {lo} {hi}: the window\'s sides are fractions of the image\'s; pass '
                            f'0 < MIN <= MAX <= 1, e.g. --crop-scale 0.5 1.')
        if list(args.scale) != [1.0, 1.0] or args.translate:
            raise UserError('--crop-scale is a random crop instead of scale + translation; add --scale 1 1 '
                            '--translate 0 (or drop --crop-scale).')
    if not 0.0 <= args.copy_paste <= 1.0:
        raise UserError(f'--copy-paste {args.copy_paste} is a probability; pass a value in [0, 1] (0 = off).')
    lo, hi = args.copy_paste_scale
    if not 0.0 < lo <= hi:
        raise UserError(f'--copy-paste-scale {lo} {hi}: pass 0 < MIN <= MAX, e.g. 0.5 1.5.')
    no_masks = (args.dataset == 'coco' and args.model != 'maskrcnn') or \
        (args.dataset == 'voc' and args.voc_instances == 'annotations')
    if args.copy_paste > 0 and no_masks:
        raise UserError('--copy-paste pastes instance masks, which this dataset is not loaded with (COCO loads them '
                        'for --model maskrcnn; VOC --voc-instances annotations has none); drop --copy-paste.')


def anchor_size_entries(values: Any, error: Callable[[str], None]) -> Optional[list]:
    """``--anchor-sizes`` (or its YAML list) as one entry per FPN level: an int (one size) or a tuple of ints."""
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or not values:
        error(f'anchor_sizes must be a list with one entry per FPN level, got {values!r}')
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, list, tuple)) or \
                (isinstance(v, (list, tuple)) and not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            error(f'anchor_sizes entries are sizes or lists of sizes (integers), got {v!r}')
        out.append(v if isinstance(v, int) else tuple(v))
    return out


# ---------------------------------------------------------------- --resume against the run it continues

# Options that cannot change what a resumed run computes (paths, performance, logging): they may differ on --resume.
RESUME_FREE = (
    # paths (the data's content is compared instead: classes, class map, image counts)
    'config', 'data', 'data_dir', 'train_split', 'val_split', 'class_map', 'output', 'experiment', 'resume',
    'initial_checkpoint', 'pretrained_path', 'dataset_download', 'dataset_trust_remote_code',
    # where and how fast it runs
    'device', 'device_modules', 'dist_backend', 'dist_url', 'local_rank', 'workers', 'pin_mem', 'channels_last',
    'torchcompile', 'torchcompile_mode', 'grad_checkpointing', 'fast_norm', 'synchronize_step',
    'validation_batch_size',
    # what it logs and keeps
    'log_interval', 'recovery_interval', 'checkpoint_hist', 'save_images', 'log_wandb', 'wandb_project', 'wandb_tags',
    'wandb_resume_id', 'no_plot', 'check_loss_every_step', 'check_images',
)
# Options a resumed run may change on purpose (the divergence error names --lr and --clip-grad): applied from the
# resumed epoch on, logged, and recorded in the run folder (args-resume-<epoch>.yaml).
RESUME_RECOVERY = ('lr', 'clip_grad', 'clip_mode', 'no_resume_opt', 'start_epoch')


# train_detection.py: the same kinds of options (its --epochs only says where to stop: the step schedule, --lr-steps,
# does not depend on it).
DETECTION_RESUME_FREE = ('config', 'data', 'data_dir', 'train_split', 'val_split', 'detector_checkpoint', 'output',
                         'experiment', 'resume', 'epochs', 'workers', 'log_interval', 'threads', 'device', 'no_plot',
                         'eval_only')
DETECTION_RESUME_RECOVERY = ('lr', 'clip_grad')


def lr_base_scale_rule(scale: str, opt: str) -> str:
    """timm's ``--lr-base-scale`` as it applies: given, else ``sqrt`` for ada*/lamb optimizers, else ``linear``."""
    return scale or ('sqrt' if any(o in (opt or '').lower() for o in ('ada', 'lamb')) else 'linear')


def _same(a: Any, b: Any) -> bool:
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    return norm(a) == norm(b)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ' '.join(map(str, value)) or '[]'
    return str(value)


def _resumed_value(saved: Any, dest: str, missing: Any) -> Any:
    """The run's value of ``dest``: its checkpoint's args, else lt-timm's default for LossTransform's options (a
    checkpoint of stock timm), else ``missing``."""
    if hasattr(saved, dest):
        return getattr(saved, dest)
    return LT_ARG_DEFAULTS.get(dest, missing)


def _differences(args: Any, saved: Any, flags: Dict[str, str], skip: Tuple[str, ...]) -> List[str]:
    missing = object()
    out = []
    for dest, flag in flags.items():
        if dest in skip:
            continue
        old, new = _resumed_value(saved, dest, missing), getattr(args, dest, missing)
        if old is missing or new is missing or (dest == 'num_classes' and new is None):
            continue  # the run's num_classes is its dataset's when not given (the data is compared instead)
        if dest == 'lr_base_scale':  # '' = timm's rule for the optimizer (which is compared itself)
            run_opt = getattr(saved, 'opt', '')
            old, new = lr_base_scale_rule(old, run_opt), lr_base_scale_rule(new, run_opt)
        if not _same(old, new):
            out.append(f'{flag} {_show(new)} (the run: {_show(old)})')
    old_ws, new_ws = getattr(saved, 'world_size', None), getattr(args, 'world_size', None)
    if old_ws is not None and new_ws is not None and old_ws != new_ws:
        out.append(f'{new_ws} processes (the run: {old_ws}; torchrun --nproc_per_node)')
    return out


def check_resumed_flags(args: Any, saved: Any, flags: Dict[str, str], free: Tuple[str, ...] = RESUME_FREE,
                        recovery: Tuple[str, ...] = RESUME_RECOVERY, new_run: str = '') -> None:
    """``--resume``: every option that defines the experiment (``flags``: dest -> flag, minus ``free`` and
    ``recovery``: :data:`RESUME_FREE` and :data:`RESUME_RECOVERY` for ``train.py``) and the number of processes must
    be the run's (``saved``: its checkpoint's args); one error names each difference, the run's value and the way
    forward (``new_run``: how to start a new run instead; default: from these weights, ``--initial-checkpoint``)."""
    diffs = _differences(args, saved, flags, tuple(free) + tuple(recovery))
    if diffs:
        new_run = new_run or f'start a new run from these weights with --initial-checkpoint {args.resume}'
        raise UserError(f'--resume {args.resume} continues a run, but this command changes what defines it: '
                        f'{"; ".join(diffs)}. Drop these flags (or use the run\'s values, see its args.yaml), or '
                        f'{new_run}.')


def resumed_changes(args: Any, saved: Any, flags: Dict[str, str],
                    recovery: Tuple[str, ...] = RESUME_RECOVERY) -> Tuple[str, ...]:
    """The ``recovery`` options this resume changes, as ``'--flag new (the run: old)'``."""
    missing = object()
    out = []
    for dest in recovery:
        old, new = _resumed_value(saved, dest, None), getattr(args, dest, missing)
        if new is not missing and not _same(old, new) and dest in flags:
            out.append(f'{flags[dest]} {_show(new)} (the run: {_show(old)})')
    return tuple(out)


def resumed_folder(resume: str, output: str, experiment: str, default_output: str, new_run: str = '') -> str:
    """The run folder ``--resume FILE`` continues in: FILE's folder when it is a run folder (it holds
    ``args.yaml``), else '' (a new folder, as timm). ``--output`` / ``--experiment`` naming another folder is
    refused (``new_run``: how to start a new run there instead)."""
    folder = os.path.dirname(os.path.abspath(resume))
    if not os.path.isfile(os.path.join(folder, 'args.yaml')):
        return ''
    if experiment:
        target = os.path.abspath(os.path.join(output or default_output, experiment))
    else:
        target = folder if not output else os.path.join(os.path.abspath(output), os.path.basename(folder))
    if target != folder:
        new_run = new_run or f'start a new run there from these weights with --initial-checkpoint {resume}'
        raise UserError(f'--resume {resume} continues its run in {folder}, but --output/--experiment name {target}; '
                        f'drop them, or {new_run}.')
    return folder
