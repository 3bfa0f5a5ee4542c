"""``train.py``'s command line: timm's flags (a ``-c`` YAML recipe sets their defaults), the refused timm options,
and one resolve step that turns the parsed flags into a :class:`~lt_timm.config.TrainConfig`.

Every change to the parsed ``Namespace`` happens in :func:`parse_args` (the ``--jsd-loss`` alias, before ``args.yaml``
is written from it) and :func:`resolve` (integer repeats, prefetcher, device and ranks, the lr rule, ``--dist-bn``
off under ``--sync-bn``); below it the run reads typed settings only.
"""
import argparse
import functools
import importlib
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
import yaml
from timm import utils
from timm.optim import optimizer_kwargs
from timm.scheduler import scheduler_kwargs

from ..builders import TRAIN_DATASET_OPTIONS, available_device
from ..config import (DataOptions, EmaOptions, LoaderOptions, LoopOptions, MixupOptions, ModelOptions, OptimOptions,
                      Precision, Ranks, ResumePoint, RunOptions, TrainConfig, settings_from)
from ..data import IMAGE_CHECKS
from ..errors import UserError
from ..modeling import read_checkpoint_args
from ..registry import LossOptions
from ..run_dir import DEFAULT_OUTPUT
from .checks import (check_args, check_loop_args, check_lr, check_lr_base, check_resumed_flags, lr_from_base,
                     resolve_model_dtype, resumed_changes, resumed_folder)
from .flags import add_losstransform_args, add_shared_options
from .parity import COMPUTED_KEYS, add_refused_options, check_refused
from .recipe import add_config_option, parse_with_recipe

__all__ = ['build_parser', 'parse_args', 'resolve', 'parse_config', 'resolve_dist_bn', 'option_flags',
           'DATA_CONFIG_KEYS', 'image_settings']

_logger = logging.getLogger('train')

