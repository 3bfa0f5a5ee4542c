"""Argument checks that argparse cannot make by itself, for every entry point: one error each, with the fix.

* :func:`check_args` — LossTransform's flags (``train.py`` and the launcher);
* :func:`check_loop_args` / :func:`resolve_model_dtype` — ``train.py``'s training loop and ``--model-dtype``;
* :func:`check_launch_args` — what ``python -m lt_timm.launch`` cannot run (reported through the script's parser);
* :func:`check_detection_args` / :func:`check_match_args` — ``train_detection.py``.
"""
import math
from typing import Any, Callable, Optional

import torch

from ..errors import UserError
from ..layout import EPOCH_MODES
from .flags import LAUNCH_LOSSES

__all__ = ['check_args', 'check_loop_args', 'resolve_model_dtype', 'check_launch_args', 'check_detection_args',
           'check_match_args']


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
    except ValueError as e:
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
    if args.batch_size < args.aug_repeats:
        error(f'-b/--batch-size ({args.batch_size}) must be >= --aug-repeats ({args.aug_repeats})')


def check_match_args(model: str, match: str, match_iou: float) -> None:
    """``--lt-match`` / ``--lt-match-iou`` against ``--model``: problems are one-line UserErrors naming the fix."""
    if model == 'retinanet' and match == 'gt':
        raise UserError('--model retinanet has no RoI heads to evaluate the ground-truth instances of --lt-match gt '
                        '(the default); pass --lt-match predicted (instances matched from the model\'s detections).')
    if not 0.0 < match_iou <= 1.0:
        raise UserError(f'--lt-match-iou {match_iou} is not an IoU threshold; pass a value in (0, 1], e.g. 0.5.')
