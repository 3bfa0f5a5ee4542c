"""What ``train.py`` needs beyond timm: timm's flags, the epoch loop with loss parts, and the run setup.

Built from timm's pieces — ``create_model``, ``create_dataset``, ``lt_timm.create_loader``, ``Mixup`` /
``FastCollateMixup``, ``create_optimizer_v2``, ``create_scheduler_v2``, ``timm.task.ClassificationTask``
(with its ``ModelEmaV3``), ``CheckpointSaver`` (atomic ``tmp`` -> ``last`` writes), ``update_summary`` —
so flags, YAML recipes (``-c``, keys are the flags' dest names) and checkpoints carry over from timm.
"""
import argparse
import importlib
import logging
import math
import os
import time
from collections import OrderedDict
from contextlib import suppress
from datetime import datetime
from functools import partial
from typing import List, Optional

import torch
import torch.nn as nn

import timm
import timm.data
from timm import utils
from timm.data import AugMixDataset, FastCollateMixup, Mixup, resolve_data_config
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler

from .cli.checks import check_args
from .data import check_images, class_to_idx_of, load_folder_dataset, write_class_map
from .errors import UserError
from .loader import create_loader
from .loss import LossTransform
from .modeling import all_finite, checkpoint_problem, create_model, read_checkpoint_args
from .plots import plot_training_curves
from .registry import create_loss, describe_criterion
from .run_dir import claim_run_dir, resume_hint, truncate_summary, update_summary

__all__ = ['train', 'train_one_epoch', 'validate']

_logger = logging.getLogger('train')


def _resolve_lr(args: argparse.Namespace) -> None:
    """timm's rule: without --lr, scale --lr-base by the global batch size."""
    if args.lr is not None:
        return
    global_batch_size = args.batch_size * args.world_size * max(1, getattr(args, 'grad_accum_steps', 1))
    batch_ratio = global_batch_size / args.lr_base_size
    if not args.lr_base_scale:
        on = args.opt.lower()
        args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        batch_ratio = batch_ratio ** 0.5
    args.lr = args.lr_base * batch_ratio
    if utils.is_primary(args):
        _logger.info(f'Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) '
                     f'and effective global batch size ({global_batch_size}) with {args.lr_base_scale} scaling.')


def _setup_device(args: argparse.Namespace) -> torch.device:
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        _logger.warning('CUDA is not available: training on the CPU (pass --device cpu to silence this).')
        args.device = 'cpu'
    return utils.init_distributed_device(args)


def _data_root(args: argparse.Namespace) -> str:
    root = args.data_dir or args.data
    if not root:
        raise UserError('no dataset given: pass the dataset folder with --data-dir DIR (or as the first argument).')
    if not args.dataset and not os.path.exists(root):
        raise UserError(f'dataset folder {root} does not exist; pass an ImageFolder root that holds '
                        f'{args.train_split}/ and a validation split.')
    return root


def _resolve_num_classes(args: argparse.Namespace, dataset_train) -> None:
    n_data = len(class_to_idx_of(dataset_train))
    if args.num_classes is None:
        if not n_data:
            raise UserError('cannot infer the number of classes from this dataset; pass --num-classes.')
        args.num_classes = n_data
    elif n_data and n_data > args.num_classes:
        raise UserError(f'the training set has {n_data} classes but --num-classes is {args.num_classes}; '
                        f'set --num-classes {n_data}.')


_ITERABLE = ('tfds/', 'wds/', 'hfids/')
_KEYED = ('hfds/', 'hfids/', 'tfds/', 'wds/')
_HF = ('hfds/', 'hfids/')
# (flag, dest, create_dataset kwarg, dataset prefixes it applies to, split: 'train' / 'eval' / 'both')
TRAIN_DATASET_OPTIONS = (
    ('--train-num-samples', 'train_num_samples', 'num_samples', _ITERABLE, 'train'),
    ('--val-num-samples', 'val_num_samples', 'num_samples', _ITERABLE, 'eval'),
    ('--epoch-repeats', 'epoch_repeats', 'repeats', _ITERABLE, 'train'),
    ('--input-key', 'input_key', 'input_key', _KEYED, 'both'),
    ('--target-key', 'target_key', 'target_key', _KEYED, 'both'),
    ('--dataset-trust-remote-code', 'dataset_trust_remote_code', 'trust_remote_code', _HF, 'both'),
)


def dataset_options(args: argparse.Namespace, table, is_training: bool) -> dict:
    """timm's extra ``create_dataset`` kwargs set on the command line; refused by name where timm would ignore them."""
    name = (args.dataset or '').lower()
    out = {}
    for flag, dest, kwarg, prefixes, split in table:
        value = getattr(args, dest, None)
        if value in (None, False, 0, 0.):
            continue
        if not name.startswith(prefixes):
            raise UserError(f'{flag} applies to {"/".join(p.rstrip("/") for p in prefixes)} datasets only (timm ignores '
                            f'it for --dataset {args.dataset or "ImageFolder"!r}); drop it.')
        if split == 'both' or (split == 'train') == is_training:
            out[kwarg] = value
    return out


