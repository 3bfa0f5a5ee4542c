"""``create_loader``: timm's loader factory with replica-grouped repeated augmentation.

A drop-in for :func:`timm.data.create_loader`: same arguments and behaviour, except that with
``is_training=True`` and ``num_aug_repeats = m > 0`` the batches come from
:class:`~lt_timm.sampler.RepeatedAugBatchSampler` — in one process too (stock timm asserts), with all
``m`` replicas of an image in the same batch on the same rank. Each replica is its own ``dataset[i]``
call through the training transform, so replicas are augmented independently.

timm builds everything else (transforms, collate, mixup collate, prefetcher, random erasing); only the
batch order is replaced.
"""
import logging
from typing import Optional

import torch
import timm.data

from .layout import mixup_consistent
from .sampler import RepeatedAugBatchSampler

__all__ = ['create_loader']

_logger = logging.getLogger(__name__)


def create_loader(
        dataset,
        input_size,
        batch_size: int,
        is_training: bool = False,
        num_aug_repeats: int = 0,
        distributed: bool = False,
        aug_repeat_mode: str = 'v1',
        seed: int = 0,
        world_size: Optional[int] = None,
        rank: Optional[int] = None,
        **kwargs,
):
    """Create a timm data loader; training loaders with ``num_aug_repeats > 0`` group replicas.

    Args (beyond :func:`timm.data.create_loader`'s, which are all accepted and passed through):
        aug_repeat_mode: ``'v1'`` (same samples per epoch as plain training) or ``'full'`` (each image m times).
        seed: shuffling seed shared by all ranks; the order is a function of ``(seed, epoch)``.
        world_size, rank: override the DDP world size/rank (default: from torch.distributed when ``distributed``).
    """
    if not (is_training and num_aug_repeats):
        return timm.data.create_loader(
            dataset, input_size, batch_size, is_training=is_training,
            num_aug_repeats=num_aug_repeats, distributed=distributed, **kwargs)

    if float(num_aug_repeats) != int(num_aug_repeats) or int(num_aug_repeats) < 1:
        raise ValueError(f'--aug-repeats must be a whole number >= 1 for grouped repeats, got {num_aug_repeats}.')
    num_aug_repeats = int(num_aug_repeats)
    if kwargs.get('num_aug_splits'):
        raise ValueError('--aug-splits (AugMix/JSD splits) cannot be combined with --aug-repeats; use one of them.')
    if kwargs.get('input_size_choices') is not None:
        raise ValueError('scheduled input sizes (--train-img-sizes) are not supported with --aug-repeats.')
    if kwargs.get('use_multi_epochs_loader'):
        raise ValueError('--use-multi-epochs-loader is not supported with --aug-repeats (it caches the batch order).')
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise ValueError('--aug-repeats needs a map-style dataset (folder/torch datasets), not an iterable one.')
    if not distributed:
        world_size, rank = 1, 0

    batch_sampler = RepeatedAugBatchSampler(
        len(dataset), batch_size, num_aug_repeats, num_replicas=world_size, rank=rank,
        epoch_mode=aug_repeat_mode, seed=seed)
    collate_fn = kwargs.get('collate_fn')
    if collate_fn is not None and getattr(collate_fn, 'mode', None) == 'batch' \
            and not mixup_consistent(batch_size, num_aug_repeats):
        _logger.warning(
            f'batch size {batch_size} is not a multiple of --aug-repeats {num_aug_repeats}: batch-mode mixup '
            f'will mix some replicas of an image with different partner images.')

    # timm builds transforms, collate and prefetcher; we only swap in the grouped batch order.
    loader = timm.data.create_loader(
        dataset, input_size, batch_size, is_training=True, num_aug_repeats=0, distributed=False, **kwargs)
    inner = loader.loader if isinstance(loader, timm.data.loader.PrefetchLoader) else loader
    grouped = torch.utils.data.DataLoader(
        inner.dataset,
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
