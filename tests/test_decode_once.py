"""Decode once, augment m times: the grouped loader decodes each image once per replica group (real JPEG files)."""
import logging
import os
import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision
import timm.data
from PIL import Image

import lt_timm
import lt_timm.data
from lt_timm import RepeatedAugBatchSampler
from lt_timm.data import StrictImageDataset, load_folder_dataset
from lt_timm.decode_once import DecodeOnceDataset, decode_once_dataset, supports_decode_once
from lt_timm.errors import UserError

NUM_CLASSES = 3
PER_CLASS = 6
N_IMAGES = NUM_CLASSES * PER_CLASS
SIZE = (3, 24, 24)
BATCH = 6
M = 3


def _write_images(root, seed=0):
    rng = np.random.RandomState(seed)
    for k in range(NUM_CLASSES):
        d = root / 'train' / f'class_{k}'
        d.mkdir(parents=True)
        for j in range(PER_CLASS):
            pix = rng.randint(0, 256, size=(36, 40, 3)).astype(np.uint8)  # noise: every crop differs
            Image.fromarray(pix).save(d / f'img_{j}.jpg', quality=90)
    return root


@pytest.fixture(scope='module')
def jpeg_root(tmp_path_factory):
    return str(_write_images(tmp_path_factory.mktemp('jpegs')))


def _counting(monkeypatch, tmp_path):
    """Count real decodes of lt_timm.data.open_image, also inside forked DataLoader workers (one line per call)."""
    log = tmp_path / 'opens.log'
    log.write_text('')
    real = lt_timm.data.open_image

    def counted(path, mode):
        fd = os.open(str(log), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (os.path.realpath(path) + '\n').encode())
        finally:
            os.close(fd)
        return real(path, mode)

    monkeypatch.setattr(lt_timm.data, 'open_image', counted)
    return lambda: Counter(line for line in log.read_text().splitlines() if line)


def _runs(batch):
    """Runs of equal consecutive indices (the replica groups as the loader sees them)."""
    runs = []
    for i in batch:
        if runs and runs[-1] == i:
            continue
        runs.append(i)
    return runs


def _loader(ds, mode='v1', workers=0, decode_once=True, **kw):
    kw.setdefault('use_prefetcher', False)
    return lt_timm.create_loader(ds, SIZE, BATCH, is_training=True, num_aug_repeats=M, aug_repeat_mode=mode,
                                 num_workers=workers, decode_once=decode_once, seed=5, device=torch.device('cpu'),
                                 **kw)


@pytest.mark.parametrize('workers', [0, 1])
@pytest.mark.parametrize('mode', ['v1', 'full', 'original'])
def test_each_image_decoded_once_per_group(jpeg_root, monkeypatch, tmp_path, mode, workers):
    opens = _counting(monkeypatch, tmp_path)
    ds = load_folder_dataset('', jpeg_root, 'train', True)
    assert type(ds) is StrictImageDataset
    path_of = [os.path.realpath(p) for p, _ in ds.reader.samples]
    for decode_once in (True, False):
        loader = _loader(ds, mode, workers, decode_once)
        assert isinstance(loader.dataset, DecodeOnceDataset) is decode_once
        loader.batch_sampler.set_epoch(0)
        before = opens()
        got = list(loader)
        counts = opens() - before
        sampler = RepeatedAugBatchSampler(N_IMAGES, loader.batch_sampler.batch_size, M, num_replicas=1, rank=0,
                                          epoch_mode=mode, seed=5)
        batches = list(sampler)
        assert len(got) == len(batches) > 0
        rows = Counter(path_of[i] for b in batches for i in b)
        groups = Counter(path_of[i] for b in batches for i in _runs(b))
        assert sum(rows.values()) == sum(len(b) for b in batches)
        if decode_once:
            assert counts == groups  # once per replica group ...
            assert sum(counts.values()) <= sum(rows.values()) // M + len(batches)  # ... i.e. about 1/m of the rows
        else:
            assert counts == rows  # per-replica loading: m decodes per group
        for (x, target), b in zip(got, batches):
            assert x.shape == (len(b), *SIZE)
            assert target.tolist() == [ds.reader.samples[i][1] for i in b]


