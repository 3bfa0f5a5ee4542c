"""lt_timm.create_loader on a tiny real ImageFolder (PNG files), plus one real 2-process gloo DDP run."""
import json
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import timm.data
from PIL import Image
from timm.data import FastCollateMixup, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import lt_timm
from lt_timm import RepeatedAugBatchSampler

NUM_CLASSES = 3
PER_CLASS = 8
N_IMAGES = NUM_CLASSES * PER_CLASS
SIZE = (3, 32, 32)
NOISE = 20  # +- per-pixel noise around each image's base colour


@pytest.fixture(scope='module')
def image_root(tmp_path_factory):
    """root/train/class_k/img_j.png: each image a random base colour plus pixel noise (so crops differ)."""
    root = tmp_path_factory.mktemp('imagefolder')
    rng = np.random.RandomState(0)
    colours = {}
    for k in range(NUM_CLASSES):
        d = root / 'train' / f'class_{k}'
        d.mkdir(parents=True)
        for j in range(PER_CLASS):
            base = rng.randint(NOISE + 10, 255 - NOISE - 10, size=3)
            pix = base[None, None, :] + rng.randint(-NOISE, NOISE + 1, size=(48, 48, 3))
            path = d / f'img_{j}.png'
            Image.fromarray(pix.astype(np.uint8)).save(path)
            colours[os.path.realpath(path)] = base / 255.
    return str(root), colours


def make_dataset(root):
    ds = timm.data.create_dataset('', root=root, split='train', is_training=True)
    assert len(ds) == N_IMAGES
    return ds


def source_info(ds, colours):
    """Per dataset index: (label, base colour in [0,1])."""
    info = []
    for i in range(len(ds)):
        path, label = ds.reader.samples[i]
        info.append((int(label), colours[os.path.realpath(path)]))
    return info


def unnormalize(x):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return x.float() * std + mean


def expected_batches(n, batch_size, m, epoch, seed=0, mode='v1'):
    s = RepeatedAugBatchSampler(n, batch_size, m, num_replicas=1, rank=0, epoch_mode=mode, seed=seed)
    s.set_epoch(epoch)
    return list(s)


@pytest.mark.parametrize('use_prefetcher', [False, True])
@pytest.mark.parametrize('num_workers', [0, 2])
def test_grouped_training_loader(image_root, use_prefetcher, num_workers):
    """Seeded: two replicas drawing the same crop and flip (~2e-5 a pair unseeded) would be identical by chance."""
    torch.manual_seed(0)  # also the workers' seeds
    random.seed(0)
    np.random.seed(0)
    root, colours = image_root
    ds = make_dataset(root)
    info = source_info(ds, colours)
    loader = lt_timm.create_loader(
        ds, SIZE, 6, is_training=True, num_aug_repeats=3, use_prefetcher=use_prefetcher,
        device=torch.device('cpu'), num_workers=num_workers, color_jitter=0., seed=0)
    if use_prefetcher:
        assert isinstance(loader, timm.data.loader.PrefetchLoader)
    assert isinstance(loader.batch_sampler, RepeatedAugBatchSampler)
    assert len(loader) == N_IMAGES // 6  # v1: as many samples as a plain epoch

    n_blocks_checked = 0
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        expected = expected_batches(N_IMAGES, 6, 3, epoch)
        got = list(loader)
        assert len(got) == len(expected) == 4
        for (x, target), idx in zip(got, expected):
            assert x.shape == (6, *SIZE) and x.dtype == torch.float32
            assert target.shape == (6,) and target.dtype == torch.int64
            assert target.tolist() == [info[i][0] for i in idx]
            means = unnormalize(x).mean(dim=(2, 3))  # (6, 3) mean colour of each row
            for r, i in enumerate(idx):
                # each row really is a crop of the image the sampler chose (colour within noise)
                torch.testing.assert_close(means[r].double(), torch.tensor(info[i][1]), atol=10 / 255, rtol=0)
            for g in range(2):
                rows = range(3 * g, 3 * g + 3)
                assert len({target[r].item() for r in rows}) == 1
                assert len({idx[r] for r in rows}) == 1
                for a in rows:
                    for b in rows:
                        if a < b:
                            # independently augmented replicas: pixels differ
                            assert (x[a] - x[b]).abs().max().item() > 0.05
                n_blocks_checked += 1
            assert idx[0] != idx[3]
    assert n_blocks_checked == 16