def open_dataset(args: argparse.Namespace, root: str, split: str, is_training: bool, extra: dict, class_map=None,
                 **opts):
    """lt-timm's checked dataset (:func:`load_folder_dataset`), or timm's ``create_dataset`` as is when timm's
    iterable/HF dataset options (``extra``) are given."""
    if not extra:
        return load_folder_dataset(args.dataset, root, split, is_training, class_map=class_map, **opts)
    try:
        return timm.data.create_dataset(args.dataset, root=root, split=split, is_training=is_training,
                                        class_map=class_map or '', **opts, **extra)
    except (AssertionError, FileNotFoundError, RuntimeError, ImportError) as e:
        raise UserError(f'cannot open split {split!r} of dataset {args.dataset} at {root}: {e}.') from e


def resolve_model_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """``--model-dtype`` as timm checks it: float32/float16/bfloat16, and not together with ``--amp``."""
    if not getattr(args, 'model_dtype', None):
        return None
    if args.model_dtype not in ('float32', 'float16', 'bfloat16'):
        raise UserError(f'--model-dtype must be float32, float16 or bfloat16, got {args.model_dtype!r}.')
    dtype = getattr(torch, args.model_dtype)
    if args.amp and dtype != torch.float32:
        raise UserError(f'--model-dtype {args.model_dtype} cannot be combined with --amp (AMP needs float32 weights); '
                        f'use one of them.')
    return dtype


def create_model_from_args(args: argparse.Namespace, num_classes: int, in_chans: int, training: bool = True,
                           initial_checkpoint: str = '') -> nn.Module:
    """:func:`lt_timm.modeling.create_model` with timm's train.py / validate.py model flags (``--model-kwargs``,
    BatchNorm and drop overrides, ``--pretrained-path`` head adaptation), then an optional checkpoint."""
    kwargs = dict(global_pool=args.gp)
    if training:
        kwargs.update(drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
                      bn_momentum=args.bn_momentum, bn_eps=args.bn_eps)
    model_kwargs = dict(getattr(args, 'model_kwargs', None) or {})
    clash = sorted(set(model_kwargs) & (set(kwargs) | {'pretrained', 'in_chans', 'num_classes'}))
    if clash:
        raise UserError(f'--model-kwargs sets {clash}, which have their own flags; use those flags instead.')
    return create_model(args.model, num_classes, in_chans, pretrained=args.pretrained,
                        pretrained_path=getattr(args, 'pretrained_path', None), initial_checkpoint=initial_checkpoint,
                        **kwargs, **model_kwargs)


def _diverged(loss_value: float, epoch: int, steps: str, output_dir: Optional[str], applied: bool) -> UserError:
    what = 'nothing of this epoch was saved' if applied else 'this step was not applied'
    return UserError(f'loss is {loss_value} at epoch {epoch} {steps}: training diverged and {what}; '
                     f'lower --lr, add --clip-grad 1.0 or drop --amp, {resume_hint(output_dir, epoch)}.')


