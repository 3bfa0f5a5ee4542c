"""Invertible replica augmentation for detection: horizontal flip, scale, translation and crop.

Every replica of a source image of size ``(H, W)`` is produced by one composition, applied in this order
to the image, its boxes (xyxy, pixels) and its instance masks::

    x -> W - x            if flip            (horizontal flip of the source)
    x -> x * sx, y * sy                      (scale; sx = round(W*s)/W, sy = round(H*s)/H exactly)
    x -> x + tx, y + ty                      (integer translation)
    crop to the canvas [0, out_w) x [0, out_h)   (default canvas = source size)

The parameters are recorded in :class:`ReplicaParams`; :func:`invert_boxes` maps boxes predicted on the
replica back into the source frame (``x -> (x - tx) / sx``, then ``x -> W - x`` if flipped), and
:func:`invert_masks` does the same for per-pixel masks/logits. Boxes that the crop cut are clipped to the
canvas; their ``visible`` fraction (clipped area / unclipped area) is reported so that callers can drop
instances that the augmentation cut out.

A *random crop* (the paper's Table 4: "Horizontal flipping, random cropping and simple copy-paste data
augmentations are used") is the same composition without scaling: the canvas is the crop window
``[x0, x0 + cw) x [y0, y0 + ch)`` of the (flipped) source, i.e. ``out_size = (ch, cw)``, ``tx = -x0``,
``ty = -y0`` (:func:`sample_crop_params`); the replica is the crop at its own size (the detector's transform
resizes it, as any image). Simple copy-paste happens before, in the source frame
(:mod:`lt_timm.detection.copy_paste`); the boxes it pasted are kept in ``ReplicaParams.pasted`` (source frame) so
that the matching can leave out detections of objects that the source image does not hold.

The image and mask forward path uses ``torchvision.transforms.v2.functional`` (``horizontal_flip``,
``resize``); box arithmetic is done here so that forward and inverse are exact inverses of each other.
"""
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = [
    'ReplicaParams', 'ReplicaAugment', 'sample_params', 'sample_crop_params', 'identity_params', 'forward_boxes',
    'invert_boxes',
    'clip_boxes', 'box_area', 'apply_image', 'apply_masks', 'invert_masks', 'apply_replica',
]


@dataclass(frozen=True)
class ReplicaParams:
    """Geometry of one replica. ``src_size``/``out_size`` are ``(H, W)``; ``tx, ty`` are integer pixels.
    ``pasted``: xyxy source-frame boxes of the objects simple copy-paste put into this replica (no counterpart in
    the source image or in the other replicas)."""
    src_size: Tuple[int, int]
    out_size: Tuple[int, int]
    flip: bool = False
    scaled_size: Optional[Tuple[int, int]] = None  # (h, w) after scaling; None = no scaling
    tx: int = 0
    ty: int = 0
    pasted: Tuple[Tuple[float, float, float, float], ...] = ()

    @property
    def sx(self) -> float:
        return 1.0 if self.scaled_size is None else self.scaled_size[1] / self.src_size[1]

    @property
    def sy(self) -> float:
        return 1.0 if self.scaled_size is None else self.scaled_size[0] / self.src_size[0]

    def to_dict(self) -> Dict:
        return asdict(self)


def identity_params(size: Tuple[int, int]) -> ReplicaParams:
    size = (int(size[0]), int(size[1]))
    return ReplicaParams(src_size=size, out_size=size)


def sample_params(
        size: Tuple[int, int],
        flip_prob: float = 0.5,
        scale_range: Tuple[float, float] = (0.8, 1.2),
        translate_frac: float = 0.1,
        out_size: Optional[Tuple[int, int]] = None,
        generator: Optional[torch.Generator] = None,
) -> ReplicaParams:
    """Draw one replica's parameters. ``translate_frac`` bounds ``|tx| <= frac * W`` (and ``ty``), around
    the placement that centres the scaled image on the canvas (so scaling up = a random crop)."""
    h, w = int(size[0]), int(size[1])
    oh, ow = (h, w) if out_size is None else (int(out_size[0]), int(out_size[1]))

    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    flip = float(torch.rand((), generator=generator)) < flip_prob
    s = u(*scale_range)
    sh, sw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    scaled = None if (sh, sw) == (h, w) else (sh, sw)
    tx = int(round((ow - sw) / 2 + u(-translate_frac, translate_frac) * w))
    ty = int(round((oh - sh) / 2 + u(-translate_frac, translate_frac) * h))
    return ReplicaParams(src_size=(h, w), out_size=(oh, ow), flip=flip, scaled_size=scaled, tx=tx, ty=ty)


