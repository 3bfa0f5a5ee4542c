"""The replica layout of a LossTransform batch — defined here once.

A batch of ``B`` rows holds ``ceil(B / m)`` consecutive blocks, each the replicas of one source image
(``m = --aug-repeats``; fewer in at most two blocks when ``m`` does not divide ``B``). For an even ``B`` the block
sizes read the same forwards and backwards (a palindrome), with the short block(s) in the middle::

    B = 9,  m = 3  ->  [3 3 3]        rows [0 1 2 | 3 4 5 | 6 7 8]
    B = 8,  m = 3  ->  [3 2 3]        rows [0 1 2 | 3 4 | 5 6 7]          groups [0 0 0 1 1 2 2 2]
    B = 10, m = 3  ->  [3 2 2 3]
    B = 7,  m = 3  ->  [3 3 1]        (odd: the short block last)

Why a palindrome: timm's batch-mode mixup/cutmix (``Mixup`` and ``FastCollateMixup``, ``mode='batch'``) mixes row
``i`` with row ``B - 1 - i`` with one lambda (and one CutMix box) for the whole batch. Reversing a palindromic
layout maps every block onto a block of the same size, row for row, so every replica of an image is mixed with a
replica of *one* partner image (a middle block with itself, i.e. with other replicas of the same image) and all
replicas of an image keep identical soft targets — for every batch size timm's mixup accepts (even ones), in
train.py and in the launcher with stock timm's own mixup, with and without the prefetcher. When ``m`` divides ``B``
the layout is the plain one.

The sampler uses :func:`block_sizes` to decide how many replicas each image of a batch gets; the loss uses
:func:`block_runs` (runs of equal-size blocks, at most three: static shapes, no index tensors) to find which rows to
average into a consensus; :func:`replica_groups` gives the same as one group id per row, for code that needs ids.
Nothing else in lt_timm may assume the layout.
"""
from typing import List, Optional, Tuple

import torch

__all__ = ['block_sizes', 'block_runs', 'num_blocks', 'replica_groups', 'rows_per_step', 'EPOCH_MODES']

# How an epoch of repeated augmentation is sized (see :func:`rows_per_step` and ``lt_timm.sampler``).
EPOCH_MODES = ('v1', 'full', 'original')


def _check(batch_size: int, num_repeats: int) -> None:
    if num_repeats < 1:
        raise ValueError(f'num_repeats must be >= 1, got {num_repeats}; use 1 to disable repeats.')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}.')


def block_sizes(batch_size: int, num_repeats: int) -> List[int]:
    """Number of replicas of each image in a batch, in row order (``ceil(B / m)`` images; see the module doc)."""
    _check(batch_size, num_repeats)
    m = num_repeats
    full, rest = batch_size // m, batch_size % m
    if not rest:
        return [m] * full
    if batch_size % 2:  # timm's mixup needs an even batch: an odd one keeps its short block last
        return [m] * full + [rest]
    # even: a palindrome, the short block(s) in the middle (B even and full odd imply m + rest even)
    middle = [rest] if full % 2 == 0 else [(m + rest) // 2] * 2
    half = [m] * (full // 2)
    return half + middle + half


def block_runs(batch_size: int, num_repeats: int) -> List[Tuple[int, int]]:
    """The blocks as maximal runs ``(number of blocks, rows per block)`` in row order (at most three runs).

    ``B = 10, m = 3`` (blocks ``[3 2 2 3]``) gives ``[(1, 3), (2, 2), (1, 3)]``: rows ``0:3`` are one image,
    rows ``3:7`` two images of 2 rows, rows ``7:10`` one image. A run reshapes to ``(blocks, rows, ...)``.
    """
    runs: List[Tuple[int, int]] = []
    for size in block_sizes(batch_size, num_repeats):
        if runs and runs[-1][1] == size:
            runs[-1] = (runs[-1][0] + 1, size)
        else:
            runs.append((1, size))
    return runs


def num_blocks(batch_size: int, num_repeats: int) -> int:
    """Number of distinct source images in a batch."""
    return len(block_sizes(batch_size, num_repeats))


def replica_groups(batch_size: int, num_repeats: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Group id (source image index within the batch) of every row, shape ``(batch_size,)``."""
    sizes = block_sizes(batch_size, num_repeats)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def rows_per_step(batch_size: int, num_repeats: int, epoch_mode: str = 'v1') -> int:
    """Rows of one training step for ``-b batch_size``.

    ``v1`` and ``full``: ``-b`` counts rows (about ``batch_size / m`` distinct images per step). ``original`` (the
    paper's first LossTransform): ``-b`` counts images, each with ``m`` replicas, so a step has ``m * batch_size`` rows.
    """
    _check(batch_size, num_repeats)
    if epoch_mode not in EPOCH_MODES:
        raise ValueError(f'epoch mode must be one of {EPOCH_MODES}, got {epoch_mode!r}.')
    return batch_size * num_repeats if epoch_mode == 'original' else batch_size