def _loss_parts(criterion: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """(loss, base, consistency) of the last step as one detached device tensor; consistency NaN without T(L)."""
    base = getattr(criterion, 'last_base', None)  # also through a torch.compile'd LossTransform
    cons = getattr(criterion, 'last_consistency', None)
    if base is None or cons is None:
        base, cons = loss.detach(), torch.full_like(loss.detach(), float('nan'))
    return torch.stack([loss.detach().float(), base.float(), cons.float()])


def _log_train_step(epoch: int, update_idx: int, updates_per_epoch: int, host: List[float], world_size: int,
                    update_rows: int, update_time_m, data_time_m, optimizer) -> None:
    """timm's training log line (``Train: epoch [update/updates (pct%)]  Loss: now (mean)  Time ...  LR ...  Data
    ...``) plus the loss parts (``Base:``, ``Consistency:``, now and epoch mean). ``host`` = summed loss, base and
    consistency (times rows), rows, then the last step's loss, base and consistency, summed over ``world_size``."""
    rows = max(host[3], 1.0)
    now = [v / world_size for v in host[4:7]]
    mean = [v / rows for v in host[0:3]]
    lrl = [pg['lr'] for pg in optimizer.param_groups]
    _logger.info(
        f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
        f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
        f'Loss: {now[0]:#.3g} ({mean[0]:#.3g})  '
        f'Time: {update_time_m.val:.3f}s, {update_rows / max(update_time_m.val, 1e-9):>7.2f}/s  '
        f'({update_time_m.avg:.3f}s, {update_rows / max(update_time_m.avg, 1e-9):>7.2f}/s)  '
        f'LR: {sum(lrl) / len(lrl):.3e}  '
        f'Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})'
        + ('' if math.isnan(now[2]) else
           f'  Base: {now[1]:#.3g} ({mean[1]:#.3g})  Consistency: {now[2]:#.3g} ({mean[2]:#.3g})'))


def train_one_epoch(
        epoch: int,
        task: ClassificationTask,
        loader,
        optimizer: torch.optim.Optimizer,
        args: argparse.Namespace,
        device: torch.device,
        lr_scheduler=None,
        amp_autocast=suppress,
        loss_scaler=None,
        mixup_fn=None,
        output_dir: Optional[str] = None,
        saver=None,
        model_dtype: Optional[torch.dtype] = None,
) -> 'OrderedDict[str, float]':
    """One epoch of ``task`` over ``loader``; returns the epoch's mean loss, its parts, time and throughput.

    No host synchronisation per step: the loss and its parts are summed on the device and read at each log
    interval (and the epoch's end), where a non-finite sum stops the run. ``--check-loss-every-step`` checks every
    step's loss before it is applied instead (one sync per step).

    ``--grad-accum-steps N`` as timm: each micro-batch (a whole grouped batch, all replicas of its images) adds
    loss / N to the gradients, the optimizer steps every N micro-batches (and at the epoch's end), DDP syncs only on
    the stepping micro-batch, and the scheduler, EMA, log interval and recovery interval count optimizer steps.
    """
    _stop_mixup_after_off_epoch(epoch, args.mixup_off_epoch, loader, mixup_fn, args.prefetcher)
    model = task.get_trainable_module()
    model.train()
    criterion = task.criterion
    has_no_sync = args.distributed and hasattr(model, 'no_sync')
    second_order = getattr(optimizer, 'is_second_order', False)
    sums = torch.zeros(3, dtype=torch.float32 if device.type == 'mps' else torch.float64, device=device)
    samples = 0
    num_batches = len(loader)
    accum_steps = max(1, getattr(args, 'grad_accum_steps', 1))
    last_accum_steps = num_batches % accum_steps
    last_batch_idx_to_accum = num_batches - last_accum_steps
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    start = time.time()
    logged_step = 0
    update_time_m, data_time_m = utils.AverageMeter(), utils.AverageMeter()
    update_samples = 0
    update_start = data_start = time.time()
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        data_time_m.update(time.time() - data_start)
        last_batch = batch_idx + 1 == num_batches
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps  # the epoch's last, shorter accumulation
        if not args.prefetcher:
            input, target = input.to(device=device, dtype=model_dtype), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        with task.no_sync() if has_no_sync and not need_update else suppress():
            with amp_autocast():
                loss = task(input, target)['loss']
            if args.check_loss_every_step and not torch.isfinite(loss):
                raise _diverged(loss.item(), epoch, f'step {batch_idx}', output_dir, applied=False)
            _backward_and_step(task, loss / accum_steps if accum_steps > 1 else loss, optimizer, loss_scaler,
                               args.clip_grad, args.clip_mode, need_update, second_order)

        n = input.shape[0]
        parts = _loss_parts(criterion, loss)
        sums += parts.to(sums.dtype) * n
        samples += n
        update_samples += n
        if not need_update:
            data_start = time.time()
            continue
        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if args.synchronize_step and device.type == 'cuda':
            torch.cuda.synchronize()
        update_time_m.update(time.time() - update_start)
        update_start = time.time()

        if update_idx % args.log_interval == 0 or last_batch:
            host = _read_sums(torch.cat([sums, sums.new_tensor([samples]), parts.to(sums.dtype)]), args.distributed,
                              device)  # the one sync of a log interval
            if not math.isfinite(host[0]):
                raise _diverged(host[0], epoch, f'between steps {logged_step} and {batch_idx} (checked every '
                                f'--log-interval {args.log_interval} steps; --check-loss-every-step stops before the '
                                f'step)', output_dir, applied=True)
            logged_step = batch_idx + 1
            if utils.is_primary(args):
                _log_train_step(epoch, update_idx, updates_per_epoch, host, args.world_size,
                                update_samples * args.world_size, update_time_m, data_time_m, optimizer)
                if args.save_images and output_dir:
                    import torchvision.utils
                    torchvision.utils.save_image(input.float(), os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'),
                                                 padding=0, normalize=True)
        update_samples = 0
        if saver is not None and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
            saver.save_recovery(epoch, batch_idx=update_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        data_start = time.time()

    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    epoch_time = time.time() - start
    loss, base, consistency, count = _read_sums(torch.cat([sums, sums.new_tensor([samples])]), args.distributed, device)
    return OrderedDict([
        ('loss', loss / max(count, 1.0)),
        ('loss_base', base / max(count, 1.0)),
        ('loss_consistency', consistency / max(count, 1.0)),
        ('epoch_s', epoch_time),
        ('img_s', count / max(epoch_time, 1e-9)),
    ])


def _stop_mixup_after_off_epoch(epoch: int, mixup_off_epoch: int, loader, mixup_fn, prefetcher: bool) -> None:
    """timm's ``--mixup-off-epoch``: from that epoch on, Mixup/CutMix are off (in the prefetcher or ``mixup_fn``)."""
    if mixup_off_epoch and epoch >= mixup_off_epoch:
        if prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False


def _backward_and_step(task: ClassificationTask, step_loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                       loss_scaler, clip_grad: Optional[float], clip_mode: str, need_update: bool,
                       second_order: bool) -> None:
    """timm's step: backward of the micro-batch's share of the loss; on ``need_update``, clipping then the optimizer
    step (through the AMP loss scaler when there is one)."""
    clip_parameters = task.get_clip_parameters(exclude_head='agc' in clip_mode) if clip_grad is not None else None
    if loss_scaler is not None:
        loss_scaler(step_loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=clip_parameters,
                    create_graph=second_order, need_update=need_update)
        return
    step_loss.backward(create_graph=second_order)
    if need_update:
        if clip_grad is not None:
            utils.dispatch_clip_grad(clip_parameters, value=clip_grad, mode=clip_mode)
        optimizer.step()


def _read_sums(sums: torch.Tensor, distributed: bool, device: torch.device) -> List[float]:
    """Device-side sums on the host (one sync); summed over ranks under DDP, so every rank logs the same means."""
    if distributed:
        sums = sums.to(device=device, dtype=torch.float64 if device.type != 'mps' else torch.float32)
        torch.distributed.all_reduce(sums)
    return sums.cpu().double().tolist()


def _log_eval_batch(name: str, batch_idx: int, num_batches: Optional[int], batch_time_m, now: torch.Tensor,
                    sums: torch.Tensor) -> None:
    """timm's validation log line: ``Test: [batch/last]  Time: ...  Loss: ...  Acc@1: ...  Acc@5: ...`` (this batch,
    then the running mean)."""
    cur, avg = (now[:3] / max(now[3].item(), 1.0)).tolist(), (sums[:3] / max(sums[3].item(), 1.0)).tolist()
    _logger.info(
        f'{name}: [{batch_idx:>4d}/{num_batches - 1 if num_batches else "?"}]  '
        f'Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})  '
        f'Loss: {cur[0]:>7.3f} ({avg[0]:>6.4f})  '
        f'Acc@1: {cur[1]:>7.3f} ({avg[1]:>7.3f})  '
        f'Acc@5: {cur[2]:>7.3f} ({avg[2]:>7.3f})')


@torch.no_grad()
def validate(model: nn.Module, loader, args: argparse.Namespace, device: torch.device,
             amp_autocast=suppress, log_suffix: str = '', log_freq: int = 0,
             input_dtype: Optional[torch.dtype] = None) -> 'OrderedDict[str, float]':
    """Top-1/top-5 accuracy (%) and CE loss over ``loader`` (timm's validation semantics); ``log_freq``: log
    timm's per-batch line at batch 0, every ``log_freq`` batches and the last (train.py: ``--log-interval``,
    validate.py: ``--log-freq``)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    sums = torch.zeros(4, dtype=torch.float64)  # loss*n, top1*n, top5*n, n
    num_batches = len(loader) if hasattr(loader, '__len__') else None
    batch_time_m = utils.AverageMeter()
    end = time.time()
    for batch_idx, (input, target) in enumerate(loader):
        if not args.prefetcher:
            input, target = input.to(device=device, dtype=input_dtype), target.to(device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
        loss = loss_fn(output.float(), target)
        k = min(5, output.shape[-1])
        acc1, acc5 = utils.accuracy(output, target, topk=(1, k))
        n = input.shape[0]
        now = torch.tensor([loss.item() * n, acc1.item() * n, acc5.item() * n, n], dtype=torch.float64)
        sums += now
        batch_time_m.update(time.time() - end)
        end = time.time()
        last = num_batches is not None and batch_idx + 1 == num_batches
        if log_freq and (last or batch_idx % log_freq == 0) and utils.is_primary(args):
            _log_eval_batch(f'Test{log_suffix}', batch_idx, num_batches, batch_time_m, now, sums)
    loss, top1, top5, count = _read_sums(sums, args.distributed, device)
    n = max(count, 1.0)
    metrics = OrderedDict([('loss', loss / n), ('top1', top1 / n), ('top5', top5 / n)])
    if utils.is_primary(args):
        _logger.info(f' * Acc@1 {metrics["top1"]:.3f} ({100 - metrics["top1"]:.3f}) Acc@5 {metrics["top5"]:.3f} '
                     f'({100 - metrics["top5"]:.3f}){log_suffix}')  # timm validate.py's closing line
    return metrics


def _load_datasets(args: argparse.Namespace, in_chans: int):
    """Train and eval datasets with one class map (the training split's), images checked before the first step."""
    root = _data_root(args)
    opts = dict(input_img_mode=args.input_img_mode or ('RGB' if in_chans == 3 else 'L'), batch_size=args.batch_size,
                seed=args.seed, download=args.dataset_download)
    train_extra = dataset_options(args, TRAIN_DATASET_OPTIONS, True)
    eval_extra = dataset_options(args, TRAIN_DATASET_OPTIONS, False)
    dataset_train = open_dataset(args, root, args.train_split, True, train_extra, class_map=args.class_map, **opts)
    class_to_idx = class_to_idx_of(dataset_train)
    dataset_eval = open_dataset(args, root, args.val_split, False, eval_extra,
                                class_map=class_to_idx or args.class_map, **opts)
    if utils.is_primary(args):
        paths = [p for ds in (dataset_train, dataset_eval) for p, _ in getattr(getattr(ds, 'reader', None), 'samples', [])]
        start = time.time()
        check_images(paths, args.check_images, opts['input_img_mode'], workers=max(1, args.workers))
        if args.check_images != 'none' and paths:
            _logger.info(f'Checked {len(paths)} image files ({args.check_images}) in {time.time() - start:.1f}s.')
    return dataset_train, dataset_eval, class_to_idx


def _mixup(args: argparse.Namespace):
    """(mixup_active, collate_fn, mixup_fn) as timm's train.py builds them."""
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if not mixup_active:
        return False, None, None
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.num_classes)
    if args.prefetcher:
        return True, FastCollateMixup(**mixup_args), None
    return True, None, Mixup(**mixup_args)


def _create_loaders(args, dataset_train, dataset_eval, data_config, collate_fn, device, model_dtype=None):
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    common = dict(mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
                  distributed=args.distributed, pin_memory=args.pin_mem, device=device,
                  use_prefetcher=args.prefetcher, img_dtype=model_dtype or torch.float32)
    # Workers are re-created each epoch so that their seeds derive from (seed, epoch): --resume is exact.
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, pad_crop=args.train_crop_pad, cutout=args.cutout, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob, gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa,
        worker_seeding=args.worker_seeding, use_multi_epochs_loader=args.use_multi_epochs_loader,
        num_aug_repeats=args.aug_repeats, num_aug_splits=args.aug_splits, interpolation=train_interpolation,
        collate_fn=collate_fn, aug_repeat_mode=args.lt_epoch, seed=args.seed, decode_once=not args.no_decode_once,
        persistent_workers=False, **common)
    if len(loader_train) == 0:
        raise UserError(f'the training set has {len(dataset_train)} images, fewer than one batch of '
                        f'{args.batch_size} per process; lower -b/--batch-size or add data.')
    loader_eval = create_loader(
        dataset_eval, input_size=data_config['input_size'],
        batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
        persistent_workers=args.workers > 0, **common)  # timm <= 1.0.27 asks torch for persistence without workers
    return loader_train, loader_eval


def _criterion(args: argparse.Namespace, mixup_active: bool) -> nn.Module:
    criterion = create_loss(
        args.loss, smoothing=args.smoothing or 0., mixup_active=mixup_active, bce_loss=bool(args.bce_loss),
        bce_target_thresh=args.bce_target_thresh, bce_sum=bool(args.bce_sum), bce_pos_weight=args.bce_pos_weight,
        jsd_splits=args.aug_splits or 0, aug_repeats=int(args.aug_repeats or 0), rho=args.lt_rho,
        detach_consensus=args.lt_detach, reverse_kl=args.lt_reverse_kl)
    if args.aug_repeats >= 2 and not isinstance(criterion, LossTransform) and args.loss != 'jsd':
        # Repeats without T(L): still measure the replicas' consistency (rho = 0 returns the base loss exactly).
        criterion = LossTransform(criterion, num_repeats=args.aug_repeats, rho=0.)
    return criterion


def _resume(args, task, optimizer, loss_scaler) -> Optional[int]:
    if not args.resume:
        return None
    if not os.path.isfile(args.resume):
        raise UserError(f'--resume checkpoint {args.resume} not found; pass the last.pth.tar of the run to continue.')
    saved = read_checkpoint_args(args.resume)
    if saved is not None and args.lr is not None and getattr(saved, 'lr', args.lr) != args.lr:
        raise UserError(f'--lr {args.lr} differs from the resumed run\'s lr {saved.lr}: a resumed run continues its '
                        f'own schedule; drop --lr, or start a new run from the weights with --initial-checkpoint.')
    try:
        return resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=utils.is_primary(args))
    except Exception as e:
        raise UserError(checkpoint_problem(args.resume, e, f'--model {args.model} with {args.num_classes} classes')) from e


