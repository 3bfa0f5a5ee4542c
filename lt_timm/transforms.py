"""CIFAR-style training augmentation on top of timm's train transform.

* **Pad-and-crop** (``--train-crop-mode pad``): zero-pad the image by ``padding`` pixels on each side and take a
  random crop of the input size — the standard CIFAR augmentation of He et al. (2016), Sec. 4.2, used to train the
  published CIFAR ResNets. It replaces timm's random-resized crop; every other stage of timm's train transform
  (flips, colour jitter / AutoAugment, normalisation or the prefetcher's uint8 output, random erasing) is kept.
* **Cutout** (``--cutout L``): DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks with
  Cutout" (2017): one ``L x L`` square, centred on a uniformly drawn pixel (clipped at the border), is set to the
  dataset mean — 0 after normalisation, ``round(255 * mean)`` on the prefetcher's uint8 arrays, which the
  prefetcher then normalises to ~0.
"""
from typing import Sequence, Tuple

import numpy as np
import torch
from torchvision import transforms as T
from timm.data.transforms import RandomResizedCropAndInterpolation

__all__ = ['Cutout', 'apply_cifar_augmentation']


class Cutout:
    """Mask one ``length x length`` square of a CHW tensor or uint8 array with ``fill`` (one value per channel)."""

    def __init__(self, length: int, fill: Sequence[float] = (0.,)):
        if length < 1:
            raise ValueError(f'--cutout must be a positive side length in pixels, got {length}.')
        self.length = int(length)
        self.fill = tuple(fill)

    def __call__(self, img):
        h, w = img.shape[-2:]
        cy, cx = (int(v) for v in torch.randint(0, h, (1,)).tolist() + torch.randint(0, w, (1,)).tolist())
        y0, y1 = max(0, cy - self.length // 2), min(h, cy + self.length - self.length // 2)
        x0, x1 = max(0, cx - self.length // 2), min(w, cx + self.length - self.length // 2)
        img = img.clone() if isinstance(img, torch.Tensor) else np.array(img, copy=True)
        fill = self.fill if len(self.fill) == img.shape[0] else self.fill[:1] * img.shape[0]
        for c, v in enumerate(fill):
            img[c, y0:y1, x0:x1] = v
        return img

    def __repr__(self) -> str:
        return f'{type(self).__name__}(length={self.length}, fill={self.fill})'


def apply_cifar_augmentation(
        transform: T.Compose,
        input_size: Tuple[int, int, int],
        pad_crop: int = 0,
        cutout: int = 0,
        mean: Sequence[float] = (0.,),
        use_prefetcher: bool = False,
) -> T.Compose:
    """timm's train ``transform`` with its random-resized crop replaced by pad-and-crop and/or Cutout appended.

    Args:
        transform: timm's training transform (``create_transform(..., is_training=True)``).
        input_size: ``(C, H, W)`` of the model input.
        pad_crop: padding in pixels for pad-and-crop; 0 keeps timm's crop.
        cutout: Cutout square side in pixels; 0 disables it.
        mean: normalisation mean (the Cutout fill before the prefetcher normalises).
        use_prefetcher: the transform ends in uint8 arrays that the prefetcher normalises.
    """
    stages = list(transform.transforms)
    if pad_crop:
        if not stages or not isinstance(stages[0], RandomResizedCropAndInterpolation):
            raise ValueError('--train-crop-mode pad replaces timm\'s random-resized crop, which this transform does '
                             'not start with; drop --no-aug / other --train-crop-mode values.')
        stages[0] = T.RandomCrop(tuple(input_size[-2:]), padding=pad_crop, fill=0, padding_mode='constant')
    if cutout:
        fill = tuple(round(255 * m) for m in mean) if use_prefetcher else (0.,)
        stages.append(Cutout(cutout, fill))
    return T.Compose(stages)
