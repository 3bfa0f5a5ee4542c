"""The run's pieces that ``train.py`` and ``validate.py`` both build, from typed options (:mod:`lt_timm.config`):
the device, the datasets (one class map per run, images checked), the model, autocast, the loaders.

Built from timm's functions (``create_dataset``, ``create_model``, ``create_loader``, ``NativeScaler``) with
lt-timm's checks: every problem is one :class:`~lt_timm.errors.UserError` naming the fix.
"""
import logging
import os
import time
from contextlib import suppress
from functools import partial
from typing import Any, Dict, Mapping, Optional, Tuple

import timm
import timm.data
import torch
import torch.nn as nn
from timm import utils
from timm.layers import convert_splitbn_model, convert_sync_batchnorm
from timm.utils import NativeScaler

from .config import DataOptions, LoaderOptions, ModelOptions, Precision, Ranks
from .data import check_images, class_to_idx_of, load_folder_dataset
from .errors import UserError
from .loader import create_loader
from .modeling import create_model

__all__ = ['available_device', 'setup_training_process', 'TRAIN_DATASET_OPTIONS', 'VALIDATE_DATASET_OPTIONS',
           'dataset_options', 'open_dataset', 'open_datasets', 'resolve_num_classes', 'resolve_eval_num_classes',
           'create_model_from', 'prepare_model', 'autocast_and_scaler', 'create_loaders']

_logger = logging.getLogger('train')

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
VALIDATE_DATASET_OPTIONS = (
    ('--num-samples', 'num_samples', 'num_samples', _ITERABLE, 'eval'),
    ('--input-key', 'input_key', 'input_key', _KEYED, 'both'),
    ('--target-key', 'target_key', 'target_key', _KEYED, 'both'),
    ('--dataset-trust-remote-code', 'dataset_trust_remote_code', 'trust_remote_code', _HF, 'both'),
)


# ---------------------------------------------------------------- device and process

def available_device(device: str, doing: str) -> str:
    """``device``, or ``'cpu'`` (with a warning) when it asks for CUDA and there is none; ``doing``: 'training' /
    'validating'."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        logging.getLogger('train' if doing == 'training' else 'validate').warning(
            f'CUDA is not available: {doing} on the CPU (pass --device cpu to silence this).')
        return 'cpu'
    return device


def setup_training_process(seed: int, rank: int) -> None:
    """As timm's train.py: TF32 matmuls and cuDNN benchmark on CUDA, every RNG from (seed, rank)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    utils.random_seed(seed, rank)


# ---------------------------------------------------------------- datasets

def dataset_options(dataset: str, values: Mapping[str, Any], table, is_training: bool) -> dict:
    """timm's extra ``create_dataset`` kwargs set on the command line (``values``: dest -> value); refused by name
    where timm would ignore them."""
    name = (dataset or '').lower()
    out = {}
    for flag, dest, kwarg, prefixes, split in table:
        value = values.get(dest)
        if value in (None, False, 0, 0.):
            continue
        if not name.startswith(prefixes):
            kinds = '/'.join(p.rstrip('/') for p in prefixes)
            raise UserError(f'{flag} applies to {kinds} datasets only (timm ignores it for --dataset '
                            f'{dataset or "ImageFolder"!r}); drop it.')
        if split == 'both' or (split == 'train') == is_training:
            out[kwarg] = value
    return out


def open_dataset(data: DataOptions, root: str, split: str, is_training: bool, extra: dict, class_map=None,
                 split_flag: str = '--split', allow_root: bool = False):
    """lt-timm's checked dataset (:func:`~lt_timm.data.load_folder_dataset`: a missing split folder is refused,
    ``split_flag`` named; ``allow_root`` reads a root of class folders as the split), or timm's ``create_dataset`` as
    is when timm's iterable/HF dataset options (``extra``) are given."""
    opts = dict(input_img_mode=data.input_img_mode, batch_size=data.batch_size, seed=data.seed,
                download=data.dataset_download)
    if not extra:
        return load_folder_dataset(data.dataset, root, split, is_training, class_map=class_map, split_flag=split_flag,
                                   allow_root=allow_root, **opts)
    try:
        return timm.data.create_dataset(data.dataset, root=root, split=split, is_training=is_training,
                                        class_map=class_map or '', **opts, **extra)
    except (AssertionError, FileNotFoundError, RuntimeError, ImportError) as e:
        raise UserError(f'cannot open split {split!r} of dataset {data.dataset} at {root}: {e}.') from e