def _check_finite_weights(task: ClassificationTask, epoch: int, output_dir: Optional[str]) -> None:
    """Never validate or save non-finite weights: stop and say which good checkpoint to resume from."""
    models = [task.get_trainable_module()] + ([task.get_eval_model(ema=True)] if task.has_ema() else [])
    if all(all_finite(m) for m in models):
        return
    raise UserError(f'training diverged in epoch {epoch}: the weights are no longer finite (NaN/inf) and were not '
                    f'saved; lower --lr or add --clip-grad 1.0, {resume_hint(output_dir, epoch)}.')


def _set_sampler_epoch(loader, epoch: int) -> None:
    """``set_epoch`` on the (batch) sampler, also through timm's PrefetchLoader (older ones hide the sampler)."""
    inner = getattr(loader, 'loader', loader)
    for obj in (getattr(inner, 'batch_sampler', None), getattr(inner, 'sampler', None)):
        if hasattr(obj, 'set_epoch'):
            obj.set_epoch(epoch)
            return


def _seed_epoch(args: argparse.Namespace, epoch: int) -> None:
    """Every RNG the epoch uses (augmentation, dropout, mixup, worker seeds) from (seed, epoch, rank)."""
    utils.random_seed(args.seed + 100_003 * (epoch + 1), args.rank)


