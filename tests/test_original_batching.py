"""The paper's original LossTransform batching: -b images x m replicas per step, plain training's steps per epoch."""
import random
import re
from collections import Counter

import pytest
import torch

import timm.data
from lt_timm import RepeatedAugBatchSampler, create_loader
from lt_timm.layout import EPOCH_MODES, rows_per_step
from conftest import make_image_folder


def plain_steps(n, images_per_step, world):
    """Steps per epoch of plain DDP training (DistributedSampler pads to ceil(N / W), loader drops the last)."""
    return -(-n // world) // images_per_step


def test_rows_per_step():
    for b in range(1, 12):
        for m in range(1, 5):
            assert rows_per_step(b, m, 'original') == b * m
            assert rows_per_step(b, m, 'v1') == rows_per_step(b, m, 'full') == b
    assert EPOCH_MODES == ('v1', 'full', 'original')
    with pytest.raises(ValueError, match='epoch mode'):
        rows_per_step(4, 2, 'paper')


CASES = [(n, b, m, w, s) for s, (n, b, m, w) in enumerate(
    [(random.Random(i).randint(5, 300), random.Random(i + 1).randint(1, 9), random.Random(i + 2).randint(1, 4),
      random.Random(i + 3).randint(1, 4)) for i in range(80)] + [(50000, 128, 3, 1), (50000, 128, 3, 8), (101, 7, 3, 3)])]


@pytest.mark.parametrize('case', CASES, ids=lambda c: 'N{}-B{}-m{}-W{}-s{}'.format(*c))
def test_original_layout_and_epoch_length(case):
    n, images, m, world, seed = case
    if plain_steps(n, images, world) == 0:
        with pytest.raises(ValueError, match='too few'):
            RepeatedAugBatchSampler(n, rows_per_step(images, m, 'original'), m, num_replicas=world, rank=0,
                                    epoch_mode='original', seed=seed)
        return
    used = Counter()
    for rank in range(world):
        s = RepeatedAugBatchSampler(n, rows_per_step(images, m, 'original'), m, num_replicas=world, rank=rank,
                                    epoch_mode='original', seed=seed)
        s.set_epoch(3)
        batches = list(s)
        assert len(batches) == len(s) == plain_steps(n, images, world)
        for batch in batches:
            assert len(batch) == images * m
            blocks = [batch[i:i + m] for i in range(0, len(batch), m)]
            assert all(len(set(b)) == 1 for b in blocks)  # m consecutive replicas of one image
            assert len({b[0] for b in blocks}) == images  # -b distinct images per step
            used.update(b[0] for b in blocks)
    total = plain_steps(n, images, world) * world * images
    if total <= n:
        assert max(used.values()) == 1  # every image at most once per epoch, over all ranks
    assert sum(used.values()) == total


def test_original_mode_rejects_partial_images():
    with pytest.raises(ValueError, match='multiple of --aug-repeats'):
        RepeatedAugBatchSampler(100, 10, 3, num_replicas=1, rank=0, epoch_mode='original')


def test_loader_original_mode_rows(tmp_path):
    root = make_image_folder(tmp_path / 'd', classes=3, per_class=8, splits=('train',))
    ds = timm.data.create_dataset('', root=str(root), split='train', is_training=True)
    loader = create_loader(ds, (3, 32, 32), 4, is_training=True, num_aug_repeats=3, aug_repeat_mode='original',
                           use_prefetcher=False, num_workers=0, device=torch.device('cpu'))
    assert len(loader) == 24 // 4
    x, y = next(iter(loader))
    assert x.shape[0] == 12
    assert all(len(set(y[i:i + 3].tolist())) == 1 for i in range(0, 12, 3))
    assert not torch.equal(x[0], x[1])  # replicas independently augmented


def test_train_cli_original_mode(tmp_path):
    from test_cli import RGB_FLAGS, run
    data = make_image_folder(tmp_path / 'data')
    p = run('train.py', '--data-dir', data, *RGB_FLAGS, '-b', '4', '--epochs', '1', '--aug-repeats', '3',
            '--loss', 'losstransform', '--lt-epoch', 'original', '--output', tmp_path / 'out', '--experiment', 'o')
    log = p.stdout + p.stderr
    assert re.search(r'mode original, 6 batches/epoch', log), log[-2000:]
    assert re.search(r'Train: 0 \[\s*5/6 \(100%\)\]', log), log[-2000:]


def test_table1_m32_sampler_on_cifar10_sizes():
    """Table 1's layout: -b 128 images x m = 32 = 4,096 rows per step, plain training's 390 steps on 50,000 images."""
    s = RepeatedAugBatchSampler(50000, rows_per_step(128, 32, 'original'), 32, num_replicas=1, rank=0,
                                epoch_mode='original', seed=0)
    s.set_epoch(0)
    assert len(s) == 50000 // 128
    batch = next(iter(s))
    assert len(batch) == 4096
    blocks = [batch[i:i + 32] for i in range(0, 4096, 32)]
    assert all(len(set(b)) == 1 for b in blocks) and len({b[0] for b in blocks}) == 128


def test_m32_original_layout_small_batch(tmp_path):
    """m = 32 on a small batch (-b 2 images = 64 rows) with Table 1's default augmentation (RandAugment + flip, no
    crop): 32 consecutive rows per image, independently augmented, and under batch-mode CutMix every replica of an
    image keeps the same soft target."""
    from timm.data import Mixup
    root = make_image_folder(tmp_path / 'd', classes=3, per_class=4, splits=('train',))
    ds = timm.data.create_dataset('', root=str(root), split='train', is_training=True)
    loader = create_loader(ds, (3, 32, 32), 2, is_training=True, num_aug_repeats=32, aug_repeat_mode='original',
                           use_prefetcher=False, num_workers=0, device=torch.device('cpu'), scale=(1.0, 1.0),
                           ratio=(1.0, 1.0), hflip=0.5, auto_augment='rand-m9-n2-inc1', seed=3)
    assert len(loader) == 12 // 2
    x, y = next(iter(loader))
    assert x.shape == (64, 3, 32, 32)
    for block in range(2):
        rows = slice(32 * block, 32 * block + 32)
        assert len(set(y[rows].tolist())) == 1
        assert len({tuple(v.flatten()[:64].tolist()) for v in x[rows]}) > 16  # replicas augmented independently
    mixed, target = Mixup(cutmix_alpha=1.0, prob=1.0, mode='batch', num_classes=3)(x.clone(), y.clone())
    for block in range(2):
        assert torch.equal(target[32 * block:32 * block + 32], target[32 * block].expand(32, 3))


def test_train_cli_table1_m32_recipe(tmp_path, in_process):
    """Table 1's CutMix recipe (m = 32, original batching) trains, shrunk to -b 2 images = 64 rows per step."""
    data = make_image_folder(tmp_path / 'data', classes=3, per_class=4)
    p = in_process('train.py', '-c', 'configs/cifar/table1_resnet20_cutmix_lt.yaml', '--data-dir', data,
                   '--val-split', 'val', '--num-classes', '3', '-b', '2', '--epochs', '1', '--workers', '0',
                   '--device', 'cpu', '--no-plot', '--log-interval', '5', '--output', tmp_path / 'out',
                   '--experiment', 'm32')
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert re.search(r'm=32, mode original, 6 batches/epoch', log), log[-2000:]