def _training_root(data: DataOptions) -> str:
    if not data.root:
        raise UserError('no dataset given: pass the dataset folder with --data-dir DIR (or as the first argument).')
    if not data.dataset and not os.path.exists(data.root):
        raise UserError(f'dataset folder {data.root} does not exist; pass an ImageFolder root that holds '
                        f'{data.train_split}/ and a validation split.')
    return data.root


def open_datasets(data: DataOptions, ranks: Ranks):
    """Train and eval datasets with one class map (the training split's), images checked before the first step;
    returns (train, eval, class_to_idx)."""
    root = _training_root(data)
    train_extra = dataset_options(data.dataset, data.extras, TRAIN_DATASET_OPTIONS, True)
    eval_extra = dataset_options(data.dataset, data.extras, TRAIN_DATASET_OPTIONS, False)
    dataset_train = open_dataset(data, root, data.train_split, True, train_extra, class_map=data.class_map,
                                 split_flag='--train-split')
    class_to_idx = class_to_idx_of(dataset_train)
    dataset_eval = open_dataset(data, root, data.val_split, False, eval_extra, class_map=class_to_idx or data.class_map,
                                split_flag='--val-split')
    if ranks.is_primary:
        paths = [p for ds in (dataset_train, dataset_eval)
                 for p, _ in getattr(getattr(ds, 'reader', None), 'samples', [])]
        start = time.time()
        check_images(paths, data.check_images, data.input_img_mode, workers=max(1, data.workers))
        if data.check_images != 'none' and paths:
            _logger.info(f'Checked {len(paths)} image files ({data.check_images}) in {time.time() - start:.1f}s.')
    return dataset_train, dataset_eval, class_to_idx


def resolve_num_classes(num_classes: Optional[int], dataset_train) -> int:
    """``--num-classes``, else the training set's classes; fewer than the training set has is refused."""
    n_data = len(class_to_idx_of(dataset_train))
    if num_classes is None:
        if not n_data:
            raise UserError('cannot infer the number of classes from this dataset; pass --num-classes.')
        return n_data
    if n_data and n_data > num_classes:
        raise UserError(f'the training set has {n_data} classes but --num-classes is {num_classes}; '
                        f'set --num-classes {n_data}.')
    return num_classes


def resolve_eval_num_classes(num_classes: Optional[int], run_map: Optional[Dict[str, int]], dataset) -> int:
    """--num-classes, else the training run's class map, else the dataset's classes (any dataset: folder, torch/,
    hfds/ ...; a dataset without a ``reader`` included)."""
    if num_classes is not None:
        return num_classes
    n = len(run_map or class_to_idx_of(dataset))
    if not n:
        raise UserError(f'cannot infer the number of classes of this {type(dataset).__name__}; pass --num-classes.')
    return n


# ---------------------------------------------------------------- model

def create_model_from(options: ModelOptions, num_classes: int, training: bool = True) -> nn.Module:
    """:func:`lt_timm.modeling.create_model` with timm's train.py / validate.py model flags (``--model-kwargs``,
    BatchNorm and drop overrides when ``training``, ``--pretrained-path`` head adaptation), then
    ``--initial-checkpoint`` (training)."""
    kwargs = dict(global_pool=options.gp)
    if training:
        kwargs.update(drop_rate=options.drop, drop_path_rate=options.drop_path, drop_block_rate=options.drop_block,
                      bn_momentum=options.bn_momentum, bn_eps=options.bn_eps)
    model_kwargs = dict(options.model_kwargs or {})
    clash = sorted(set(model_kwargs) & (set(kwargs) | {'pretrained', 'in_chans', 'num_classes'}))
    if clash:
        raise UserError(f'--model-kwargs sets {clash}, which have their own flags; use those flags instead.')
    return create_model(options.model, num_classes, options.in_chans, pretrained=options.pretrained,
                        pretrained_path=options.pretrained_path,
                        initial_checkpoint=options.initial_checkpoint if training else '', **kwargs, **model_kwargs)


def _init_head(model: nn.Module, scale: Optional[float], bias: Optional[float]) -> None:
    if scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(scale)
            model.get_classifier().bias.mul_(scale)
    if bias is not None:
        nn.init.constant_(model.get_classifier().bias, bias)