def create_optimizer_from_args(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm's optimizer factory with its flags, ``--opt-kwargs`` included."""
    try:
        return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **(args.opt_kwargs or {}))
    except TypeError as e:
        raise UserError(f'--opt {args.opt} does not take these arguments ({e}); check --opt-kwargs.') from e


def _prepare_model(args: argparse.Namespace, model: nn.Module, device: torch.device,
                   model_dtype: Optional[torch.dtype]) -> nn.Module:
    """timm's model setup after creation: head init, gradient checkpointing, split/sync BatchNorm, device, dtype."""
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if args.split_bn:
        if not (args.aug_splits > 1 or args.resplit):
            raise UserError('--split-bn needs --aug-splits > 1 or --resplit (one BatchNorm per augmentation split).')
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''  # as timm: SyncBatchNorm keeps the ranks' statistics equal already
        if args.split_bn:
            raise UserError('--sync-bn cannot be combined with --split-bn; use one of them.')
        if device.type == 'cpu':
            raise UserError('--sync-bn needs GPU processes (torch\'s SyncBatchNorm does not run on the CPU); drop it, '
                            '--dist-bn reduce (the default) averages BatchNorm statistics over the ranks each epoch.')
        model = convert_sync_batchnorm(model)
        if utils.is_primary(args):
            _logger.info('Converted model to use Synchronized BatchNorm.')
    return model


