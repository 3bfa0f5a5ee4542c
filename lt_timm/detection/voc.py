"""PASCAL VOC 2012 for instance segmentation, as the paper prepares it (section 4.1.6).

"In order to train the Mask R-CNN with LossTransfrom on this dataset, we need to convert the VOC to a dataset that can
conduct the instance segmentation task. Here, we preprocess the dataset by using the algorithm [11,38] to split
distinct individual instances from multiple objects of the same class." Reference 38 is Fiorio & Gustedt, "Two linear
time union-find strategies for image processing" (1996): connected-component labelling. So an instance is a
connected component of one class in ``SegmentationClass`` (:func:`split_instances`; ``scipy.ndimage.label``, a
union-find style labelling). VOC draws a void border (index 255) around every object, so touching objects of one
class come apart; an object cut in two by an occluder becomes two instances (the price of the method).
(Reference 11, Shanmugam et al., "Better aggregation in test-time augmentation", does not describe such a split; the
citation looks misplaced.)

:class:`VOCInstanceDataset` reads VOC's own layout under ``root`` (``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png      palette PNG: class index per pixel (0 background, 1..20, 255 void)
    SegmentationObject/<id>.png     palette PNG: object index per pixel (0 background, 1..N, 255 void)
    Annotations/<id>.xml            objects: name, bndbox (1-based, inclusive), difficult
    ImageSets/Segmentation/<set>.txt, ImageSets/Main/<set>.txt   image ids, one a line

``instances``: ``'components'`` (the paper's split of ``SegmentationClass``), ``'objects'`` (VOC's own instance
masks in ``SegmentationObject``, each labelled with its pixels' class) or ``'annotations'`` (boxes and labels from
``Annotations/*.xml`` for the images of ``ImageSets/Main``, no masks: detection only; ``difficult`` objects left out
unless asked). Labels are 1..20 in VOC's class order (:data:`VOC_CLASSES`). The XML files are parsed with the
standard library's expat parser; a file that declares a DOCTYPE (entities) is refused.
"""
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import load_rgb, masks_to_boxes_safe, resize_sample

__all__ = ['VOCInstanceDataset', 'split_instances', 'object_instances', 'read_voc_annotation', 'read_index_png',
           'voc_image_sets', 'VOC_CLASSES', 'INSTANCE_SOURCES', 'VOID']

VOC_CLASSES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'diningtable',
               'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
INSTANCE_SOURCES = ('components', 'objects', 'annotations')
VOID = 255  # VOC's "void" index (object borders, ambiguous pixels)


def _require(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f'{what} not found: {path}')


def read_index_png(path: str) -> np.ndarray:
    """The index image of a VOC segmentation PNG (palette ``P`` or greyscale ``L`` mode), ``(H, W)`` uint8."""
    from PIL import Image
    _require(path, 'VOC segmentation PNG')
    with Image.open(path) as im:
        if im.mode not in ('P', 'L'):
            raise ValueError(f'{path} is a {im.mode} image, not an indexed (palette) PNG: VOC\'s segmentation PNGs '
                             f'hold class / object indices in a palette; use the files of the VOC2012 archive.')
        return np.asarray(im, dtype=np.uint8).copy()


