"""Simple copy-paste (Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for Instance
Segmentation", CVPR 2021), one of the paper's Table 4 augmentations ("Horizontal flipping, random cropping and simple
copy-paste data augmentations are used"; the paper gives no parameters and does not cite a source for it).

A random subset of the instances of another training image (the *donor*) is pasted onto the image: the donor is
flipped and rescaled at random, placed at a random position, and its selected instance masks are the paste's alpha
(binary, no blending: the "simple" variant). The target is updated as Ghiasi et al. do: the pasted instances are
added (masks, boxes from the masks, labels), the image's own instances lose the pixels the paste covers (masks
updated, boxes recomputed from what is left), and instances left with less than ``min_visible`` of their pixels are
dropped.

Everything happens in the *source* frame, before the replica's geometric augmentation
(:mod:`lt_timm.detection.transforms`). So the instance alignment's inverse stays the replica's geometry: a source
instance is where it was (its ``visible`` fraction says how much of it the paste left), and the pasted objects, which
the source image and the other replicas do not hold, carry ``instance_ids`` < 0 (never grouped with anything) and
their source-frame boxes are recorded (``ReplicaParams.pasted``) for the annotation-free matchings.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = ['CopyPaste', 'paste_instances', 'place_donor', 'describe', 'PASTED_ID']

PASTED_ID = -1  # instance id of a pasted object: no counterpart in the source image


def _u(lo: float, hi: float, g: Optional[torch.Generator]) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes (pixel edges: x2 = last column + 1) of non-empty ``(N, H, W)`` masks, vectorised."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    h, w = masks.shape[-2:]
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)
    xs, ys = torch.arange(w), torch.arange(h)
    big = torch.tensor(1 << 30)
    x1 = torch.where(cols, xs, big).min(dim=1).values
    x2 = torch.where(cols, xs, -1).max(dim=1).values + 1
    y1 = torch.where(rows, ys, big).min(dim=1).values
    y2 = torch.where(rows, ys, -1).max(dim=1).values + 1
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def place_donor(donor_img: torch.Tensor, donor_masks: torch.Tensor, size: Tuple[int, int], flip: bool,
                scale: float, offset: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The donor image and its masks on a canvas of ``size`` (H, W): flipped, resized by ``scale`` (bilinear /
    nearest) and placed with its top-left corner at ``offset`` (x, y), cut to the canvas (zero elsewhere)."""
    if flip:
        donor_img, donor_masks = F.horizontal_flip(donor_img), F.horizontal_flip(donor_masks)
    dh, dw = donor_img.shape[-2:]
    nh, nw = max(1, int(round(dh * scale))), max(1, int(round(dw * scale)))
    if (nh, nw) != (dh, dw):
        donor_img = F.resize(donor_img, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
        if donor_masks.shape[0]:
            donor_masks = F.resize(donor_masks, [nh, nw], interpolation=InterpolationMode.NEAREST)
        else:
            donor_masks = donor_masks.new_zeros((0, nh, nw))
    h, w = size
    ox, oy = offset
    img = donor_img.new_zeros((donor_img.shape[0], h, w))
    masks = donor_masks.new_zeros((donor_masks.shape[0], h, w))
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + nw, w), min(oy + nh, h)
    if x1 > x0 and y1 > y0:
        img[:, y0:y1, x0:x1] = donor_img[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        masks[:, y0:y1, x0:x1] = donor_masks[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    return img, masks


def paste_instances(img: torch.Tensor, target: Dict, paste_img: torch.Tensor, paste_masks: torch.Tensor,
                    paste_labels: torch.Tensor, min_visible: float = 0.3) -> Tuple[torch.Tensor, Dict]:
    """Paste ``paste_masks`` (``(K, H, W)``, already placed in ``img``'s frame, non-empty) of ``paste_img`` onto
    ``img`` and update ``target`` (``boxes``, ``labels``, ``masks``, optional ``instance_ids``, ``iscrowd``,
    ``area``): own instances lose the covered pixels (boxes recomputed where a mask changed), those left with less
    than ``min_visible`` of their pixels are dropped, survivors get ``visible`` = kept pixel fraction, and the pasted
    ones are appended with ``instance_ids = PASTED_ID``, ``visible`` 1 and boxes from their masks."""
    masks = target['masks'].bool()
    n, k = masks.shape[0], paste_masks.shape[0]
    alpha = paste_masks.bool().any(dim=0)
    kept = masks & ~alpha
    before = masks.flatten(1).sum(dim=1).float()
    after = kept.flatten(1).sum(dim=1).float()
    visible = torch.where(before > 0, after / before.clamp_min(1), torch.zeros_like(before))
    keep = (visible >= min_visible) & (after > 0)
    changed = after < before
    boxes = target['boxes'].float().clone()
    if bool(changed.any()):
        boxes[changed] = _mask_boxes(kept[changed])
    ids = target.get('instance_ids', torch.arange(n))
    out = {key: v for key, v in target.items()}
    out['boxes'] = torch.cat([boxes[keep], _mask_boxes(paste_masks.bool())])
    out['labels'] = torch.cat([target['labels'][keep], paste_labels.to(target['labels'].dtype)])
    out['masks'] = torch.cat([kept[keep], paste_masks.bool()]).to(target['masks'].dtype)
    out['instance_ids'] = torch.cat([ids[keep], torch.full((k,), PASTED_ID, dtype=ids.dtype)])
    prior = target.get('visible', torch.ones(n))
    out['visible'] = torch.cat([(visible * prior)[keep], torch.ones(k)])
    if 'iscrowd' in target:
        out['iscrowd'] = torch.cat([target['iscrowd'][keep], target['iscrowd'].new_zeros((k,))])
    if 'area' in target:
        b = out['boxes']
        out['area'] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    a = alpha.to(img.dtype)
    return img * (1 - a) + paste_img * a, out


@dataclass
class CopyPaste:
    """Simple copy-paste as a callable: ``(img, target, donor_img, donor_target, generator) -> (img, target,
    pasted_boxes)``.

    ``prob``: chance that a replica gets a paste at all. Each donor instance is selected with probability 0.5 (at
    least one). The donor is flipped with probability 0.5, rescaled so that its longer side is the image's times
    ``U(scale_range)`` (a scale jitter), and placed with its centre uniform over the image. Pasted instances cut to
    less than ``min_visible`` of their pixels by the image border are left out. None of these values is given by the
    paper; they follow Ghiasi et al.'s simple copy-paste (random subset, random scale jitter, flip) at a moderate
    jitter.
    """
    prob: float = 0.5
    scale_range: Tuple[float, float] = (0.5, 1.5)
    min_visible: float = 0.3

    def __post_init__(self):
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f'copy-paste probability must be in [0, 1], got {self.prob}.')
        lo, hi = (float(v) for v in self.scale_range)
        if not 0.0 < lo <= hi:
            raise ValueError(f'copy-paste scale range must satisfy 0 < min <= max, got {list(self.scale_range)}.')
        self.scale_range = (lo, hi)

    def __call__(self, img: torch.Tensor, target: Dict, donor_img: torch.Tensor, donor_target: Dict,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict, List[List[float]]]:
        g = generator
        if 'masks' not in target or 'masks' not in donor_target:
            raise ValueError('simple copy-paste pastes instance masks: the dataset must load masks (Mask R-CNN).')
        nd = int(donor_target['masks'].shape[0])
        if float(torch.rand((), generator=g)) >= self.prob or nd == 0:
            return img, target, []
        pick = torch.rand(nd, generator=g) < 0.5
        if not bool(pick.any()):
            pick[int(torch.randint(0, nd, (), generator=g))] = True
        h, w = img.shape[-2:]
        dh, dw = donor_img.shape[-2:]
        scale = _u(*self.scale_range, g) * max(h, w) / max(dh, dw)
        flip = float(torch.rand((), generator=g)) < 0.5
        nh, nw = max(1, int(round(dh * scale))), max(1, int(round(dw * scale)))
        offset = (int(round(_u(0, w, g) - nw / 2)), int(round(_u(0, h, g) - nh / 2)))
        full = donor_target['masks'][pick]
        paste_img, paste_masks = place_donor(donor_img, full, (h, w), flip, scale, offset)
        whole = _placed_areas(full, scale)
        inside = paste_masks.flatten(1).sum(dim=1).float()
        ok = (inside > 0) & (inside >= self.min_visible * whole)
        if not bool(ok.any()):
            return img, target, []
        paste_masks, labels = paste_masks[ok], donor_target['labels'][pick][ok]
        img, target = paste_instances(img, target, paste_img, paste_masks, labels, self.min_visible)
        pasted = target['boxes'][target['instance_ids'] == PASTED_ID]
        return img, target, pasted.tolist()


def _placed_areas(masks: torch.Tensor, scale: float) -> torch.Tensor:
    """Pixel count of each mask after the donor's rescaling (before the canvas cuts it; ``scale**2`` times the
    count, which nearest-neighbour resizing matches up to rounding): the reference of the pasted instances' visible
    fraction."""
    return masks.flatten(1).sum(dim=1).float() * scale * scale


def describe(cp: Optional[CopyPaste]) -> str:
    """One line for the run log."""
    if cp is None:
        return 'copy-paste off'
    return f'copy-paste p={cp.prob} scale {list(cp.scale_range)} min visible {cp.min_visible}'