def _init_wandb(args: argparse.Namespace, exp_name: str) -> bool:
    """timm's optional wandb logging: ``True`` when metrics go to wandb; a warning when the package is missing."""
    if not args.log_wandb:
        return False
    try:
        import wandb
    except ImportError:
        _logger.warning("You've requested to log metrics to wandb but package not found. "
                        "Metrics not being logged to wandb, try `pip install wandb`")
        return False
    if args.wandb_resume_id and not args.resume:
        raise UserError('--wandb-resume-id continues a wandb run: pass the run\'s checkpoint with --resume too.')
    wandb.init(project=args.wandb_project, name=exp_name, config=args, tags=args.wandb_tags,
               resume='must' if args.wandb_resume_id else None, id=args.wandb_resume_id or None)
    return True


def _check_loop_args(args: argparse.Namespace) -> None:
    """The training-loop options that argparse cannot check by itself (one clear error each)."""
    if args.grad_accum_steps < 1:
        raise UserError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}.')
    if args.val_interval < 1:
        raise UserError(f'--val-interval must be >= 1, got {args.val_interval}.')
    if args.dist_bn not in ('reduce', 'broadcast', ''):
        raise UserError(f'--dist-bn must be "reduce", "broadcast" or "" (off), got {args.dist_bn!r}.')
    if args.aug_splits == 1 or args.aug_splits < 0:
        raise UserError(f'--aug-splits must be 0 or >= 2, got {args.aug_splits}.')


def _amp(amp: bool, amp_dtype: str, device: torch.device):
    """(autocast context factory, loss scaler) as timm's train.py: a scaler only for float16 on CUDA."""
    if not amp:
        return suppress, None
    dtype = torch.bfloat16 if amp_dtype == 'bfloat16' else torch.float16
    scaler = NativeScaler(device=device.type) if device.type == 'cuda' and dtype == torch.float16 else None
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


