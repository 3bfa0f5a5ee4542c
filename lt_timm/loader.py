"""``create_loader``: timm's loader factory with replica-grouped repeated augmentation.

A drop-in for :func:`timm.data.create_loader`: same arguments and behaviour, except that with
``is_training=True`` and ``num_aug_repeats = m > 0`` the batches come from
:class:`~lt_timm.sampler.RepeatedAugBatchSampler` — in one process too (stock timm asserts), with all
``m`` replicas of an image in the same batch on the same rank.

Decode once, augment ``m`` times (``decode_once=True``, the default): the grouped loader reads and decodes each image
once per replica group and applies the training transform ``m`` times to it, each call with fresh randomness, so
replicas are augmented independently (:mod:`lt_timm.decode_once`; under the same seeds the batches equal per-replica
loading). This works for timm's ``ImageDataset`` and lt-timm's ``StrictImageDataset`` (folder datasets); any other
dataset (torchvision, custom) falls back, with one log line, to per-replica loading: each replica its own
``dataset[i]`` call through the training transform.

timm builds everything else (transforms, collate, mixup collate, prefetcher, random erasing); only the
batch order is replaced. Two CIFAR-style augmentations are added on top of timm's train transform
(:mod:`lt_timm.transforms`): ``train_crop_mode='pad'`` (pad-and-crop, ``pad_crop`` pixels) and ``cutout``.
"""
import inspect
import logging
from typing import Optional

import torch
import timm.data
from torchvision import transforms as T

from .decode_once import decode_once_dataset
from .layout import rows_per_step
from .sampler import RepeatedAugBatchSampler
from .transforms import apply_cifar_augmentation

__all__ = ['create_loader']

_logger = logging.getLogger(__name__)


def create_loader(
        dataset,
        input_size,
        batch_size: int,
        is_training: bool = False,
        *timm_args,
        num_aug_repeats: int = 0,
        distributed: bool = False,
        aug_repeat_mode: str = 'v1',
        seed: int = 0,
        world_size: Optional[int] = None,
        rank: Optional[int] = None,
        pad_crop: int = 4,
        cutout: int = 0,
        decode_once: bool = True,
        **kwargs,
):
    """Create a timm data loader; training loaders with ``num_aug_repeats > 0`` group replicas.

    Positional arguments are :func:`timm.data.create_loader`'s, in its order (``timm_args`` continue after
    ``is_training``: ``no_aug``, ``re_prob``, ...), so a call written for timm works unchanged; lt-timm's own
    parameters are keyword-only.

    Args (beyond :func:`timm.data.create_loader`'s, which are all accepted and passed through):
        aug_repeat_mode: ``'v1'`` (same samples per epoch as plain training), ``'full'`` (each image m times) or
            ``'original'`` (``batch_size`` images x m replicas per step); see :mod:`lt_timm.sampler`.
        seed: shuffling seed shared by all ranks; the order is a function of ``(seed, epoch)``.
        world_size, rank: override the DDP world size/rank (default: from torch.distributed when ``distributed``).
        pad_crop: padding in pixels when ``train_crop_mode='pad'`` (CIFAR pad-and-crop).
        cutout: Cutout square side in pixels for training (0: off).
        decode_once: grouped training loaders read and decode each image once per replica group and apply the
            transform ``m`` times (:mod:`lt_timm.decode_once`); ``False``: each replica is its own ``dataset[i]``.
            Datasets that cannot be split into read/decode + transform always load per replica (logged once).
    """
    if timm_args:
        kwargs = _name_timm_positionals(timm_args, kwargs)
        num_aug_repeats = kwargs.pop('num_aug_repeats', num_aug_repeats)
        distributed = kwargs.pop('distributed', distributed)
    pad = pad_crop if is_training and kwargs.get('train_crop_mode') == 'pad' else 0
    if pad:
        kwargs['train_crop_mode'] = None  # timm builds its random-resized crop, replaced below
    if not (is_training and num_aug_repeats):
        loader = timm.data.create_loader(
            dataset, input_size, batch_size, is_training=is_training,
            num_aug_repeats=num_aug_repeats, distributed=distributed, **kwargs)
        _add_cifar_augmentation(dataset, is_training, input_size, pad, cutout, kwargs)
        return loader

    num_aug_repeats = _check_grouped(dataset, num_aug_repeats, kwargs)
    if not distributed:
        world_size, rank = 1, 0
    batch_size = rows_per_step(batch_size, num_aug_repeats, aug_repeat_mode)
    batch_sampler = RepeatedAugBatchSampler(
        len(dataset), batch_size, num_aug_repeats, num_replicas=world_size, rank=rank,
        epoch_mode=aug_repeat_mode, seed=seed)
    # timm builds transforms, collate and prefetcher; we only swap in the grouped batch order.
    loader = timm.data.create_loader(
        dataset, input_size, batch_size, is_training=True, num_aug_repeats=0, distributed=False, **kwargs)
    _add_cifar_augmentation(dataset, is_training, input_size, pad, cutout, kwargs)
    return _with_grouped_batches(loader, batch_sampler, num_aug_repeats, decode_once)


