"""The replica layout of a LossTransform batch — defined here once.

A batch of ``B`` rows holds consecutive blocks of ``m`` replicas of one source image
(``m = --aug-repeats``); the last block is shorter when ``m`` does not divide ``B``::

    B = 8, m = 3  ->  rows [0 1 2 | 3 4 5 | 6 7]  ->  groups [0 0 0 1 1 1 2 2]

The sampler uses :func:`block_sizes` to decide how many replicas each image of a batch gets;
the loss uses :func:`replica_groups` to find which rows to average into a consensus. Nothing
else in lt_timm may assume the layout.

Mixup/CutMix in timm's ``batch`` mode pairs row ``i`` with row ``B - 1 - i``: when ``m`` divides
``B`` this maps block ``g`` onto block ``G - 1 - g`` row by row, so every replica of an image is
mixed with a replica of the *same* partner image with the same lambda (and, for CutMix, the
same box), and replicas keep identical soft targets. When ``m`` does not divide ``B`` partner
blocks straddle two images; :func:`mixup_consistent` tells which case a batch size is in.
"""
from typing import List, Optional

import torch

__all__ = ['block_sizes', 'num_blocks', 'replica_groups', 'mixup_consistent', 'rows_per_step', 'EPOCH_MODES']

# How an epoch of repeated augmentation is sized (see :func:`rows_per_step` and ``lt_timm.sampler``).
EPOCH_MODES = ('v1', 'full', 'original')


def _check(batch_size: int, num_repeats: int) -> None:
    if num_repeats < 1:
        raise ValueError(f'num_repeats must be >= 1, got {num_repeats}; use 1 to disable repeats.')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}.')


def block_sizes(batch_size: int, num_repeats: int) -> List[int]:
    """Number of replicas of each image in a batch, in row order."""
    _check(batch_size, num_repeats)
    full, rest = divmod(batch_size, num_repeats)
    return [num_repeats] * full + ([rest] if rest else [])


def num_blocks(batch_size: int, num_repeats: int) -> int:
    """Number of distinct source images in a batch."""
    _check(batch_size, num_repeats)
    return -(-batch_size // num_repeats)


def rows_per_step(batch_size: int, num_repeats: int, epoch_mode: str = 'v1') -> int:
    """Rows of one training step for ``-b batch_size``.

    ``v1`` and ``full``: ``-b`` counts rows (``batch_size / m`` distinct images per step). ``original`` (the paper's
    first LossTransform): ``-b`` counts images, each with ``m`` replicas, so a step has ``m * batch_size`` rows.
    """
    _check(batch_size, num_repeats)
    if epoch_mode not in EPOCH_MODES:
        raise ValueError(f'epoch mode must be one of {EPOCH_MODES}, got {epoch_mode!r}.')
    return batch_size * num_repeats if epoch_mode == 'original' else batch_size


def replica_groups(batch_size: int, num_repeats: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Group id (source image index within the batch) of every row, shape ``(batch_size,)``."""
    _check(batch_size, num_repeats)
    return torch.arange(batch_size, device=device) // num_repeats


def mixup_consistent(batch_size: int, num_repeats: int) -> bool:
    """True when timm's batch-mode mixup pairs all replicas of an image with replicas of one partner image."""
    _check(batch_size, num_repeats)
    return batch_size % num_repeats == 0