def _wrap_aug_splits(dataset, aug_splits: int, mixup_under_prefetcher: bool):
    """As timm's train.py: AugMix/JSD splits need the wrapper that returns the clean + augmented splits."""
    if aug_splits <= 1:
        return dataset
    if mixup_under_prefetcher:
        raise UserError('--aug-splits cannot be combined with mixup/cutmix under the prefetcher; add --no-prefetcher.')
    return AugMixDataset(dataset, num_splits=aug_splits)


def _setup_ema_compile_ddp(args: argparse.Namespace, task: ClassificationTask, device: torch.device) -> None:
    """EMA (restored from --resume), torch.compile of model and loss, then DDP — in timm's order."""
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:  # as timm: before DDP wrapping; the loss too (one graph, see lt_timm.loss)
        if utils.is_primary(args):
            _logger.info(f'Compiling model and loss with backend={args.torchcompile}, mode={args.torchcompile_mode}')
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        task.criterion = torch.compile(task.criterion, backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)


def _create_scheduler(args: argparse.Namespace, optimizer, updates_per_epoch: int, start_epoch: int):
    """timm's scheduler from the args, advanced to ``start_epoch`` (a resumed run); returns it and the epochs."""
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    return lr_scheduler, num_epochs


def _open_run_dir(args: argparse.Namespace, args_text: str, output_dir: str, model: nn.Module,
                  task: ClassificationTask, optimizer, loss_scaler, class_to_idx, start_epoch: int
                  ) -> utils.CheckpointSaver:
    """The claimed run folder made ready: timm's CheckpointSaver (its history restored when resuming in place),
    summary rows past ``start_epoch`` dropped, ``args.yaml`` and the class map written."""
    saver = utils.CheckpointSaver(
        model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, checkpoint_dir=output_dir,
        recovery_dir=output_dir, decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist, task=task)
    if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir):
        saver.load_state_dict_from_checkpoint(args.resume)
    truncate_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        f.write(args_text)
    if class_to_idx:
        write_class_map(class_to_idx, output_dir)
        args.class_to_idx = class_to_idx  # saved in every checkpoint's 'args' (not in args.yaml)
    return saver