class _CountingReader:
    """timm reader proxy that logs every ``reader[i]`` (= one file open + decode in timm's ImageDataset)."""

    def __init__(self, reader, log):
        self.reader, self.log = reader, log

    def __getitem__(self, index):
        with open(self.log, 'a') as f:
            f.write(f'{index}\n')
        return self.reader[index]

    def __len__(self):
        return len(self.reader)

    def __getattr__(self, name):
        if name == 'reader' or name.startswith('__'):
            raise AttributeError(name)
        return getattr(self.reader, name)


@pytest.mark.parametrize('workers', [0, 1])
def test_timm_image_dataset_decoded_once(jpeg_root, tmp_path, workers):
    """timm's own ImageDataset (what stock train.py under lt_timm.launch builds) gets decode-once too."""
    log = tmp_path / 'reads.log'
    ds = timm.data.create_dataset('', root=jpeg_root, split='train', is_training=True)
    assert type(ds) is timm.data.ImageDataset
    ds.reader = _CountingReader(ds.reader, str(log))
    for decode_once in (True, False):
        log.write_text('')
        loader = _loader(ds, 'full', workers, decode_once)
        loader.batch_sampler.set_epoch(0)
        got = list(loader)
        batches = list(RepeatedAugBatchSampler(N_IMAGES, BATCH, M, num_replicas=1, rank=0, epoch_mode='full', seed=5))
        reads = Counter(int(line) for line in log.read_text().split())
        expected = Counter(i for b in batches for i in (_runs(b) if decode_once else b))
        assert reads == expected
        assert len(got) == len(batches)


def _seeded_epoch(loader, seed=123):
    loader.batch_sampler.set_epoch(0)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return list(loader)


@pytest.mark.parametrize('use_prefetcher', [False, True])
@pytest.mark.parametrize('workers', [0, 1])
def test_random_transform_same_batches_as_per_replica(jpeg_root, workers, use_prefetcher):
    """timm's random train transform: replicas differ, and under the same seeds the batches equal per-replica loading
    (the transform is called in the same order with the same RNG streams; only the decode is shared)."""
    ds = load_folder_dataset('', jpeg_root, 'train', True)
    kw = dict(use_prefetcher=use_prefetcher, scale=(0.2, 1.0))
    once = _seeded_epoch(_loader(ds, 'v1', workers, True, **kw))
    per_replica = _seeded_epoch(_loader(ds, 'v1', workers, False, **kw))
    assert len(once) == len(per_replica) == N_IMAGES // BATCH
    for (xa, ta), (xb, tb) in zip(once, per_replica):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
        for g in range(BATCH // M):
            rows = xa[g * M:(g + 1) * M].float()
            for a in range(M):
                for b in range(a + 1, M):
                    assert (rows[a] - rows[b]).abs().max().item() > 0.05  # independently augmented replicas


def test_deterministic_transform_equals_plain_dataset(jpeg_root):
    """no_aug (resize + centre crop): every row equals ``dataset[i]`` of the plain path, sample by sample."""
    ds = load_folder_dataset('', jpeg_root, 'train', True)
    loader = _loader(ds, 'original', 0, True, no_aug=True)
    assert isinstance(loader.dataset, DecodeOnceDataset)
    plain = load_folder_dataset('', jpeg_root, 'train', True)
    plain.transform = ds.transform  # the transform timm built, on a dataset never wrapped
    loader.batch_sampler.set_epoch(0)
    batches = list(RepeatedAugBatchSampler(N_IMAGES, BATCH * M, M, num_replicas=1, rank=0, epoch_mode='original',
                                           seed=5))
    got = list(loader)
    assert len(got) == len(batches) > 0
    for (x, target), b in zip(got, batches):
        assert x.shape == (BATCH * M, *SIZE)
        for r, i in enumerate(b):
            xi, ti = plain[i]
            assert torch.equal(x[r], xi) and target[r].item() == ti


def test_wrapper_is_transparent(jpeg_root):
    ds = load_folder_dataset('', jpeg_root, 'train', True)
    loader = _loader(ds, use_prefetcher=True, train_crop_mode='pad', pad_crop=2, cutout=4)
    wrapper = loader.dataset
    assert isinstance(wrapper, DecodeOnceDataset) and wrapper.dataset is ds
    assert wrapper.transform is ds.transform  # the pad-crop/cutout transform set on the dataset is the one used
    assert len(wrapper) == len(ds) and wrapper.reader is ds.reader and wrapper.filename(0) == ds.filename(0)
    assert decode_once_dataset(wrapper) is wrapper
    new = torchvision.transforms.Compose([torchvision.transforms.Resize((8, 8)), torchvision.transforms.PILToTensor()])
    wrapper.transform = new  # as timm assigns dataset.transform
    assert ds.transform is new and wrapper[0][0].shape == (3, 8, 8)
    items = wrapper.__getitems__([4, 4, 7])
    assert [t for _, t in items] == [ds[4][1], ds[4][1], ds[7][1]]
    assert all(x.shape == (3, 8, 8) for x, _ in items)
    clone = pickle.loads(pickle.dumps(wrapper))  # spawn-started workers pickle the dataset
    assert isinstance(clone, DecodeOnceDataset) and len(clone) == len(ds)
    assert torch.equal(clone[3][0], wrapper[3][0])


def test_transform_must_not_leak_between_replicas(jpeg_root):
    """A transform that edits its PIL input in place does not change the next replica's image."""
    ds = load_folder_dataset('', jpeg_root, 'train', True)

    def paint(img):
        before = np.asarray(img).copy()
        img.paste((0, 0, 0), (0, 0, img.width, img.height))  # in place
        return torch.from_numpy(before)

    wrapper = DecodeOnceDataset(ds)
    wrapper.transform = paint
    xs = [x for x, _ in wrapper.__getitems__([2, 2, 2])]
    assert xs[0].float().mean() > 10 and torch.equal(xs[0], xs[1]) and torch.equal(xs[1], xs[2])


class _TensorImages(torch.utils.data.Dataset):
    """A custom map dataset (not a timm ImageDataset): cannot be split into decode + transform."""

    def __init__(self, n):
        # textured, so that crops and flips change pixels (flat greys differed only by colour jitter, which dim greys
        # round to equal uint8 values ~5% of epochs)
        self.images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 30, 3), np.uint8))
                       for i in range(n)]
        self.transform = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform is not None else img), i % NUM_CLASSES


