"""The batch layout: a palindrome of replica blocks, so timm's batch-mode mixup/cutmix keeps replicas consistent."""
import math
import random

import numpy as np
import pytest
import torch
from timm.data import FastCollateMixup, Mixup

from lt_timm.layout import block_sizes, num_blocks, replica_groups


def palindromes(total, max_part):
    """Every palindromic composition of ``total`` into parts of 1..max_part (brute force, small totals)."""
    def halves(rest):
        yield []
        for p in range(1, min(max_part, rest) + 1):
            for h in halves(rest - p):
                yield [p] + h
    out = []
    for half in halves(total // 2):
        middle = total - 2 * sum(half)
        if middle == 0:
            out.append(half + half[::-1])
        elif 1 <= middle <= max_part:
            out.append(half + [middle] + half[::-1])
    return out


@pytest.mark.parametrize('m', range(1, 9))
def test_block_sizes_properties(m):
    for b in range(1, 70):
        sizes = block_sizes(b, m)
        assert sum(sizes) == b and all(1 <= s <= m for s in sizes)
        assert len(sizes) == math.ceil(b / m) == num_blocks(b, m)  # as few images per batch as possible
        if b % m == 0:
            assert sizes == [m] * (b // m)  # the plain layout
        elif b % 2 == 0:
            assert sizes == sizes[::-1]  # palindrome: reversal maps blocks onto equal blocks (timm's mixup)
            assert sum(s < m for s in sizes) <= 2
            if b <= 22:
                assert len(sizes) == min(len(p) for p in palindromes(b, m))
        else:
            assert sizes == [m] * (b // m) + [b % m]  # odd batches (no batch-mode mixup): short block last
        groups = replica_groups(b, m).tolist()
        assert groups == [g for g, s in enumerate(sizes) for _ in range(s)]


PAIRS = [(256, 3), (128, 3), (252, 3), (8, 3), (10, 3), (14, 4), (22, 4), (12, 5), (16, 5), (18, 7), (20, 3),
         (4, 2), (6, 4), (30, 8), (100, 3), (64, 6)]


def grouped_batch(b, m, seed, size=8, classes=10):
    """Rows laid out as lt_timm.layout says; each image a distinct random uint8 picture and label."""
    rng = np.random.default_rng(seed)
    sizes = block_sizes(b, m)
    pics = rng.integers(0, 256, (len(sizes), 3, size, size), dtype=np.uint8)
    labels = rng.integers(0, classes, len(sizes))
    rows = [(pics[g], int(labels[g])) for g, s in enumerate(sizes) for _ in range(s)]
    return rows, sizes


def assert_blocks_consistent(x, target, sizes):
    start = 0
    for s in sizes:
        for r in range(start + 1, start + s):
            assert torch.equal(x[r], x[start]), (sizes, start, r)  # same partner image, lambda and box
            assert torch.equal(target[r], target[start]), (sizes, start, r)  # same soft target
        start += s


@pytest.mark.parametrize('b,m', PAIRS)
@pytest.mark.parametrize('alphas', [(1.0, 0.0), (0.0, 1.0), (0.8, 1.0)], ids=['mixup', 'cutmix', 'both'])
def test_timm_batch_mixup_keeps_replicas_consistent(b, m, alphas):
    mixed_any = False
    for seed in range(6):
        random.seed(seed)
        np.random.seed(seed)
        rows, sizes = grouped_batch(b, m, seed)
        kw = dict(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], label_smoothing=0.1, num_classes=10, mode='batch')
        # collate path (the prefetcher's FastCollateMixup, used in loader workers)
        x, target = FastCollateMixup(**kw)(rows)
        assert_blocks_consistent(x, target, sizes)
        # tensor path (Mixup, used without the prefetcher and by the launcher's stock train.py)
        xt = torch.stack([torch.from_numpy(p).float() for p, _ in rows])
        yt = torch.tensor([y for _, y in rows])
        xt2, target2 = Mixup(**kw)(xt.clone(), yt)
        assert_blocks_consistent(xt2, target2, sizes)
        mixed_any |= not torch.equal(xt2, xt)
    assert mixed_any
