"""RepeatedAugBatchSampler, all ranks simulated in one process (num_replicas=W, rank=r)."""
import random

import pytest

from lt_timm import RepeatedAugBatchSampler
from lt_timm.layout import block_sizes


def expected_num_batches(n, batch_size, m, world, mode):
    per_rank = -(-n * (1 if mode == 'v1' else m) // world)  # ceil
    return per_rank // batch_size


def all_ranks(n, batch_size, m, world, mode, seed=0, epoch=None):
    out = []
    for r in range(world):
        s = RepeatedAugBatchSampler(n, batch_size, m, num_replicas=world, rank=r, epoch_mode=mode, seed=seed)
        if epoch is not None:
            s.set_epoch(epoch)
        out.append((s, list(s)))
    return out


def split_blocks(batch, sizes):
    blocks, pos = [], 0
    for size in sizes:
        blocks.append(batch[pos:pos + size])
        pos += size
    assert pos == len(batch)
    return blocks


def random_configs(count, seed):
    rng = random.Random(seed)
    cfgs = []
    while len(cfgs) < count:
        world = rng.randint(1, 4)
        batch_size = rng.randint(1, 13)
        m = rng.randint(1, min(4, batch_size))
        n = rng.choice([rng.randint(1, 40), rng.randint(1, 400), rng.choice([97, 101, 127, 211, 1009])])
        mode = rng.choice(['v1', 'full'])
        cfgs.append((n, batch_size, m, world, mode, rng.randrange(1000)))
    # hand-picked: B not a multiple of m, prime N, exact fits
    cfgs += [(101, 8, 3, 3, 'v1', 1), (101, 8, 3, 3, 'full', 2), (97, 7, 4, 2, 'full', 3), (96, 6, 3, 2, 'full', 4),
             (96, 6, 3, 4, 'v1', 5), (24, 6, 3, 1, 'v1', 6), (1009, 10, 4, 4, 'v1', 7), (13, 5, 2, 1, 'full', 8)]
    return cfgs


CONFIGS = random_configs(300, seed=2024)
VALID = [c for c in CONFIGS if expected_num_batches(*c[:5]) > 0]
TOO_SMALL = [c for c in CONFIGS if expected_num_batches(*c[:5]) == 0]


def test_config_sweep_is_broad():
    assert len(VALID) > 150 and len(TOO_SMALL) > 5
    assert sum(c[1] % c[2] != 0 for c in VALID) > 50
    assert {c[3] for c in VALID} == {1, 2, 3, 4} and {c[2] for c in VALID} == {1, 2, 3, 4}
    assert {c[4] for c in VALID} == {'v1', 'full'}


@pytest.mark.parametrize('cfg', VALID, ids=lambda c: 'N{}-B{}-m{}-W{}-{}-s{}'.format(*c))
def test_grouping_counts_and_disjointness(cfg):
    n, batch_size, m, world, mode, seed = cfg
    sizes = block_sizes(batch_size, m)  # the layout's own properties: tests/test_layout.py
    nb = expected_num_batches(n, batch_size, m, world, mode)
    images_per_epoch = nb * world * len(sizes)  # distinct source-image slots across all ranks
    ranks = all_ranks(n, batch_size, m, world, mode, seed=seed, epoch=seed % 5)

    seen_per_rank = []
    for s, batches in ranks:
        assert len(s) == nb
        assert len(batches) == nb
        assert s.blocks == sizes
        rank_images = []
        for batch in batches:
            assert len(batch) == batch_size
            assert all(isinstance(i, int) and 0 <= i < n for i in batch)
            blocks = split_blocks(batch, sizes)
            for block in blocks:
                assert len(set(block)) == 1, (batch, sizes)  # one image repeated
            heads = [blk[0] for blk in blocks]
            if images_per_epoch <= n:
                assert len(set(heads)) == len(heads), batch  # distinct images across blocks
            rank_images.extend(heads)
        # per-rank sample count
        per_rank = -(-n * (1 if mode == 'v1' else m) // world)
        assert sum(len(b) for b in batches) == (per_rank // batch_size) * batch_size
        seen_per_rank.append(rank_images)

    if mode == 'v1' and m >= 2:
        # v1 never needs more images than the dataset holds ...
        assert images_per_epoch <= n
    if images_per_epoch <= n:
        # ... so no image is on two ranks (nor twice on one rank) in an epoch
        flat = [i for imgs in seen_per_rank for i in imgs]
        assert len(flat) == len(set(flat))

    if mode == 'full':
        # coverage: the number of distinct images is exactly min(N, slots), so fewer than
        # world * blocks-per-batch images (one batch row per rank) can be missing
        distinct = {i for imgs in seen_per_rank for i in imgs}
        assert len(distinct) == min(n, images_per_epoch)
        assert n - len(distinct) < world * len(sizes)
        if (n * m) % (world * batch_size) == 0 and batch_size % m == 0:
            # exact fit: every image appears exactly m times in the epoch
            counts = {}
            for _, batches in ranks:
                for batch in batches:
                    for i in batch:
                        counts[i] = counts.get(i, 0) + 1
            assert counts == {i: m for i in range(n)}


def test_v1_exact_fit_each_image_once_as_a_block():
    # N=96, W=2, B=6, m=3: each rank 48 samples = 8 batches of 2 images; 32 distinct images, each 3 times
    ranks = all_ranks(96, 6, 3, 2, 'v1', seed=3)
    counts = {}
    for _, batches in ranks:
        assert len(batches) == 8
        for batch in batches:
            for i in batch:
                counts[i] = counts.get(i, 0) + 1
    assert len(counts) == 32 and set(counts.values()) == {3}


@pytest.mark.parametrize('mode', ['v1', 'full'])
def test_determinism_and_epochs(mode):
    for n, batch_size, m, world, seed in [(50, 6, 3, 2, 0), (101, 8, 3, 3, 7), (37, 5, 2, 1, 11), (200, 4, 4, 4, 3)]:
        for rank in range(world):
            def make(seed_=seed):
                return RepeatedAugBatchSampler(n, batch_size, m, num_replicas=world, rank=rank,
                                               epoch_mode=mode, seed=seed_)

            by_epoch = {}
            for epoch in range(3):
                a, b = make(), make()
                a.set_epoch(epoch)
                b.set_epoch(epoch)
                by_epoch[epoch] = list(a)
                assert by_epoch[epoch] == list(b)  # same (seed, epoch) -> same batches
            assert by_epoch[0] != by_epoch[1] != by_epoch[2] != by_epoch[0]  # set_epoch reshuffles
            other = make(seed + 1)
            other.set_epoch(0)
            assert list(other) != by_epoch[0]  # the seed matters

            # auto-advance: consecutive passes without set_epoch walk through epochs 0, 1, 2
            s = make()
            assert [list(s) for _ in range(3)] == [by_epoch[0], by_epoch[1], by_epoch[2]]
            # set_epoch wins over the auto-advance
            s.set_epoch(1)
            assert list(s) == by_epoch[1]
            s.set_epoch(1)
            assert list(s) == by_epoch[1]


def test_auto_advance_keeps_ranks_consistent():
    # ranks that never call set_epoch stay in lockstep: still disjoint in every epoch
    samplers = [RepeatedAugBatchSampler(60, 6, 3, num_replicas=3, rank=r, seed=5) for r in range(3)]
    for _ in range(4):
        flat = [b[0] for s in samplers for batch in s for b in split_blocks(batch, [3, 3])]
        assert len(flat) == len(set(flat))


def test_no_shuffle_is_sequential():
    s = RepeatedAugBatchSampler(12, 4, 2, num_replicas=1, rank=0, shuffle=False)
    assert list(s) == [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]
    s2 = RepeatedAugBatchSampler(12, 5, 2, num_replicas=2, rank=1, shuffle=False)
    assert list(s2) == [[3, 3, 4, 4, 5]]  # odd batch: blocks [2 2 1]


def test_defaults_without_process_group():
    s = RepeatedAugBatchSampler(30, 6, 3)
    assert s.num_replicas == 1 and s.rank == 0 and s.epoch_mode == 'v1'
    assert len(s) == 5


@pytest.mark.parametrize('cfg', TOO_SMALL[:10], ids=lambda c: 'N{}-B{}-m{}-W{}-{}'.format(*c[:5]))
def test_too_small_dataset_raises(cfg):
    n, batch_size, m, world, mode, seed = cfg
    for rank in range(world):
        with pytest.raises(ValueError, match=rf'has {n} images, too few for one batch of {batch_size} per rank'):
            RepeatedAugBatchSampler(n, batch_size, m, num_replicas=world, rank=rank, epoch_mode=mode)


def test_error_messages():
    with pytest.raises(ValueError, match=r'--aug-repeats 5 is larger than the batch size 4.*batch-size'):
        RepeatedAugBatchSampler(100, 4, 5)
    for bad in (0, -2, 2.0, '2', None):
        with pytest.raises(ValueError, match=r'--aug-repeats must be an integer >= 1'):
            RepeatedAugBatchSampler(100, 4, bad)
    with pytest.raises(ValueError, match=r'too few for one batch of 8 per rank on 2 rank\(s\)'):
        RepeatedAugBatchSampler(14, 8, 2, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match=r'has 0 images'):
        RepeatedAugBatchSampler(0, 2, 2)
    with pytest.raises(ValueError, match='epoch mode'):
        RepeatedAugBatchSampler(100, 4, 2, epoch_mode='v2')
    with pytest.raises(ValueError, match=r'rank 2 out of range for world size 2'):
        RepeatedAugBatchSampler(100, 4, 2, num_replicas=2, rank=2)
    # full mode needs fewer images than v1 for one batch
    RepeatedAugBatchSampler(8, 8, 2, epoch_mode='full')
    with pytest.raises(ValueError, match='too few'):
        RepeatedAugBatchSampler(7, 8, 2, epoch_mode='v1')
