"""Pad-and-crop and Cutout: properties over many seeds, and through lt_timm.create_loader."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import timm.data
from lt_timm import create_loader
from lt_timm.transforms import Cutout, apply_cifar_augmentation


def unique_image(size=32, seed=0):
    """An RGB image whose pixels are all distinct and non-zero, so a crop's offset can be read back."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(np.arange(1, size * size + 1))
    arr = np.stack([values % 251 + 1, values // 251 + 1, np.full(size * size, 7)], axis=1).reshape(size, size, 3)
    return arr.astype(np.uint8)


def find_offset(out: np.ndarray, src: np.ndarray, pad: int):
    """(dy, dx) such that out == zero-padded src shifted by (dy, dx), or None."""
    h, w = src.shape[:2]
    padded = np.zeros((h + 2 * pad, w + 2 * pad, 3), dtype=src.dtype)
    padded[pad:pad + h, pad:pad + w] = src
    hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
            if np.array_equal(padded[dy:dy + h, dx:dx + w], out)]
    return hits[0] if len(hits) == 1 else None


def pad_crop_transform(pad=4, hflip=0., cutout=0, use_prefetcher=True):
    base = timm.data.create_transform((3, 32, 32), is_training=True, hflip=hflip, color_jitter=0.,
                                      use_prefetcher=use_prefetcher)
    return apply_cifar_augmentation(base, (3, 32, 32), pad_crop=pad, cutout=cutout, mean=(0.5, 0.25, 0.0),
                                    use_prefetcher=use_prefetcher)


@pytest.mark.parametrize('pad', [1, 4])
def test_pad_crop_is_a_zero_padded_translation(pad):
    src = unique_image()
    tf = pad_crop_transform(pad=pad)
    offsets = set()
    for seed in range(200):
        torch.manual_seed(seed)
        out = np.asarray(tf(Image.fromarray(src))).transpose(1, 2, 0)  # prefetcher output: CHW uint8
        assert out.shape == src.shape
        off = find_offset(out, src, pad)
        assert off is not None, seed
        offsets.add(off)
    assert len(offsets) > (2 * pad + 1) ** 2 * 0.6  # every shift in [-pad, pad]^2 shows up


def test_cutout_masks_one_square_with_the_mean():
    length = 16
    tf = Cutout(length, fill=(128, 64, 0))
    sizes = set()
    for seed in range(300):
        torch.manual_seed(seed)
        img = np.full((3, 32, 32), 200, dtype=np.uint8)
        out = tf(img)
        assert np.all(img == 200)  # input untouched
        changed = np.any(out != 200, axis=0)
        ys, xs = np.nonzero(changed)
        assert len(ys), seed
        box = changed[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.all()  # one axis-aligned rectangle
        assert box.shape[0] <= length and box.shape[1] <= length
        assert np.all(out[:, changed] == np.array([[128], [64], [0]]))
        sizes.add(box.shape)
    assert (length, length) in sizes and len(sizes) > 5  # clipped at the border sometimes


def test_cutout_on_normalised_tensors_fills_zero():
    tf = pad_crop_transform(pad=4, cutout=8, use_prefetcher=False)
    assert isinstance(tf.transforms[0], T.RandomCrop) and isinstance(tf.transforms[-1], Cutout)
    torch.manual_seed(0)
    out = tf(Image.fromarray(unique_image()))
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    assert (out == 0).all(dim=0).sum() >= 4 * 4  # at least a clipped square of zeros in every channel


def test_create_loader_uses_pad_crop_and_cutout(tmp_path):
    from conftest import make_image_folder
    root = make_image_folder(tmp_path / 'd', classes=2, per_class=6, splits=('train',))
    ds = timm.data.create_dataset('', root=str(root), split='train', is_training=True)
    for repeats in (0, 3):
        loader = create_loader(ds, (3, 32, 32), 6, is_training=True, num_aug_repeats=repeats, use_prefetcher=False,
                               train_crop_mode='pad', pad_crop=2, cutout=8, num_workers=0, device=torch.device('cpu'))
        stages = ds.transform.transforms
        assert isinstance(stages[0], T.RandomCrop) and stages[0].padding == 2
        assert isinstance(stages[-1], Cutout) and stages[-1].length == 8
        x, _ = next(iter(loader))
        assert x.shape == (6, 3, 32, 32)
    # without the flags the transform is timm's own (random-resized crop first)
    create_loader(ds, (3, 32, 32), 6, is_training=True, use_prefetcher=False, num_workers=0, device=torch.device('cpu'))
    assert type(ds.transform.transforms[0]).__name__ == 'RandomResizedCropAndInterpolation'


def test_pad_crop_needs_timms_crop():
    base = timm.data.create_transform((3, 32, 32), is_training=False)
    with pytest.raises(ValueError, match='--train-crop-mode pad'):
        apply_cifar_augmentation(base, (3, 32, 32), pad_crop=4)
