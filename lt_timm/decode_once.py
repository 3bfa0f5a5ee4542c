"""Decode once, augment m times: a dataset view that reads each image of a replica group once.

In a grouped batch (:mod:`lt_timm.layout`, :class:`~lt_timm.sampler.RepeatedAugBatchSampler`) the ``m`` replicas of an
image are ``m`` consecutive, equal dataset indices. Loaded one ``dataset[i]`` at a time, each replica opens and decodes
the file again. :class:`DecodeOnceDataset` wraps the dataset and gives it ``__getitems__``, which torch's map-style
fetcher calls with the whole batch of indices: for each run of equal consecutive indices it runs the dataset's own
read path once (open, decode, ``input_img_mode`` conversion, ``target_transform``; a bad file fails with its path as
before) with the image transform switched off, then applies ``transform`` once per replica. Every call of the transform
draws fresh randomness, in the same order as per-replica loading, so replicas stay independently augmented — under the
same seeds the batches are identical to per-replica loading. Replicas before the last get a copy of the decoded PIL
image, so a transform that edits its input in place cannot leak into the next replica.

Supported: timm's :class:`~timm.data.ImageDataset` and lt-timm's :class:`~lt_timm.data.StrictImageDataset` (and
subclasses that keep their ``__getitem__``): their ``__getitem__`` is exactly "read + decode, then ``transform``".
Anything else (torchvision datasets, custom datasets, ``Subset``, ...) cannot be split that way:
:func:`decode_once_dataset` returns ``None`` and the loader keeps per-replica loading.

The wrapper is transparent: ``__getitem__``/``__len__`` delegate, ``transform``/``target_transform`` read and write the
wrapped dataset's (so setting ``loader.dataset.transform`` works as with timm), other attributes (``reader``,
``filename``, ...) are forwarded.
"""
import copy
from typing import List, Optional, Sequence

import torch
from PIL import Image
from timm.data import ImageDataset

from .data import StrictImageDataset

__all__ = ['DecodeOnceDataset', 'decode_once_dataset', 'supports_decode_once']

# ``__getitem__`` implementations known to be "read + decode (+ target_transform), then transform(img)".
_SPLITTABLE_GETITEMS = (ImageDataset.__getitem__, StrictImageDataset.__getitem__)


def supports_decode_once(dataset) -> bool:
    """True when ``dataset[i]`` is known to be "read + decode, then ``dataset.transform``" (timm/lt-timm folders)."""
    return (isinstance(dataset, ImageDataset) and type(dataset).__getitem__ in _SPLITTABLE_GETITEMS
            and hasattr(dataset, 'reader') and hasattr(dataset, 'transform'))


class DecodeOnceDataset(torch.utils.data.Dataset):
    """``dataset`` with a batched ``__getitems__`` that decodes each run of equal indices once (see module doc)."""

    def __init__(self, dataset):
        if not supports_decode_once(dataset):
            raise TypeError(f'{type(dataset).__name__} cannot be split into read/decode + transform; '
                            f'use it without decode-once.')
        self.dataset = dataset

    # --- transparent view -------------------------------------------------------------------------------------
    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    @property
    def target_transform(self):
        return self.dataset.target_transform

    @target_transform.setter
    def target_transform(self, value):
        self.dataset.target_transform = value

    def __getattr__(self, name):
        # only called for attributes not found normally; guard 'dataset' and dunders (unpickling looks them up
        # before __dict__ is filled, which would otherwise recurse)
        if name == 'dataset' or name.startswith('__'):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __repr__(self) -> str:
        return f'DecodeOnceDataset({self.dataset!r})'

    # --- decode once ------------------------------------------------------------------------------------------
    def __getitems__(self, indices: Sequence[int]) -> List[tuple]:
        """The samples of ``indices`` (a batch), each run of equal consecutive indices read and decoded once."""
        indices = list(indices)
        transform = self.dataset.transform
        # the dataset's own read path with the image transform off: a shallow copy shares reader and settings
        reader_view = copy.copy(self.dataset)
        reader_view.transform = None
        out: List[tuple] = []
        start = 0
        while start < len(indices):
            end = start + 1
            while end < len(indices) and indices[end] == indices[start]:
                end += 1
            img, *rest = reader_view[indices[start]]
            for k in range(end - start):
                last = k == end - start - 1
                x = img if last or not isinstance(img, Image.Image) else img.copy()
                if transform is not None:
                    x = transform(x)
                out.append((x, *rest))
            start = end
        return out


def decode_once_dataset(dataset) -> Optional[DecodeOnceDataset]:
    """``DecodeOnceDataset(dataset)``, the dataset itself if already wrapped, or ``None`` if it is not supported."""
    if isinstance(dataset, DecodeOnceDataset):
        return dataset
    return DecodeOnceDataset(dataset) if supports_decode_once(dataset) else None
