"""Grouped repeated-augmentation batch sampler (single process and DDP).

Unlike timm's ``RepeatAugSampler`` (DeiT's RASampler), which deals the replicas of an image to
*different* ranks, this sampler puts all replicas of an image in the same batch on the same rank,
in the layout of :mod:`lt_timm.layout`, so a loss can compare them.

Epoch modes:
    ``v1``   (LossTransform-v1, default): an epoch holds as many samples as a plain epoch
             (``ceil(N / world_size)`` per rank), i.e. about ``N / m`` distinct images, each ``m`` times.
             Same cost per epoch as plain training.
    ``full``: every image appears ``m`` times per epoch (``m`` x the cost of a plain epoch).
    ``original`` (the paper's first LossTransform): as ``full`` — every image ``m`` times per epoch — with batches
             of ``-b`` images x ``m`` replicas, so an epoch has as many steps as plain training, each ``m`` x the
             rows. The sampler takes the rows per batch: ``layout.rows_per_step(b, m, 'original')``.

    ==========  ================  ===========================  =====================  ========================
    mode        rows per step     distinct images per step     steps per epoch        compute per epoch
    ==========  ================  ===========================  =====================  ========================
    plain       ``b``             ``b``                        ``N / b``              1x
    v1          ``b``             ``b / m``                    ``N / b``              1x (``N / m`` images)
    full        ``b``             ``b / m``                    ``m N / b``            ``m`` x
    original    ``m b``           ``b``                        ``N / b``              ``m`` x
    ==========  ================  ===========================  =====================  ========================
"""
import math
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .layout import EPOCH_MODES, block_sizes

__all__ = ['RepeatedAugBatchSampler', 'EPOCH_MODES']


class RepeatedAugBatchSampler(Sampler[List[int]]):
    """Yields batches of dataset indices where each image fills one block of ``num_repeats`` rows.

    Deterministic per ``(seed, epoch)``; ``set_epoch`` reshuffles (as with ``DistributedSampler``), and
    an epoch that was not set explicitly advances by one after each full pass, so scripts that never
    call ``set_epoch`` in a single process still reshuffle. Every rank yields the same number of
    batches; the last incomplete batch is dropped, as timm does for training loaders.

    Args:
        dataset_len: number of source images ``N``.
        batch_size: rows per batch on each rank (``original``: images x ``num_repeats``).
        num_repeats: replicas per image ``m`` (``--aug-repeats``).
        num_replicas, rank: DDP world size and rank (default: from ``torch.distributed`` if initialised).
        shuffle: shuffle images each epoch.
        epoch_mode: ``'v1'``, ``'full'`` or ``'original'``.
        seed: base seed, shared by all ranks.
    """

    def __init__(
            self,
            dataset_len: int,
            batch_size: int,
            num_repeats: int,
            num_replicas: Optional[int] = None,
            rank: Optional[int] = None,
            shuffle: bool = True,
            epoch_mode: str = 'v1',
            seed: int = 0,
    ):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not isinstance(num_repeats, int) or num_repeats < 1:
            raise ValueError(f'--aug-repeats must be an integer >= 1, got {num_repeats!r}.')
        if num_repeats > batch_size:
            raise ValueError(
                f'--aug-repeats {num_repeats} is larger than the batch size {batch_size}: all replicas of an '
                f'image must fit in one batch; raise -b/--batch-size or lower --aug-repeats.')
        if epoch_mode not in EPOCH_MODES:
            raise ValueError(f'epoch mode must be one of {EPOCH_MODES}, got {epoch_mode!r}.')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} out of range for world size {num_replicas}.')
        self.dataset_len = int(dataset_len)
        self.batch_size = batch_size
        self.num_repeats = num_repeats
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.epoch_mode = epoch_mode
        self.seed = int(seed)
        self.epoch = 0
        self.blocks = block_sizes(batch_size, num_repeats)

        if epoch_mode == 'original' and batch_size % num_repeats:
            raise ValueError(f'epoch mode original takes whole images per batch: {batch_size} rows is not a '
                             f'multiple of --aug-repeats {num_repeats}.')
        if epoch_mode == 'original':  # each rank's share of images, as a plain DistributedSampler, m rows each
            self.num_samples = math.ceil(self.dataset_len / num_replicas) * num_repeats
        else:
            repeats_per_epoch = 1 if epoch_mode == 'v1' else num_repeats
            self.num_samples = math.ceil(self.dataset_len * repeats_per_epoch / num_replicas)
        self.num_batches = self.num_samples // batch_size
        if self.num_batches == 0:
            raise ValueError(
                f'the training set has {self.dataset_len} images, too few for one batch of {batch_size} per rank '
                f'on {num_replicas} rank(s) in epoch mode {epoch_mode!r}; lower -b/--batch-size or add data.')

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _image_order(self, count: int) -> torch.Tensor:
        """``count`` image indices for this epoch: successive permutations of the dataset, cut to length."""
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        perms = []
        total = 0
        while total < count:
            perms.append(torch.randperm(self.dataset_len, generator=g) if self.shuffle else torch.arange(self.dataset_len))
            total += self.dataset_len
        return torch.cat(perms)[:count]

    def __iter__(self) -> Iterator[List[int]]:
        per_batch = len(self.blocks)
        images = self._image_order(self.num_batches * self.num_replicas * per_batch).tolist()
        for b in range(self.num_batches):
            start = (b * self.num_replicas + self.rank) * per_batch
            batch = []
            for image, size in zip(images[start:start + per_batch], self.blocks):
                batch.extend([image] * size)
            yield batch
        self.epoch += 1  # overwritten by set_epoch() when the training loop calls it