def test_non_repeat_path_is_timm(image_root):
    root, _ = image_root
    # eval loaders: batch for batch identical
    ours = lt_timm.create_loader(make_dataset(root), SIZE, 5, is_training=False, use_prefetcher=False, num_workers=0)
    theirs = timm.data.create_loader(make_dataset(root), SIZE, 5, is_training=False, use_prefetcher=False, num_workers=0)
    assert type(ours) is type(theirs)
    a, b = list(ours), list(theirs)
    assert len(a) == len(b) == 5
    for (xa, ta), (xb, tb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)

    # training loaders without repeats: same loader (shuffle, drop_last), same batches under the same RNG state
    for use_prefetcher in (False, True):
        kw = dict(is_training=True, num_aug_repeats=0, use_prefetcher=use_prefetcher, num_workers=0,
                  device=torch.device('cpu'))
        ours = lt_timm.create_loader(make_dataset(root), SIZE, 5, **kw)
        theirs = timm.data.create_loader(make_dataset(root), SIZE, 5, **kw)
        assert type(ours) is type(theirs)
        assert len(ours) == len(theirs) == N_IMAGES // 5
        inner_o = ours.loader if use_prefetcher else ours
        inner_t = theirs.loader if use_prefetcher else theirs
        assert type(inner_o.sampler) is type(inner_t.sampler) is torch.utils.data.RandomSampler
        assert inner_o.drop_last and inner_t.drop_last
        outs = []
        for loader in (ours, theirs):
            torch.manual_seed(123)
            random.seed(123)
            np.random.seed(123)
            outs.append(list(loader))
        for (xa, ta), (xb, tb) in zip(*outs):
            assert torch.equal(xa, xb) and torch.equal(ta, tb)


def test_positional_arguments_follow_timms_signature(image_root):
    """A call written for timm.data.create_loader (positional no_aug after is_training) means the same with ours;
    lt-timm's own parameters are keyword-only."""
    import inspect
    root, _ = image_root
    ours = lt_timm.create_loader(make_dataset(root), SIZE, 6, True, True, use_prefetcher=False, num_workers=0,
                                 num_aug_repeats=3)
    theirs = timm.data.create_loader(make_dataset(root), SIZE, 6, True, True, use_prefetcher=False, num_workers=0)
    assert repr(ours.dataset.transform) == repr(theirs.dataset.transform)  # no_aug: resize + center crop only
    assert 'RandomResizedCrop' not in repr(ours.dataset.transform)
    assert isinstance(ours.batch_sampler, RepeatedAugBatchSampler)
    params = inspect.signature(lt_timm.create_loader).parameters
    for name in ('num_aug_repeats', 'distributed', 'aug_repeat_mode', 'seed', 'world_size', 'rank', 'pad_crop',
                 'cutout', 'decode_once'):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    with pytest.raises(TypeError, match='multiple values'):
        lt_timm.create_loader(make_dataset(root), SIZE, 6, True, True, no_aug=False)


@pytest.mark.parametrize('alphas', [(1.0, 0.0), (0.0, 1.0)], ids=['mixup', 'cutmix'])
@pytest.mark.parametrize('batch_size', [6, 8, 10])
def test_batch_mixup_gives_replicas_identical_targets(image_root, alphas, batch_size):
    """Through the real loader (prefetcher collate), also when m = 3 does not divide the batch."""
    root, colours = image_root
    ds = make_dataset(root)
    info = source_info(ds, colours)
    mixup_alpha, cutmix_alpha = alphas
    collate = FastCollateMixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=0.,
                               num_classes=NUM_CLASSES, mode='batch')
    loader = lt_timm.create_loader(
        ds, SIZE, batch_size, is_training=True, num_aug_repeats=3, use_prefetcher=True, device=torch.device('cpu'),
        num_workers=0, collate_fn=collate, seed=1)
    lams, b = [], batch_size
    eye = torch.eye(NUM_CLASSES)
    for epoch in range(3):
        loader.batch_sampler.set_epoch(epoch)
        for (x, target), idx in zip(loader, expected_batches(N_IMAGES, b, 3, epoch, seed=1)):
            assert x.shape == (b, *SIZE)
            assert target.shape == (b, NUM_CLASSES) and target.dtype == torch.float32
            for r in range(b):
                for q in range(b):
                    if idx[q] == idx[r]:
                        assert torch.equal(target[q], target[r])  # replicas of an image: same soft target
            # timm batch mode: row i mixed with row B-1-i with one lambda for the batch
            labels = [info[i][0] for i in idx]
            lam = next((target[r, labels[r]].item() for r in range(b) if labels[r] != labels[b - 1 - r]), None)
            if lam is None:
                continue
            lams.append(lam)
            for r in range(b):
                torch.testing.assert_close(target[r], lam * eye[labels[r]] + (1 - lam) * eye[labels[b - 1 - r]])
    assert lams and any(0.01 < lam < 0.99 for lam in lams)  # mixing really happened