# the flags timm's resolve_data_config reads
DATA_CONFIG_KEYS = ('in_chans', 'input_size', 'img_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


def build_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(config_parser, parser) with timm's flag names, meanings and defaults, plus LossTransform's."""
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    add_config_option(config_parser, 'YAML config file specifying default arguments (keys = flag dest names)')
    parser = argparse.ArgumentParser(description='lt-timm training (timm train.py flags + LossTransform)')

    g = parser.add_argument_group('Dataset parameters')
    add_shared_options(g, 'data', '--data-dir', '--dataset')
    g.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    g.add_argument('--val-split', metavar='NAME', default='validation', help='dataset validation split (default: validation)')
    g.add_argument('--train-num-samples', default=None, type=int, metavar='N', help='Manually specify num samples in train split, for IterableDatasets.')
    g.add_argument('--val-num-samples', default=None, type=int, metavar='N', help='Manually specify num samples in validation split, for IterableDatasets.')
    add_shared_options(g, '--class-map', '--input-img-mode', '--dataset-download', '--input-key', '--target-key')
    add_shared_options(g, '--dataset-trust-remote-code')

    g = parser.add_argument_group('Model parameters')
    g.add_argument('--model', default='resnet50', type=str, metavar='MODEL', help='Name of model to train (default: "resnet50")')
    add_shared_options(g, '--pretrained')
    g.add_argument('--pretrained-path', default=None, type=str, help='Load this checkpoint as if they were the pretrained weights (with adaptation).')
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH', help='Load this checkpoint into model after initialization (default: none)')
    g.add_argument('--resume', default='', type=str, metavar='PATH', help='Resume full model and optimizer state from checkpoint (default: none)')
    g.add_argument('--no-resume-opt', action='store_true', default=False, help='prevent resume of optimizer state when resuming model')
    add_shared_options(g, '--num-classes', '--gp', '--img-size', '--in-chans', '--input-size', '--crop-pct')
    add_shared_options(g, '--mean', '--std', '--interpolation')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='Input batch size for training (default: 128)')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N', help='Validation batch size override (default: None)')
    add_shared_options(g, '--channels-last')
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N', help='The number of steps to accumulate gradients (default: 1)')
    g.add_argument('--grad-checkpointing', action='store_true', default=False, help='Enable gradient checkpointing through model blocks/stages')
    add_shared_options(g, '--fast-norm', '--model-kwargs')
    g.add_argument('--head-init-scale', default=None, type=float, help='Head initialization scale')
    g.add_argument('--head-init-bias', default=None, type=float, help='Head initialization bias value')
    add_shared_options(g, '--torchcompile-mode', '--torchcompile')

    g = parser.add_argument_group('Device parameters')
    add_shared_options(g, '--device', '--amp', '--amp-dtype', '--model-dtype')
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='Force broadcast buffers for native DDP to off.')
    g.add_argument('--synchronize-step', action='store_true', default=False, help='torch.cuda.synchronize() end of each step')
    g.add_argument('--local_rank', default=0, type=int, help='accepted for torch.distributed.launch (the rank comes from the environment)')
    g.add_argument('--device-modules', default=None, type=str, nargs='+', help='Python imports for device backend modules.')
    g.add_argument('--dist-backend', default=None, type=str, help='torch.distributed backend (default: nccl on cuda, else gloo)')
    g.add_argument('--dist-url', default=None, type=str, help='torch.distributed init url (default: env://)')

    g = parser.add_argument_group('Optimizer parameters')
    g.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='Optimizer (default: "sgd")')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='Optimizer Epsilon (default: None, use opt default)')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='Optimizer Betas (default: None, use opt default)')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M', help='Optimizer momentum (default: 0.9)')
    g.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='Clip gradient norm (default: None, no clipping)')
    g.add_argument('--clip-mode', type=str, default='norm', help='Gradient clipping mode. One of ("norm", "value", "agc")')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay (default: None)')
    g.add_argument('--layer-decay-min-scale', type=float, default=0, help='layer-wise lr decay minimum scale clamp (default: 0)')
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None, help='layer-wise lr decay no optimization scale (default: None)')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs, help='optimizer keyword arguments: key=value ...')

    g = parser.add_argument_group('Learning rate schedule parameters')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler (default: "cosine")')
    g.add_argument('--sched-on-updates', action='store_true', default=False, help='Apply LR scheduler step on update instead of epoch end.')
    g.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate, overrides lr-base if set (default: None)')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR', help='base learning rate: lr = lr_base * global_batch_size / base_size')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='base learning rate batch size (divisor, default: 256).')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct', help='learning rate noise on/off epoch percentages')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='learning rate noise limit percent (default: 0.67)')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='learning rate noise std-dev (default: 1.0)')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='learning rate cycle len multiplier (default: 1.0)')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='amount to decay each learning rate cycle (default: 0.5)')
    g.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='learning rate cycle limit, cycles enabled if > 1')
    g.add_argument('--lr-k-decay', type=float, default=1.0, help='learning rate k-decay for cosine/poly (default: 1.0)')
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate (default: 1e-5)')
    g.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound for cyclic schedulers that hit 0 (default: 0)')
    g.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
    g.add_argument('--epoch-repeats', type=float, default=0., metavar='N', help='epoch repeat multiplier (number of times to repeat dataset epoch per train epoch; IterableDatasets).')
    g.add_argument('--start-epoch', default=None, type=int, metavar='N', help='manual epoch number (useful on restarts)')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES', help='list of decay epoch indices for multistep lr. must be increasing')
    g.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs to warmup LR, if scheduler supports')
    g.add_argument('--warmup-prefix', action='store_true', default=False, help='Exclude warmup period from decay schedule.')
    g.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='patience epochs for Plateau LR scheduler (default: 10)')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate (default: 0.1)')

    g = parser.add_argument_group('Augmentation and regularization parameters')
    g.add_argument('--no-aug', action='store_true', default=False, help='Disable all training augmentation, override other train aug args')
    g.add_argument('--train-crop-mode', type=str, default=None, help='Crop-mode in train: timm\'s rrc/rkrc/rkrr, or "pad" (CIFAR pad-and-crop, --train-crop-pad pixels; images at the input size)')
    g.add_argument('--train-crop-pad', type=int, default=4, metavar='N', help='zero padding in pixels for --train-crop-mode pad (default: 4, He et al.)')
    g.add_argument('--cutout', type=int, default=0, metavar='N', help='Cutout (DeVries & Taylor 2017) square side in pixels, 0 = off (default: 0; CIFAR-10: 16)')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT', help='Random resize scale (default: 0.08 1.0)')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO', help='Random resize aspect ratio (default: 0.75 1.33)')
    g.add_argument('--hflip', type=float, default=0.5, help='Horizontal flip training aug probability')
    g.add_argument('--vflip', type=float, default=0., help='Vertical flip training aug probability')
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='Color jitter factor (default: 0.4)')
    g.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT', help='Probability of applying any color jitter.')
    g.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT', help='Probability of applying random grayscale conversion.')
    g.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT', help='Probability of applying gaussian blur.')
    g.add_argument('--aa', type=str, default=None, metavar='NAME', help='Use AutoAugment policy. "v0" or "original". (default: None)')
    g.add_argument('--aug-repeats', type=float, default=0, help='Number of augmentation repetitions (m); replicas of an image share a batch. (default: 0)')
    g.add_argument('--aug-splits', type=int, default=0, help='Number of augmentation splits (default: 0, valid: 0 or >=2)')
    g.add_argument('--jsd-loss', action='store_true', default=False, help='Enable Jensen-Shannon Divergence + CE loss (same as --loss jsd). Use with --aug-splits.')
    g.add_argument('--bce-loss', action='store_true', default=False, help='Enable BCE loss w/ Mixup/CutMix use.')
    g.add_argument('--bce-sum', action='store_true', default=False, help='Sum over classes when using BCE loss.')
    g.add_argument('--bce-target-thresh', type=float, default=None, help='Threshold for binarizing softened BCE targets (default: None, disabled).')
    g.add_argument('--bce-pos-weight', type=float, default=None, help='Positive weighting for BCE loss.')
    g.add_argument('--reprob', type=float, default=0., metavar='PCT', help='Random erase prob (default: 0.)')
    g.add_argument('--remode', type=str, default='pixel', help='Random erase mode (default: "pixel")')
    g.add_argument('--recount', type=int, default=1, help='Random erase count (default: 1)')
    g.add_argument('--resplit', action='store_true', default=False, help='Do not random erase first (clean) augmentation split')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='Probability of performing mixup or cutmix when either/both is enabled')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='Probability of switching to cutmix when both mixup and cutmix enabled')
    g.add_argument('--mixup-mode', type=str, default='batch', help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    g.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='Turn off mixup after this epoch, disabled if 0 (default: 0)')
    g.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing (default: 0.1)')
    g.add_argument('--train-interpolation', type=str, default='random', help='Training interpolation (random, bilinear, bicubic default: "random")')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='Dropout rate (default: 0.)')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='Drop path rate (default: None)')
    g.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='Drop block rate (default: None)')

    g = parser.add_argument_group('Batch norm parameters', 'Only works with gen_efficientnet based models currently.')
    g.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override (if not None)')
    g.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override (if not None)')
    g.add_argument('--sync-bn', action='store_true', help='Enable synchronized BatchNorm.')
    g.add_argument('--dist-bn', type=str, default='reduce', help='Distribute BatchNorm stats between nodes after each epoch ("broadcast", "reduce", or "")')
    g.add_argument('--split-bn', action='store_true', help='Enable separate BN layers per augmentation split.')

    g = parser.add_argument_group('Model exponential moving average parameters')
    g.add_argument('--model-ema', action='store_true', default=False, help='Enable tracking moving average of model weights.')
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='Force ema to be tracked on CPU, rank=0 node only. Disables EMA validation.')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='Decay factor for model weights moving average (default: 0.9998)')
    g.add_argument('--model-ema-warmup', action='store_true', help='Enable warmup for model EMA decay.')

    g = parser.add_argument_group('Miscellaneous parameters')
    add_shared_options(g, '--seed')
    g.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
    g.add_argument('--log-interval', type=int, default=50, metavar='N', help='how many batches to wait before logging training status')
    g.add_argument('--val-interval', type=int, default=1, metavar='N', help='how many epochs between validation and checkpointing')
    g.add_argument('--recovery-interval', type=int, default=0, metavar='N', help='how many batches to wait before writing recovery checkpoint')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='number of checkpoints to keep (default: 10)')
    add_shared_options(g, '-j')
    g.add_argument('--save-images', action='store_true', default=False, help='save images of input batches every log interval for debugging')
    add_shared_options(g, '--pin-mem', '--no-prefetcher')
    g.add_argument('--output', default='', type=str, metavar='PATH', help='path to output folder (default: none, current dir)')
    g.add_argument('--experiment', default='', type=str, metavar='NAME', help='name of train experiment, name of sub-folder for output')
    g.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', help='Best metric (default: "top1")')
    g.add_argument('--use-multi-epochs-loader', action='store_true', default=False, help='use the multi-epochs-loader to save time at the beginning of every epoch (not with --aug-repeats)')
    g.add_argument('--log-wandb', action='store_true', default=False, help='log training and validation metrics to wandb (wandb is optional)')
    g.add_argument('--wandb-project', default=None, type=str, help='wandb project name')
    g.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    g.add_argument('--wandb-resume-id', default='', type=str, help='If resuming a run, the id of the run in wandb')
    g.add_argument('--no-plot', action='store_true', default=False, help='do not write the training-curves PNG at the end')
    g.add_argument('--check-loss-every-step', action='store_true', default=False, help='check every step\'s loss before applying it (one host sync per step; default: the summed loss at each --log-interval)')
    g.add_argument('--no-decode-once', action='store_true', default=False, help='with --aug-repeats: decode each replica\'s image separately instead of once per replica group')
    g.add_argument('--check-images', default='header', choices=IMAGE_CHECKS, help='check every image file before training: header (default: headers and complete JPEG/PNG files), decode (decode every image), none')
    add_losstransform_args(parser)
    add_refused_options(parser, 'train')
    return config_parser, parser



def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, str]:
    """timm's two-stage parse: ``-c`` YAML sets defaults, command-line flags override them. Returns the flags and
    the text of ``args.yaml`` (the flags as parsed)."""
    config_parser, parser = build_parser()
    args, _ = parse_with_recipe(config_parser, parser, argv, ignored=COMPUTED_KEYS)
    check_refused(args, 'train')
    if args.jsd_loss and args.loss == 'ce':
        args.loss = 'jsd'
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    return args, args_text


def resolve(args: argparse.Namespace, args_text: str = '') -> TrainConfig:
    """The one step from parsed flags to the run's settings: checks, ``--device-modules`` imported, the device and
    the DDP ranks (timm's ``init_distributed_device``), ``--resume`` against its run, timm's lr rule; returns the
    typed config."""
    check_args(args)
    for module in args.device_modules or []:
        importlib.import_module(module)
    args.aug_repeats = int(args.aug_repeats)
    args.prefetcher = not args.no_prefetcher
    check_loop_args(args)
    model_dtype = resolve_model_dtype(args.model_dtype, args.amp)
    _resolve_device(args)
    args.dist_bn = resolve_dist_bn(args.dist_bn, args.sync_bn, args.distributed)
    resumed = _resolve_resume(args)
    check_lr_base(args, model_dtype, args.world_size)  # without --lr: the lr timm's rule makes of --lr-base
    _resolve_lr(args)
    for flag in ('--lr', '--warmup-lr', '--min-lr'):  # --lr: given, the resumed run's, or timm's rule's
        check_lr(getattr(args, flag[2:].replace('-', '_')), flag, model_dtype)
    return _train_config(args, args_text, model_dtype, resumed)


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """:func:`parse_args` then :func:`resolve`: ``train.py``'s command line to its settings."""
    return resolve(*parse_args(argv))


def resolve_dist_bn(dist_bn: str, sync_bn: bool, distributed: bool) -> str:
    """As timm: SyncBatchNorm keeps the ranks' statistics equal already, so ``--sync-bn`` under DDP turns
    ``--dist-bn`` off."""
    return '' if distributed and sync_bn else dist_bn


def _resolve_device(args: argparse.Namespace) -> None:
    """``--device cuda`` without CUDA falls back to the CPU (a warning); then timm's device and rank setup."""
    args.device = available_device(args.device, 'training')
    utils.init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Training in distributed mode: process {args.rank}/{args.world_size}, device {args.device}.')


@functools.lru_cache(maxsize=1)
def option_flags() -> Dict[str, str]:
    """dest -> the flag(s) as the user types them (``-b/--batch-size``), for every option of the parser."""
    return {a.dest: '/'.join(a.option_strings) or a.dest for a in build_parser()[1]._actions if a.dest != 'help'}


def _resolve_resume(args: argparse.Namespace) -> Optional[ResumePoint]:
    """``--resume``: the checkpoint's run is compared with this command (the experiment's options must be the run's;
    :func:`~lt_timm.cli.checks.check_resumed_flags`), a resumed run keeps its lr unless ``--lr`` is given, and
    continues in the checkpoint's run folder."""
    if not args.resume:
        return None
    if not os.path.isfile(args.resume):
        raise UserError(f'--resume checkpoint {args.resume} not found; pass the last.pth.tar of the run to continue.')
    saved = read_checkpoint_args(args.resume)
    if saved is None:  # not a train.py/timm checkpoint: nothing to compare (a bad file is named when it is loaded)
        return ResumePoint(path=args.resume)
    if args.lr is None and getattr(saved, 'lr', None) is not None:
        args.lr = saved.lr  # the run's own (timm's rule gave it from its --lr-base and global batch)
    check_resumed_flags(args, saved, option_flags())
    folder = resumed_folder(args.resume, args.output, args.experiment, DEFAULT_OUTPUT)
    return ResumePoint(path=args.resume, folder=folder, class_to_idx=dict(getattr(saved, 'class_to_idx', None) or {}),
                       train_images=getattr(saved, 'train_images', None),
                       eval_images=getattr(saved, 'eval_images', None), lr=getattr(saved, 'lr', None),
                       changes=resumed_changes(args, saved, option_flags()))


def _resolve_lr(args: argparse.Namespace) -> None:
    """timm's rule: without --lr, scale --lr-base by the global batch size (``--lr-base-scale`` is kept as given: a
    resumed run compares it)."""
    if args.lr is not None:
        return
    args.lr, global_batch_size, scale = lr_from_base(args, args.world_size)
    if utils.is_primary(args):
        _logger.info(f'Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) '
                     f'and effective global batch size ({global_batch_size}) with {scale} scaling.')


def image_settings(args: argparse.Namespace, dataset_options) -> dict:
    """The settings train.py and validate.py read the same way: ``data`` (DataOptions, with the image mode of
    ``--in-chans`` and timm's dataset options of ``dataset_options``), ``model`` (ModelOptions) and
    ``data_config_args`` (what timm's ``resolve_data_config`` reads)."""
    in_chans = args.in_chans or (args.input_size[0] if args.input_size is not None else 3)
    return dict(
        data=settings_from(DataOptions, args, root=args.data_dir or args.data,
                           input_img_mode=args.input_img_mode or ('RGB' if in_chans == 3 else 'L'),
                           extras={row[1]: getattr(args, row[1]) for row in dataset_options}),
        model=settings_from(ModelOptions, args, in_chans=in_chans, model_kwargs=dict(args.model_kwargs or {})),
        data_config_args={k: getattr(args, k, None) for k in DATA_CONFIG_KEYS})


def _loss_options(args: argparse.Namespace, mixup_active: bool) -> LossOptions:
    """The criterion's options: timm's loss flags and LossTransform's."""
    return LossOptions(
        smoothing=args.smoothing or 0., mixup_active=mixup_active, bce_loss=bool(args.bce_loss),
        bce_target_thresh=args.bce_target_thresh, bce_sum=bool(args.bce_sum), bce_pos_weight=args.bce_pos_weight,
        jsd_splits=args.aug_splits or 0, aug_repeats=int(args.aug_repeats or 0), rho=args.lt_rho,
        detach_consensus=args.lt_detach, reverse_kl=args.lt_reverse_kl)


def _train_config(args: argparse.Namespace, args_text: str, model_dtype: Optional[torch.dtype],
                  resumed: Optional[ResumePoint] = None) -> TrainConfig:
    """The resolved flags as typed settings."""
    ranks = settings_from(Ranks, args)
    mixup = settings_from(MixupOptions, args)
    return TrainConfig(
        ranks=ranks,
        precision=settings_from(Precision, args, model_dtype=model_dtype),
        **image_settings(args, TRAIN_DATASET_OPTIONS),
        loader=settings_from(LoaderOptions, args),
        mixup=mixup,
        loss=args.loss,
        loss_options=_loss_options(args, mixup.active),
        optim=settings_from(OptimOptions, args, optimizer_kwargs=optimizer_kwargs(cfg=args),
                            opt_kwargs=dict(args.opt_kwargs or {}), scheduler_kwargs=scheduler_kwargs(args)),
        ema=settings_from(EmaOptions, args),
        run=settings_from(RunOptions, args),
        loop=settings_from(LoopOptions, args, ranks=ranks, plot_title=f'{args.model} --loss {args.loss}'),
        seed=args.seed, fast_norm=args.fast_norm, record=args, record_text=args_text, resumed=resumed)