def sample_crop_params(
        size: Tuple[int, int],
        flip_prob: float = 0.5,
        crop_scale: Tuple[float, float] = (0.5, 1.0),
        generator: Optional[torch.Generator] = None,
) -> ReplicaParams:
    """Draw a flip and a random crop: each side of the window is a fraction ``U(crop_scale)`` of the source's
    (drawn independently, at least 1 px), its position uniform; the canvas is the window (no scaling)."""
    h, w = int(size[0]), int(size[1])
    lo, hi = float(crop_scale[0]), float(crop_scale[1])

    def u(a, b):
        return a + (b - a) * float(torch.rand((), generator=generator))

    flip = float(torch.rand((), generator=generator)) < flip_prob
    ch, cw = max(1, min(h, int(round(h * u(lo, hi))))), max(1, min(w, int(round(w * u(lo, hi)))))
    y0 = int(torch.randint(0, h - ch + 1, (), generator=generator))
    x0 = int(torch.randint(0, w - cw + 1, (), generator=generator))
    return ReplicaParams(src_size=(h, w), out_size=(ch, cw), flip=flip, tx=-x0, ty=-y0)


# ----------------------------------------------------------------------------------------------- boxes
def forward_boxes(boxes: torch.Tensor, p: ReplicaParams) -> torch.Tensor:
    """Source-frame xyxy boxes -> replica frame, *before* clipping to the canvas."""
    b = boxes.to(torch.float32).clone()
    if b.numel() == 0:
        return b.reshape(0, 4)
    w = p.src_size[1]
    if p.flip:
        b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    b = b * b.new_tensor([p.sx, p.sy, p.sx, p.sy])
    return b + b.new_tensor([p.tx, p.ty, p.tx, p.ty])


def invert_boxes(boxes: torch.Tensor, p: ReplicaParams) -> torch.Tensor:
    """Replica-frame xyxy boxes -> source frame (exact inverse of :func:`forward_boxes`). Differentiable."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).to(torch.float32)
    b = boxes.to(torch.float32)
    b = (b - b.new_tensor([p.tx, p.ty, p.tx, p.ty])) / b.new_tensor([p.sx, p.sy, p.sx, p.sy])
    if p.flip:
        w = p.src_size[1]
        b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    return b


def clip_boxes(boxes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    h, w = size
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                        boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    if boxes.numel() == 0:
        return boxes.new_zeros((0,))
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


# ----------------------------------------------------------------------------------------- images/masks
def _place(x: torch.Tensor, p: ReplicaParams) -> torch.Tensor:
    """Paste ``x`` (..., h, w) onto a zero canvas of ``out_size`` at offset (tx, ty), cropping what falls out."""
    oh, ow = p.out_size
    h, w = x.shape[-2:]
    out = x.new_zeros((*x.shape[:-2], oh, ow))
    x0, y0 = max(p.tx, 0), max(p.ty, 0)
    x1, y1 = min(p.tx + w, ow), min(p.ty + h, oh)
    if x1 > x0 and y1 > y0:
        out[..., y0:y1, x0:x1] = x[..., y0 - p.ty:y1 - p.ty, x0 - p.tx:x1 - p.tx]
    return out


def apply_image(img: torch.Tensor, p: ReplicaParams) -> torch.Tensor:
    """(C, H, W) float image -> replica."""
    if p.flip:
        img = F.horizontal_flip(img)
    if p.scaled_size is not None:
        img = F.resize(img, list(p.scaled_size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    return _place(img, p)


def apply_masks(masks: torch.Tensor, p: ReplicaParams) -> torch.Tensor:
    """(N, H, W) instance masks -> replica (nearest-neighbour resampling; dtype kept)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *p.out_size))
    if p.flip:
        masks = F.horizontal_flip(masks)
    if p.scaled_size is not None:
        masks = F.resize(masks, list(p.scaled_size), interpolation=InterpolationMode.NEAREST)
    return _place(masks, p)