def test_partial_blocks_and_full_mode(image_root):
    root, colours = image_root
    ds = make_dataset(root)
    info = source_info(ds, colours)
    loader = lt_timm.create_loader(ds, SIZE, 5, is_training=True, num_aug_repeats=2, use_prefetcher=False,
                                   num_workers=0, aug_repeat_mode='full', seed=3, color_jitter=0.)
    assert len(loader) == (N_IMAGES * 2) // 5
    loader.batch_sampler.set_epoch(0)
    expected = expected_batches(N_IMAGES, 5, 2, 0, seed=3, mode='full')
    for (x, target), idx in zip(loader, expected):
        assert x.shape == (5, *SIZE)
        assert target.tolist() == [info[i][0] for i in idx]
        assert idx[0] == idx[1] and idx[2] == idx[3]  # odd batch: blocks [2 2 1]


def test_loader_errors(image_root):
    root, _ = image_root
    kw = dict(is_training=True, use_prefetcher=False, num_workers=0)
    with pytest.raises(ValueError, match='larger than the batch size 6'):
        lt_timm.create_loader(make_dataset(root), SIZE, 6, num_aug_repeats=7, **kw)
    with pytest.raises(ValueError, match='--aug-splits.*cannot be combined with --aug-repeats'):
        lt_timm.create_loader(make_dataset(root), SIZE, 6, num_aug_repeats=3, num_aug_splits=3, **kw)
    with pytest.raises(ValueError, match='whole number'):
        lt_timm.create_loader(make_dataset(root), SIZE, 6, num_aug_repeats=2.5, **kw)
    with pytest.raises(ValueError, match='use-multi-epochs-loader'):
        lt_timm.create_loader(make_dataset(root), SIZE, 6, num_aug_repeats=3, use_multi_epochs_loader=True, **kw)
    with pytest.raises(ValueError, match='too few for one batch'):
        lt_timm.create_loader(make_dataset(root), SIZE, 30, num_aug_repeats=3, **kw)


# ----------------------------------------------------------------------------- real DDP (gloo, 2 processes)

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, root, out_dir):
    os.environ['MASTER_ADDR'] = '127.0.0.1'
    os.environ['MASTER_PORT'] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        ds = timm.data.create_dataset('', root=root, split='train', is_training=True)
        loader = lt_timm.create_loader(
            ds, SIZE, 6, is_training=True, num_aug_repeats=3, distributed=True, use_prefetcher=False,
            num_workers=0, color_jitter=0., seed=17)
        sampler = loader.batch_sampler
        result = {'len': len(loader), 'world': sampler.num_replicas, 'rank': sampler.rank, 'epochs': []}
        for epoch in range(2):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            sampler.set_epoch(epoch)
            targets = [t.tolist() for _, t in loader]
            result['epochs'].append({'batches': batches, 'targets': targets})
        gathered = [None] * world_size
        dist.all_gather_object(gathered, len(loader))  # the process group really works
        result['gathered_len'] = gathered
        with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_real_ddp_gloo_two_processes(image_root, tmp_path):
    root, colours = image_root
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), root, str(tmp_path)), nprocs=world, join=True)
    results = [json.load(open(tmp_path / f'rank{r}.json')) for r in range(world)]
    info = source_info(make_dataset(root), colours)
    for r, res in enumerate(results):
        assert res['world'] == world and res['rank'] == r  # picked up from torch.distributed
        assert res['gathered_len'] == [res['len']] * world
    assert results[0]['len'] == results[1]['len'] == (N_IMAGES // world) // 6
    for epoch in range(2):
        per_rank_images = []
        for r, res in enumerate(results):
            batches = res['epochs'][epoch]['batches']
            assert len(batches) == res['len']
            images = []
            for batch, targets in zip(batches, res['epochs'][epoch]['targets']):
                assert len(batch) == 6
                for g in range(2):
                    assert len(set(batch[3 * g:3 * g + 3])) == 1  # grouped layout
                images += [batch[0], batch[3]]
                assert targets == [info[i][0] for i in batch]  # the loader followed the sampler
            # identical to the sampler computed without processes
            s = RepeatedAugBatchSampler(N_IMAGES, 6, 3, num_replicas=world, rank=r, seed=17)
            s.set_epoch(epoch)
            assert batches == list(s)
            per_rank_images.append(images)
        assert len(per_rank_images[0]) == len(per_rank_images[1])
        assert not set(per_rank_images[0]) & set(per_rank_images[1])  # disjoint across ranks
    assert results[0]['epochs'][0]['batches'] != results[0]['epochs'][1]['batches']