def train(args: argparse.Namespace, args_text: str) -> 'OrderedDict[str, float]':
    """Run a full training job; returns the final epoch's eval metrics (and best) for scripting."""
    check_args(args)
    for module in args.device_modules or []:
        importlib.import_module(module)
    if torch.cuda.is_available():  # as timm's train.py
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    args.aug_repeats = int(args.aug_repeats)
    args.prefetcher = not args.no_prefetcher
    _check_loop_args(args)
    model_dtype = resolve_model_dtype(args)
    device = _setup_device(args)
    if args.distributed:
        _logger.info(f'Training in distributed mode: process {args.rank}/{args.world_size}, device {args.device}.')
    utils.random_seed(args.seed, args.rank)
    _resolve_lr(args)
    if args.fast_norm:
        set_fast_norm()

    in_chans = args.in_chans or (args.input_size[0] if args.input_size is not None else 3)
    dataset_train, dataset_eval, class_to_idx = _load_datasets(args, in_chans)
    _resolve_num_classes(args, dataset_train)
    model = create_model_from_args(args, args.num_classes, in_chans, initial_checkpoint=args.initial_checkpoint)
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    model = _prepare_model(args, model, device, model_dtype)

    amp_autocast, loss_scaler = _amp(args.amp, args.amp_dtype, device)
    mixup_active, collate_fn, mixup_fn = _mixup(args)
    criterion = _criterion(args, mixup_active)
    dataset_train = _wrap_aug_splits(dataset_train, args.aug_splits, mixup_active and args.prefetcher)
    loader_train, loader_eval = _create_loaders(args, dataset_train, dataset_eval, data_config, collate_fn, device,
                                                model_dtype)
    if mixup_active and args.aug_repeats and args.mixup_mode != 'batch' and utils.is_primary(args):
        _logger.warning(f'--mixup-mode {args.mixup_mode} mixes each replica with its own lambda; use --mixup-mode '
                        f'batch to keep replicas of an image consistently mixed.')

    task = ClassificationTask(model=model, criterion=criterion, device=device, dtype=model_dtype, verbose=False)
    optimizer = create_optimizer_from_args(model, args)
    resume_epoch = _resume(args, task, optimizer, loss_scaler)
    _setup_ema_compile_ddp(args, task, device)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    lr_scheduler, num_epochs = _create_scheduler(args, optimizer, updates_per_epoch, start_epoch)

    saver, output_dir, lock, log_wandb = None, None, None, False
    try:
        if utils.is_primary(args):
            exp_name = args.experiment or '-'.join([
                datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
            lock = claim_run_dir(args.output or './output/train', exp_name, args.resume)
            output_dir = os.path.dirname(lock.path)
            saver = _open_run_dir(args, args_text, output_dir, model, task, optimizer, loss_scaler, class_to_idx,
                                  start_epoch)
            log_wandb = _init_wandb(args, exp_name)
            accum = (f' x {args.grad_accum_steps} accumulated = {updates_per_epoch} optimizer steps/epoch'
                     if args.grad_accum_steps > 1 else '')
            _logger.info(
                f'Model {safe_model_name(args.model)} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), '
                f'{len(dataset_train)} train / {len(dataset_eval)} val images, {args.num_classes} classes. '
                f'Criterion: {describe_criterion(criterion)}. Sampler: '
                + (f'grouped repeats m={args.aug_repeats}, mode {args.lt_epoch}, {len(loader_train)} batches/epoch'
                   if args.aug_repeats else f'plain, {len(loader_train)} batches/epoch')
                + f'{accum}. Output: {output_dir}. Epochs {start_epoch}..{num_epochs - 1}.')
        result = _epoch_loop(args, task, loader_train, loader_eval, optimizer, lr_scheduler, saver, output_dir,
                             start_epoch, num_epochs, device, amp_autocast, loss_scaler, mixup_fn, model_dtype,
                             log_wandb)
    finally:
        if lock is not None:
            lock.release()
    return result


def _epoch_loop(args, task, loader_train, loader_eval, optimizer, lr_scheduler, saver, output_dir, start_epoch,
                num_epochs, device, amp_autocast, loss_scaler, mixup_fn, model_dtype=None,
                log_wandb=False) -> 'OrderedDict[str, float]':
    eval_metric = args.eval_metric
    best_metric, best_epoch = None, None
    eval_metrics = OrderedDict()
    for epoch in range(start_epoch, num_epochs):
        _set_sampler_epoch(loader_train, epoch)
        _seed_epoch(args, epoch)
        train_metrics = train_one_epoch(
            epoch, task, loader_train, optimizer, args, device, lr_scheduler=lr_scheduler,
            amp_autocast=amp_autocast, loss_scaler=loss_scaler, mixup_fn=mixup_fn, output_dir=output_dir,
            saver=saver, model_dtype=model_dtype)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            # As timm: make the ranks' BatchNorm statistics equal (mean over ranks, or rank 0's) every epoch.
            if utils.is_primary(args) and epoch == start_epoch:
                _logger.info(f'Distributing BatchNorm running means and vars after every epoch (--dist-bn {args.dist_bn}).')
            utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
            if task.has_ema() and not args.model_ema_force_cpu:
                utils.distribute_bn(task.get_trainable_module(ema=True), args.world_size, args.dist_bn == 'reduce')
        _check_finite_weights(task, epoch, output_dir)
        if (epoch + 1) % args.val_interval != 0 and epoch + 1 != num_epochs:
            # As timm: no validation, summary row or checkpoint this epoch; the scheduler still steps.
            if utils.is_primary(args):
                _logger.info(f'Epoch {epoch}: skipping validation and checkpointing (--val-interval {args.val_interval}).')
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, None)
            continue
        eval_metrics = validate(task.get_eval_model(), loader_eval, args, device, amp_autocast,
                                input_dtype=model_dtype, log_freq=args.log_interval)
        extra = OrderedDict((f'train_{k}', v) for k, v in train_metrics.items() if k != 'loss')
        if task.has_ema() and not args.model_ema_force_cpu:
            # As timm: with EMA, the eval metrics (summary's eval_*, best checkpoint, plateau scheduler) are the
            # EMA weights'; the plain weights' are kept as eval_noema_*.
            extra.update((f'eval_noema_{k}', v) for k, v in eval_metrics.items())
            eval_metrics = validate(task.get_eval_model(ema=True), loader_eval, args, device, amp_autocast, ' (EMA)',
                                    input_dtype=model_dtype, log_freq=args.log_interval)
        if saver is not None:  # checkpoint first, then its summary row (a resumed run drops rows past its start)
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics[eval_metric])
        if output_dir is not None:
            lrs = [pg['lr'] for pg in optimizer.param_groups]
            update_summary(epoch, OrderedDict(loss=train_metrics['loss']), eval_metrics,
                           os.path.join(output_dir, 'summary.csv'), lr=sum(lrs) / len(lrs), extra=extra,
                           log_wandb=log_wandb)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics[eval_metric])

    if output_dir is not None:
        if best_metric is not None:
            _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
        if not args.no_plot and os.path.exists(os.path.join(output_dir, 'summary.csv')):
            png = plot_training_curves(os.path.join(output_dir, 'summary.csv'), os.path.join(output_dir, 'curves.png'),
                                       title=f'{args.model} --loss {args.loss}')
            _logger.info(f'Training curves: {png}')
    result = OrderedDict(eval_metrics)
    result['best'] = best_metric
    result['output_dir'] = output_dir
    return result