def invert_masks(masks: torch.Tensor, p: ReplicaParams, mode: str = 'bilinear') -> torch.Tensor:
    """(N, out_h, out_w) replica-frame masks/logits -> (N, H, W) source frame. Regions the crop removed are 0."""
    n = masks.shape[0]
    h, w = p.src_size
    sh, sw = p.scaled_size if p.scaled_size is not None else (h, w)
    oh, ow = p.out_size
    # the scaled source occupies canvas [tx, tx+sw) x [ty, ty+sh): cut it out (zero where outside the canvas)
    sub = masks.new_zeros((n, sh, sw))
    x0, y0 = max(p.tx, 0), max(p.ty, 0)
    x1, y1 = min(p.tx + sw, ow), min(p.ty + sh, oh)
    if x1 > x0 and y1 > y0 and n:
        sub[:, y0 - p.ty:y1 - p.ty, x0 - p.tx:x1 - p.tx] = masks[:, y0:y1, x0:x1]
    if (sh, sw) != (h, w) and n:
        kw = {'align_corners': False} if mode == 'bilinear' else {}
        sub = TF.interpolate(sub[:, None].float(), size=(h, w), mode=mode, **kw)[:, 0].to(masks.dtype)
    if p.flip:
        sub = sub.flip(-1)
    return sub


INSTANCE_KEYS = ('boxes', 'labels', 'masks', 'area', 'iscrowd', 'instance_ids', 'visible')


def apply_replica(
        img: torch.Tensor, target: Dict[str, torch.Tensor], p: ReplicaParams,
        min_visible: float = 0.3, min_size: float = 1.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Augment an image and its target. Instances whose visible fraction is below ``min_visible`` or whose
    clipped box is thinner than ``min_size`` px are dropped. The returned target keeps ``instance_ids``
    (index of each kept instance in the source target; negative for objects copy-paste added) and ``visible``
    (clipped / unclipped area, times the target's own ``visible`` when it has one: copy-paste's unoccluded
    fraction)."""
    boxes = target['boxes']
    moved = forward_boxes(boxes, p)
    clipped = clip_boxes(moved, p.out_size)
    full = box_area(moved)
    visible = torch.where(full > 0, box_area(clipped) / full.clamp_min(1e-12), torch.zeros_like(full))
    if 'visible' in target:
        visible = visible * target['visible'].to(visible.dtype)
    wh_ok = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    keep = (visible >= min_visible) & wh_ok
    n = boxes.shape[0]
    ids = target.get('instance_ids', torch.arange(n))
    out = {k: v for k, v in target.items() if k not in INSTANCE_KEYS}
    for k in ('labels', 'iscrowd'):
        if k in target:
            out[k] = target[k][keep]
    out['boxes'] = clipped[keep]
    out['instance_ids'] = ids[keep]
    out['visible'] = visible[keep]
    if 'masks' in target:
        out['masks'] = apply_masks(target['masks'][keep], p)
    if 'area' in target:
        out['area'] = box_area(out['boxes'])
    return apply_image(img, p), out


class ReplicaAugment:
    """Callable that draws parameters and augments ``(img, target)``; returns ``(img, target, params)``.

    ``crop_scale=None``: flip + scale + translation (:func:`sample_params`); ``crop_scale=(lo, hi)``: flip + random
    crop (:func:`sample_crop_params`; ``scale_range`` and ``translate_frac`` must then be the identity, (1, 1) and
    0). ``pasted``: the source-frame boxes copy-paste added, recorded in the params."""

    def __init__(self, flip_prob: float = 0.5, scale_range: Sequence[float] = (0.8, 1.2),
                 translate_frac: float = 0.1, min_visible: float = 0.3,
                 crop_scale: Optional[Sequence[float]] = None):
        self.flip_prob = flip_prob
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.translate_frac = translate_frac
        self.min_visible = min_visible
        self.crop_scale = None if crop_scale is None else (float(crop_scale[0]), float(crop_scale[1]))
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f'crop scale must satisfy 0 < min <= max <= 1 (fractions of each side), got '
                                 f'{list(crop_scale)}.')
            if self.scale_range != (1.0, 1.0) or translate_frac:
                raise ValueError('a random crop replaces scale + translation: pass scale (1, 1) and translation 0 '
                                 'with a crop scale.')

    def __call__(self, img, target, generator: Optional[torch.Generator] = None, pasted=()):
        size = tuple(img.shape[-2:])
        if self.crop_scale is None:
            p = sample_params(size, self.flip_prob, self.scale_range, self.translate_frac, generator=generator)
        else:
            p = sample_crop_params(size, self.flip_prob, self.crop_scale, generator=generator)
        if len(pasted):
            p = replace(p, pasted=tuple(tuple(float(v) for v in b) for b in pasted))
        img, target = apply_replica(img, target, p, self.min_visible)
        return img, target, p