class _OwnGetitem(StrictImageDataset):
    def __getitem__(self, index):
        img, target = super().__getitem__(index)
        return img, target


@pytest.mark.parametrize('kind', ['fakedata', 'custom', 'subclass'])
def test_fallback_to_per_replica_loading(jpeg_root, caplog, kind):
    if kind == 'fakedata':
        ds = torchvision.datasets.FakeData(size=N_IMAGES, image_size=(3, 30, 30), num_classes=NUM_CLASSES)
        label = lambda i: int(ds[i][1])  # noqa: E731
    elif kind == 'custom':
        ds = _TensorImages(N_IMAGES)
        label = lambda i: i % NUM_CLASSES  # noqa: E731
    else:
        ds = _OwnGetitem(timm.data.create_dataset('', root=jpeg_root, split='train', is_training=True))
        label = lambda i: ds.reader.samples[i][1]  # noqa: E731
    assert not supports_decode_once(ds) and decode_once_dataset(ds) is None
    with caplog.at_level(logging.INFO, logger='lt_timm.loader'):
        loader = _loader(ds, 'v1', 0, True)
    lines = [r for r in caplog.records if 'decode-once is off' in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and type(ds).__name__ in lines[0].getMessage()
    assert loader.dataset is ds
    batches = list(RepeatedAugBatchSampler(N_IMAGES, BATCH, M, num_replicas=1, rank=0, epoch_mode='v1', seed=5))
    got = _seeded_epoch(loader)
    assert len(got) == len(batches) > 0
    for (x, target), b in zip(got, batches):
        assert x.shape == (BATCH, *SIZE)
        assert target.tolist() == [label(i) for i in b]
        assert not torch.equal(x[0], x[1])  # replicas still independently augmented


@pytest.mark.parametrize('workers', [0, 1])
def test_broken_image_names_its_path(jpeg_root, tmp_path, workers):
    root = _write_images(tmp_path / 'data', seed=1)
    bad = root / 'train' / 'class_1' / 'img_2.jpg'
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    ds = load_folder_dataset('', str(root), 'train', True)
    loader = _loader(ds, 'full', workers, True)
    assert isinstance(loader.dataset, DecodeOnceDataset)
    with pytest.raises(UserError, match=f'cannot read image {bad}'):
        for _ in loader:
            pass