def split_instances(class_mask: np.ndarray, connectivity: int = 8,
                    min_area: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The paper's instance split: the connected components of each class of a VOC class mask (``(H, W)``, 0
    background, 255 void, which belongs to no instance). ``connectivity``: 8 (diagonal neighbours connect) or 4.
    Components smaller than ``min_area`` pixels are left out. Returns ``masks`` ``(N, H, W)`` uint8 and ``labels``
    ``(N,)`` int64, ordered by class, then by the components' raster order."""
    from scipy import ndimage
    if connectivity not in (4, 8):
        raise ValueError(f'connectivity must be 4 or 8, got {connectivity}.')
    structure = np.ones((3, 3), dtype=bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    masks, labels = [], []
    for c in np.unique(class_mask):
        if c == 0 or c == VOID:
            continue
        comp, k = ndimage.label(class_mask == c, structure=structure)
        if k == 0:
            continue
        m = comp[None] == np.arange(1, k + 1, dtype=comp.dtype)[:, None, None]
        m = m[m.reshape(k, -1).sum(axis=1) >= min_area]
        masks.append(m)
        labels += [int(c)] * m.shape[0]
    h, w = class_mask.shape
    if not labels:
        return torch.zeros((0, h, w), dtype=torch.uint8), torch.zeros((0,), dtype=torch.int64)
    return torch.from_numpy(np.concatenate(masks).astype(np.uint8)), torch.tensor(labels, dtype=torch.int64)


def object_instances(object_mask: np.ndarray, class_mask: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """VOC's own instances: each object index of ``SegmentationObject`` (not 0 or 255) with the most frequent class
    of its pixels in ``SegmentationClass``. Returns ``masks`` ``(N, H, W)`` uint8 and ``labels`` ``(N,)``."""
    if object_mask.shape != class_mask.shape:
        raise ValueError(f'SegmentationObject and SegmentationClass sizes differ: {object_mask.shape} vs '
                         f'{class_mask.shape}.')
    ids = [int(i) for i in np.unique(object_mask) if i not in (0, VOID)]
    masks, labels = [], []
    for i in ids:
        m = object_mask == i
        classes = class_mask[m]
        classes = classes[(classes != 0) & (classes != VOID)]
        if classes.size == 0:
            continue
        masks.append(m)
        labels.append(int(np.bincount(classes).argmax()))
    h, w = object_mask.shape
    if not masks:
        return torch.zeros((0, h, w), dtype=torch.uint8), torch.zeros((0,), dtype=torch.int64)
    return torch.from_numpy(np.stack(masks).astype(np.uint8)), torch.tensor(labels, dtype=torch.int64)


def read_voc_annotation(path: str, include_difficult: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boxes (xyxy, pixel edges: VOC's 1-based inclusive ``xmin..xmax`` becomes ``xmin - 1 .. xmax``) and labels of
    a VOC ``Annotations/*.xml``; ``difficult`` objects only with ``include_difficult``. Unknown class names and
    malformed files are ValueErrors naming the file."""
    import xml.etree.ElementTree as ET
    _require(path, 'VOC annotation')
    with open(path, 'rb') as f:
        data = f.read()
    if b'<!DOCTYPE' in data or b'<!ENTITY' in data:
        raise ValueError(f'{path} declares a DOCTYPE/ENTITY, which VOC annotations never do; refused (not parsed).')
    try:
        root = ET.fromstring(data)
        boxes, labels = [], []
        for obj in root.iter('object'):
            name = (obj.findtext('name') or '').strip()
            if name not in VOC_CLASSES:
                raise ValueError(f'unknown VOC class {name!r}')
            if not include_difficult and (obj.findtext('difficult') or '0').strip() == '1':
                continue
            bb = obj.find('bndbox')
            x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax'))
            boxes.append([x1 - 1, y1 - 1, x2, y2])
            labels.append(VOC_CLASSES.index(name) + 1)
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f'{path} is not a VOC annotation file ({e}).') from e
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)


class VOCInstanceDataset(Dataset):
    """PASCAL VOC 2012 as an instance segmentation (or, with ``instances='annotations'``, detection) dataset in this
    package's format: ``(image, target)`` with ``boxes``, ``labels`` (1..20), ``masks``, ``image_id``, ``area``,
    ``iscrowd``; ``categories`` for the evaluation. See the module docstring for the layout and ``instances``.

    Args:
        root: the ``VOC2012`` folder.
        image_set: name of the ``ImageSets/Segmentation`` (``Main`` for ``annotations``) list: train, val, trainval.
        instances: ``'components'`` (the paper), ``'objects'`` or ``'annotations'``.
        connectivity, min_area: of the connected components (``'components'``).
        img_size: resize so the longer side is this (reduced-resolution training).
        include_difficult: keep ``difficult`` objects (``'annotations'``).
    """

    num_classes = len(VOC_CLASSES) + 1
    class_names = list(VOC_CLASSES)
    categories = [{'id': i + 1, 'name': n} for i, n in enumerate(VOC_CLASSES)]

    def __init__(self, root: str, image_set: str = 'train', instances: str = 'components', connectivity: int = 8,
                 min_area: int = 1, img_size: Optional[int] = None, include_difficult: bool = False):
        if instances not in INSTANCE_SOURCES:
            raise ValueError(f'instances must be one of {INSTANCE_SOURCES}, got {instances!r}.')
        _require(root, 'VOC2012 directory')
        self.root, self.instances, self.img_size = root, instances, img_size
        self.connectivity, self.min_area, self.include_difficult = connectivity, min_area, include_difficult
        listing = os.path.join(root, 'ImageSets', 'Main' if instances == 'annotations' else 'Segmentation',
                               f'{image_set}.txt')
        _require(listing, f'VOC image set {image_set!r}')
        with open(listing) as f:
            self.ids = [line.split()[0] for line in f if line.strip()]
        if not self.ids:
            raise FileNotFoundError(f'no image ids in {listing}')
        folders = ['JPEGImages'] + (['Annotations'] if instances == 'annotations' else ['SegmentationClass'])
        folders += ['SegmentationObject'] if instances == 'objects' else []
        for d in folders:
            _require(os.path.join(root, d), f'VOC folder {d}/')

    def __len__(self) -> int:
        return len(self.ids)

    def _instances(self, name: str, size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        if self.instances == 'annotations':
            boxes, labels = read_voc_annotation(os.path.join(self.root, 'Annotations', f'{name}.xml'),
                                                self.include_difficult)
            return {'boxes': boxes, 'labels': labels}
        cls = read_index_png(os.path.join(self.root, 'SegmentationClass', f'{name}.png'))
        if cls.shape != tuple(size):
            raise ValueError(f'SegmentationClass/{name}.png is {cls.shape[1]}x{cls.shape[0]}, its image '
                             f'{size[1]}x{size[0]}: the files do not belong together.')
        if self.instances == 'components':
            masks, labels = split_instances(cls, self.connectivity, self.min_area)
        else:
            masks, labels = object_instances(
                read_index_png(os.path.join(self.root, 'SegmentationObject', f'{name}.png')), cls)
        return {'boxes': masks_to_boxes_safe(masks), 'labels': labels, 'masks': masks}

    def __getitem__(self, idx: int):
        name = self.ids[idx]
        img = load_rgb(os.path.join(self.root, 'JPEGImages', f'{name}.jpg'))
        target = self._instances(name, tuple(img.shape[-2:]))
        b, n = target['boxes'], target['labels'].shape[0]
        target.update(image_id=idx, area=(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
                      iscrowd=torch.zeros((n,), dtype=torch.int64))
        img, target = resize_sample(img, target, self.img_size)
        return img.float() / 255.0, target


def voc_image_sets(root: str, instances: str = 'components') -> List[str]:
    """The image set names (``train``, ``val``, ...) available under ``root`` for ``instances``."""
    d = os.path.join(root, 'ImageSets', 'Main' if instances == 'annotations' else 'Segmentation')
    return sorted(f[:-4] for f in os.listdir(d) if f.endswith('.txt')) if os.path.isdir(d) else []

