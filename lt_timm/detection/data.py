"""Detection datasets (PennFudanPed, COCO format) and the replica collate.

Every dataset returns ``(image, target)`` with ``image`` a float ``(3, H, W)`` tensor in [0, 1] and ``target``
holding ``boxes`` (xyxy float), ``labels`` (int64, 1..K; COCO with ``label_space='coco_ids'``: the COCO category
ids), ``masks`` (uint8 ``(N, H, W)``), ``image_id``, ``area`` and ``iscrowd``. Datasets list their classes as
``categories`` (``[{'id': label, 'name': ...}]``, in the label space of the targets; used by the evaluation).
``img_size`` (optional) resizes each image so its longer side is ``img_size`` (reduced-resolution training); boxes
and masks are resized with it, and evaluation happens in that frame.

:class:`ReplicaDataset` turns item ``i`` into ``m`` independently augmented replicas; :func:`replica_collate`
flattens a list of such items so that the replicas of each image are consecutive, i.e. row ``r`` of the batch
belongs to source image ``lt_timm.layout.replica_groups(B, m)[r]``.
"""
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .transforms import identity_params

__all__ = ['PennFudanDataset', 'CocoDetectionDataset', 'ReplicaDataset', 'BlockBatchSampler', 'replica_collate',
           'eval_collate', 'load_rgb',
           'split_indices', 'masks_to_boxes_safe', 'resize_sample', 'category_labels', 'LABEL_SPACES']

LABEL_SPACES = ('contiguous', 'coco_ids')  # CocoDetectionDataset's label_space


def _require(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f'{what} not found: {path}')