def prepare_model(options: ModelOptions, model: nn.Module, device: torch.device, model_dtype: Optional[torch.dtype],
                  ranks: Ranks = Ranks()) -> nn.Module:
    """timm's model setup after creation: head init, gradient checkpointing, split/sync BatchNorm, device, dtype."""
    _init_head(model, options.head_init_scale, options.head_init_bias)
    if options.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if options.split_bn:
        if not (options.aug_splits > 1 or options.resplit):
            raise UserError('--split-bn needs --aug-splits > 1 or --resplit (one BatchNorm per augmentation split).')
        model = convert_splitbn_model(model, max(options.aug_splits, 2))
    model.to(device=device, dtype=model_dtype)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    if ranks.distributed and options.sync_bn:
        if options.split_bn:
            raise UserError('--sync-bn cannot be combined with --split-bn; use one of them.')
        if device.type == 'cpu':
            raise UserError('--sync-bn needs GPU processes (torch\'s SyncBatchNorm does not run on the CPU); drop it, '
                            '--dist-bn reduce (the default) averages BatchNorm statistics over the ranks each epoch.')
        model = convert_sync_batchnorm(model)
        if ranks.is_primary:
            _logger.info('Converted model to use Synchronized BatchNorm.')
    return model


# ---------------------------------------------------------------- autocast

def autocast_and_scaler(precision: Precision, device: torch.device) -> Tuple[Any, Optional[NativeScaler]]:
    """(autocast context factory, loss scaler) as timm's train.py: a scaler only for float16 on CUDA."""
    if not precision.amp:
        return suppress, None
    dtype = torch.bfloat16 if precision.amp_dtype == 'bfloat16' else torch.float16
    scaler = NativeScaler(device=device.type) if device.type == 'cuda' and dtype == torch.float16 else None
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


# ---------------------------------------------------------------- loaders

def _train_loader(options: LoaderOptions, dataset, data_config, collate_fn, common: dict):
    """The training loader: timm's, replicas grouped with ``--aug-repeats``; workers are re-created each epoch so
    that their seeds derive from (seed, epoch): ``--resume`` is exact."""
    o = options
    interpolation = data_config['interpolation'] if o.no_aug or not o.train_interpolation else o.train_interpolation
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=o.batch_size, is_training=True,
        no_aug=o.no_aug, re_prob=o.reprob, re_mode=o.remode, re_count=o.recount, re_split=o.resplit,
        train_crop_mode=o.train_crop_mode, pad_crop=o.train_crop_pad, cutout=o.cutout, scale=o.scale,
        ratio=o.ratio, hflip=o.hflip, vflip=o.vflip, color_jitter=o.color_jitter,
        color_jitter_prob=o.color_jitter_prob, grayscale_prob=o.grayscale_prob,
        gaussian_blur_prob=o.gaussian_blur_prob, auto_augment=o.aa, worker_seeding=o.worker_seeding,
        use_multi_epochs_loader=o.use_multi_epochs_loader, num_aug_repeats=o.aug_repeats,
        num_aug_splits=o.aug_splits, interpolation=interpolation, collate_fn=collate_fn, aug_repeat_mode=o.lt_epoch,
        seed=o.seed, decode_once=not o.no_decode_once, persistent_workers=False, **common)


def create_loaders(options: LoaderOptions, dataset_train, dataset_eval, data_config, collate_fn, device: torch.device,
                   model_dtype: Optional[torch.dtype] = None, ranks: Ranks = Ranks()):
    """(training loader, evaluation loader) of train.py; a training set smaller than one batch is refused."""
    common = dict(mean=data_config['mean'], std=data_config['std'], num_workers=options.workers,
                  distributed=ranks.distributed, pin_memory=options.pin_mem, device=device,
                  use_prefetcher=options.prefetcher, img_dtype=model_dtype or torch.float32)
    loader_train = _train_loader(options, dataset_train, data_config, collate_fn, common)
    if len(loader_train) == 0:
        raise UserError(f'the training set has {len(dataset_train)} images, fewer than one batch of '
                        f'{options.batch_size} per process; lower -b/--batch-size or add data.')
    loader_eval = create_loader(
        dataset_eval, input_size=data_config['input_size'],
        batch_size=options.validation_batch_size or options.batch_size, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
        persistent_workers=options.workers > 0, **common)  # timm <= 1.0.27 asks torch for persistence without workers
    return loader_train, loader_eval