def _check_grouped(dataset, num_aug_repeats, kwargs) -> int:
    """What grouped repeats cannot be combined with (one ValueError each); returns ``m`` as an int."""
    if float(num_aug_repeats) != int(num_aug_repeats) or int(num_aug_repeats) < 1:
        raise ValueError(f'--aug-repeats must be a whole number >= 1 for grouped repeats, got {num_aug_repeats}.')
    if kwargs.get('num_aug_splits'):
        raise ValueError('--aug-splits (AugMix/JSD splits) cannot be combined with --aug-repeats; use one of them.')
    if kwargs.get('input_size_choices') is not None:
        raise ValueError('scheduled input sizes (--train-img-sizes) are not supported with --aug-repeats.')
    if kwargs.get('use_multi_epochs_loader'):
        raise ValueError('--use-multi-epochs-loader is not supported with --aug-repeats (it caches the batch order).')
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise ValueError('--aug-repeats needs a map-style dataset (folder/torch datasets), not an iterable one.')
    return int(num_aug_repeats)


def _with_grouped_batches(loader, batch_sampler: RepeatedAugBatchSampler, num_aug_repeats: int, decode_once: bool):
    """timm's ``loader`` (or the one inside its PrefetchLoader) rebuilt on the grouped ``batch_sampler``, each image
    decoded once per replica group when ``decode_once`` and the dataset allows it."""
    inner = loader.loader if isinstance(loader, timm.data.loader.PrefetchLoader) else loader
    grouped_dataset = inner.dataset
    if decode_once:
        wrapped = decode_once_dataset(grouped_dataset)
        if wrapped is None:
            _logger.info(f'lt_timm.create_loader: decode-once is off for {type(grouped_dataset).__name__} (not a timm '
                         f'ImageDataset, cannot be split into read/decode + transform); each of the {num_aug_repeats} '
                         f'replicas of an image is loaded and decoded separately.')
        else:
            grouped_dataset = wrapped
    grouped = torch.utils.data.DataLoader(
        grouped_dataset,
        batch_sampler=batch_sampler,
        num_workers=inner.num_workers,
        collate_fn=inner.collate_fn,
        pin_memory=inner.pin_memory,
        worker_init_fn=inner.worker_init_fn,
        persistent_workers=inner.persistent_workers,
    )
    if inner is loader:
        return grouped
    loader.loader = grouped
    return loader


def _name_timm_positionals(values, kwargs) -> dict:
    """Name positional arguments after ``is_training`` by :func:`timm.data.create_loader`'s signature."""
    names = list(inspect.signature(timm.data.create_loader).parameters)[4:]
    if len(values) > len(names):
        raise TypeError(f'create_loader() takes at most {len(names) + 4} positional arguments '
                        f'({len(values) + 4} given)')
    named = dict(kwargs)
    for name, value in zip(names, values):
        if name in named:
            raise TypeError(f'create_loader() got multiple values for argument {name!r}')
        named[name] = value
    return named


def _add_cifar_augmentation(dataset, is_training: bool, input_size, pad: int, cutout: int, kwargs) -> None:
    """Swap pad-and-crop / Cutout into the train transform timm just set on ``dataset``."""
    if not is_training or not (pad or cutout) or kwargs.get('no_aug'):
        return
    if not isinstance(dataset.transform, T.Compose):
        raise ValueError('--train-crop-mode pad and --cutout need a plain train transform; they cannot be combined '
                         'with --aug-splits.')
    if not isinstance(input_size, (tuple, list)):
        input_size = (3, input_size, input_size)
    dataset.transform = apply_cifar_augmentation(
        dataset.transform, input_size, pad_crop=pad, cutout=cutout,
        mean=kwargs.get('mean', timm.data.IMAGENET_DEFAULT_MEAN), use_prefetcher=kwargs.get('use_prefetcher', True))