def load_rgb(path: str) -> torch.Tensor:
    """An image file as a ``(3, H, W)`` uint8 RGB tensor."""
    from PIL import Image
    with Image.open(path) as im:
        arr = np.asarray(im.convert('RGB'), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def masks_to_boxes_safe(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes of binary masks ``(N, H, W)``, pixel-edge convention (x2 = last column + 1)."""
    n = masks.shape[0]
    out = torch.zeros((n, 4), dtype=torch.float32)
    for i in range(n):
        ys, xs = torch.nonzero(masks[i], as_tuple=True)
        if ys.numel():
            out[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return out


def resize_sample(img: torch.Tensor, target: Dict, img_size: Optional[int]) -> Tuple[torch.Tensor, Dict]:
    """Resize so that the longer side is ``img_size`` (no-op if None)."""
    if not img_size:
        return img, target
    h, w = img.shape[-2:]
    s = img_size / max(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    if (nh, nw) == (h, w):
        return img, target
    img = F.resize(img, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
    t = dict(target)
    t['boxes'] = target['boxes'] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    if 'masks' in target and target['masks'].shape[0]:
        t['masks'] = F.resize(target['masks'], [nh, nw], interpolation=InterpolationMode.NEAREST)
    elif 'masks' in target:
        t['masks'] = target['masks'].new_zeros((0, nh, nw))
    if 'area' in target:
        t['area'] = target['area'] * (nw / w) * (nh / h)
    return img, t


class PennFudanDataset(Dataset):
    """PennFudanPed: ``root/PNGImages/*.png`` and ``root/PedMasks/*_mask.png`` (each pedestrian a distinct
    pixel value, 0 = background). One class (label 1 = pedestrian); boxes from the masks."""

    num_classes = 2  # background + pedestrian
    class_names = ['pedestrian']
    categories = [{'id': 1, 'name': 'pedestrian'}]

    def __init__(self, root: str, img_size: Optional[int] = None, cache: bool = True):
        _require(root, 'PennFudanPed directory')
        self.root = root
        img_dir, mask_dir = os.path.join(root, 'PNGImages'), os.path.join(root, 'PedMasks')
        _require(img_dir, 'PennFudanPed image folder (PNGImages/)')
        _require(mask_dir, 'PennFudanPed mask folder (PedMasks/)')
        self.imgs = sorted(f for f in os.listdir(img_dir) if f.lower().endswith('.png'))
        if not self.imgs:
            raise FileNotFoundError(f'no .png images in {img_dir}')
        self.masks = []
        for f in self.imgs:
            m = os.path.splitext(f)[0] + '_mask.png'
            _require(os.path.join(mask_dir, m), 'PennFudanPed mask')
            self.masks.append(m)
        self.img_size = img_size
        self._cache: Dict[int, Tuple[torch.Tensor, Dict]] = {} if cache else None

    def __len__(self) -> int:
        return len(self.imgs)

    def _load(self, idx: int):
        img = load_rgb(os.path.join(self.root, 'PNGImages', self.imgs[idx]))
        from PIL import Image
        with Image.open(os.path.join(self.root, 'PedMasks', self.masks[idx])) as im:
            mask = torch.from_numpy(np.asarray(im, dtype=np.int64).copy())
        ids = torch.unique(mask)
        ids = ids[ids != 0]
        masks = (mask[None] == ids.view(-1, 1, 1)).to(torch.uint8)
        boxes = masks_to_boxes_safe(masks)
        n = masks.shape[0]
        target = {'boxes': boxes, 'labels': torch.ones((n,), dtype=torch.int64), 'masks': masks,
                  'image_id': idx, 'area': (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                  'iscrowd': torch.zeros((n,), dtype=torch.int64)}
        img, target = resize_sample(img, target, self.img_size)
        return img, target

    def __getitem__(self, idx: int):
        if self._cache is not None and idx in self._cache:
            img, target = self._cache[idx]
        else:
            img, target = self._load(idx)
            if self._cache is not None:
                self._cache[idx] = (img, target)
        return img.float() / 255.0, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in target.items()}


class CocoDetectionDataset(Dataset):
    """COCO-format detection/instance segmentation: an image folder and an ``instances_*.json``.

    ``label_space`` says what a target's ``labels`` are:

    * ``'contiguous'`` (default): the categories mapped to ``1..K`` in id order (``self.cat_ids[label - 1]``, or
      ``self.label_to_cat[label]``, gives the category id back); ``num_classes = K + 1``. For detectors trained
      from a backbone.
    * ``'coco_ids'``: the category ids themselves (COCO: 1..90 with gaps); ``num_classes = max id + 1`` (91 for
      COCO). torchvision's COCO detectors predict category ids (91-way, the unused ids never annotated), so
      fine-tuning them (the paper's Table 6) needs these targets.

    ``categories`` lists ``{'id': label, 'name': ...}`` in the chosen label space (the evaluation's categories).
    Crowd annotations are left out of the training targets (COCOeval handles them from the JSON).
    """

    def __init__(self, img_dir: str, ann_file: str, img_size: Optional[int] = None, masks: bool = True,
                 remove_empty: bool = False, label_space: str = 'contiguous'):
        if label_space not in LABEL_SPACES:
            raise ValueError(f'label_space must be one of {LABEL_SPACES}, got {label_space!r}.')
        _require(img_dir, 'COCO image folder')
        _require(ann_file, 'COCO annotation file')
        import contextlib
        import io
        from pycocotools.coco import COCO
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(ann_file)
        self.img_dir = img_dir
        self.ann_file = ann_file
        self.img_size = img_size
        self.with_masks = masks
        self.label_space = label_space
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = category_labels(self.cat_ids, label_space, ann_file)
        self.label_to_cat = {lab: c for c, lab in self.cat_to_label.items()}
        self.class_names = [self.coco.cats[c]['name'] for c in self.cat_ids]
        self.categories = [{'id': self.cat_to_label[c], 'name': self.coco.cats[c]['name']} for c in self.cat_ids]
        self.num_classes = max(self.cat_to_label.values(), default=0) + 1
        ids = sorted(self.coco.imgs.keys())
        if remove_empty:
            ids = [i for i in ids if any(not a.get('iscrowd', 0) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int):
        img_id = self.ids[idx]
        info = self.coco.imgs[img_id]
        path = os.path.join(self.img_dir, info['file_name'])
        _require(path, 'COCO image')
        img = load_rgb(path)
        h, w = img.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if not a.get('iscrowd', 0)]
        boxes, labels, masks = [], [], []
        for a in anns:
            x, y, bw, bh = a['bbox']
            if bw < 1 or bh < 1:
                continue
            boxes.append([x, y, min(x + bw, w), min(y + bh, h)])
            labels.append(self.cat_to_label[a['category_id']])
            if self.with_masks:
                masks.append(torch.from_numpy(self.coco.annToMask(a)))
        n = len(boxes)
        target = {
            'boxes': torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            'labels': torch.tensor(labels, dtype=torch.int64),
            'image_id': img_id,
            'iscrowd': torch.zeros((n,), dtype=torch.int64),
        }
        b = target['boxes']
        target['area'] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        if self.with_masks:
            target['masks'] = torch.stack(masks).to(torch.uint8) if n else torch.zeros((0, h, w), dtype=torch.uint8)
        img, target = resize_sample(img, target, self.img_size)
        return img.float() / 255.0, target


def category_labels(cat_ids: Sequence[int], label_space: str, ann_file: str = '') -> Dict[int, int]:
    """Category id -> training label: ``1..K`` in id order (``'contiguous'``) or the id itself (``'coco_ids'``,
    which needs integer ids >= 1: label 0 is the background)."""
    if label_space == 'contiguous':
        return {c: i + 1 for i, c in enumerate(cat_ids)}
    bad = [c for c in cat_ids if not isinstance(c, int) or c < 1]
    if bad:
        raise ValueError(f'category ids {bad} of {ann_file} cannot be labels (label 0 is the background, labels '
                         f'are integers); use label_space=\'contiguous\'.')
    return {c: c for c in cat_ids}


class ReplicaDataset(Dataset):
    """Item ``i`` -> list of ``num_repeats`` ``(image, target, ReplicaParams)`` replicas of source image ``i``.

    The randomness is a function of ``(seed, epoch, i)`` — call :meth:`set_epoch` each epoch — so runs are
    reproducible with any number of workers. ``augment=None`` gives identity replicas (evaluation).
    ``copy_paste`` (a :class:`~lt_timm.detection.copy_paste.CopyPaste`): each replica may get instances of another
    image of ``indices`` pasted first, in the source frame; their boxes go to the replica's ``ReplicaParams.pasted``.
    """

    def __init__(self, base: Dataset, num_repeats: int = 1, augment: Optional[Callable] = None,
                 indices: Optional[Sequence[int]] = None, seed: int = 0, copy_paste: Optional[Callable] = None):
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be >= 1, got {num_repeats}.')
        if copy_paste is not None and augment is None:
            raise ValueError('copy-paste is a training augmentation: it needs an augment (ReplicaAugment).')
        self.base = base
        self.num_repeats = num_repeats
        self.augment = augment
        self.copy_paste = copy_paste
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        """``i``: an index (``num_repeats`` replicas) or ``(index, count)`` (``count`` replicas: the block sizes of
        :class:`lt_timm.sampler.RepeatedAugBatchSampler`, see :class:`BlockBatchSampler`)."""
        i, count = (int(i[0]), int(i[1])) if isinstance(i, (tuple, list)) else (int(i), self.num_repeats)
        img, target = self.base[self.indices[i]]
        n = target['boxes'].shape[0]
        target['instance_ids'] = torch.arange(n)
        g = torch.Generator().manual_seed((self.seed * 1000003 + self.epoch * 10007 + i) % (2 ** 62))
        out = []
        for _ in range(count):
            if self.augment is None:
                t = dict(target)
                t['visible'] = torch.ones(n)
                out.append((img.clone(), t, identity_params(tuple(img.shape[-2:]))))
            elif self.copy_paste is None:
                out.append(self.augment(img, dict(target), generator=g))
            else:
                pimg, pt, pasted = self.copy_paste(img, dict(target), *self._donor(i, g), generator=g)
                out.append(self.augment(pimg, pt, generator=g, pasted=pasted))
        return out

    def _donor(self, i: int, g: torch.Generator):
        """Another image of the set (uniformly drawn; the image itself when the set has one image)."""
        n = len(self.indices)
        j = int(torch.randint(0, n - 1, (), generator=g)) if n > 1 else 0
        j = j + 1 if n > 1 and j >= i else j
        img, target = self.base[self.indices[j]]
        return img, target


def replica_collate(batch: List[List[tuple]]):
    """Flatten ``[[replicas of image 0], [replicas of image 1], ...]`` -> ``(images, targets, params)`` lists
    with the replicas of each image consecutive (the :mod:`lt_timm.layout` block layout)."""
    images, targets, params = [], [], []
    for item in batch:  # items may hold different numbers of replicas (the layout's short blocks)
        for img, t, p in item:
            images.append(img)
            targets.append(t)
            params.append(p)
    # Item-major order: the rows are laid out as lt_timm.layout.replica_groups(len(images), m) describes.
    return images, targets, params


class BlockBatchSampler(torch.utils.data.Sampler):
    """Turn the row batches of :class:`lt_timm.sampler.RepeatedAugBatchSampler` (an image index repeated once per
    replica, in the blocks of :func:`lt_timm.layout.block_sizes`) into ``(index, replicas)`` items for
    :class:`ReplicaDataset`: the loader then decodes each image once and augments it ``replicas`` times."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for batch in self.sampler:
            items, start = [], 0
            for size in self.sampler.blocks:
                items.append((batch[start], size))
                start += size
            yield items


def eval_collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def split_indices(n: int, val_size: int, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Seeded permutation of ``range(n)``; the last ``val_size`` are validation."""
    if not 0 <= val_size < n:
        raise ValueError(f'--val-size {val_size} must be between 0 and {n - 1}: the dataset has {n} images and the '
                         f'rest is the training set; lower --val-size.')
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:n - val_size], perm[n - val_size:]
