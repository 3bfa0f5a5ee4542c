"""Instance-level LossTransform for torchvision's ``FasterRCNN`` / ``MaskRCNN`` (models unchanged).

Design
------
A training batch holds ``m`` consecutive replicas of each source image (:mod:`lt_timm.layout`), each made by
:mod:`lt_timm.detection.transforms` with recorded :class:`~lt_timm.detection.transforms.ReplicaParams`. Each
replica's target carries ``instance_ids`` (index of the instance in the source annotation) and ``visible``
(visible-area fraction after cropping).

:class:`InstanceLossTransform` runs torchvision's own training path from the model's public submodules
(``transform`` -> ``backbone`` -> ``rpn`` -> ``roi_heads``), which yields the usual loss dict, and keeps the
FPN features. For the consistency term it uses *annotation-based alignment* (the paper's ``Resort(p|y)``):
for every ground-truth instance ``j`` of a source image, every replica that still sees it (``visible >=
min_visible``) gives an instance prediction by running the model's own RoI heads on RoI-aligned features of
*its* version of the GT box. Rows belonging to the same (image, instance) form a group, and

* class term: ``mean_rows KL(pbar || p_row)`` of the box classifier's softmax, via
  :func:`lt_timm.loss.grouped_kl` (pbar = mean distribution of the group);
* box term: the class-specific regressed box is decoded, mapped back to the model input's un-resized replica
  frame and then to the source frame (:func:`~lt_timm.detection.transforms.invert_boxes`), normalised by the
  source image size, and pulled to the mean box of its group with smooth-L1 (summed over the 4 coordinates);
* mask term (Mask R-CNN): the class's 28x28 mask logits are box-relative, hence invariant to scale and
  translation; flipped replicas are flipped back, and the per-pixel Bernoulli KL to the group consensus
  (again :func:`grouped_kl`) is averaged over pixels.

Box and mask terms use only replicas in which the instance is *fully* visible (a cropped box's regression
target is the visible part, which is not comparable across replicas); the class term uses every replica with
``visible >= min_visible``. Groups of one row contribute nothing and are not counted in the means.

``loss_consistency = rho * (class + box_weight * box + mask_weight * mask)`` is added to torchvision's loss
dict. It costs one extra RoI-head pass over the GT boxes only (a handful of RoIs per image), no extra backbone
pass. Empty images, degenerate boxes (dropped before torchvision sees them) and replicas that lost every
instance give a zero term and a finite loss. With ``rho = 0`` the term is only measured (no gradient).
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layout import replica_groups
from ..loss import grouped_kl, log_distribution
from .transforms import ReplicaParams, identity_params

__all__ = ['InstanceLossTransform', 'sanitize_targets']


def sanitize_targets(targets: List[Dict[str, torch.Tensor]], min_size: float = 1e-3) -> List[Dict[str, torch.Tensor]]:
    """Drop degenerate boxes (width or height < ``min_size``) and non-finite boxes, with their masks/labels.

    One host synchronisation per batch (is every box fine?); targets are only rebuilt when some box is not."""
    oks = []
    for t in targets:
        b = t['boxes']
        oks.append(torch.isfinite(b).all(dim=1) & ((b[:, 2] - b[:, 0]) >= min_size)
                   & ((b[:, 3] - b[:, 1]) >= min_size) if b.shape[0] else None)
    present = [ok for ok in oks if ok is not None]
    if not present or bool(torch.cat([ok.to(present[0].device) for ok in present]).all()):
        return list(targets)
    out = []
    for t, ok in zip(targets, oks):
        n = t['boxes'].shape[0]
        if ok is None:
            out.append(t)
            continue
        out.append({k: (v[ok] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n and k != 'image_id'
                        else v) for k, v in t.items()})
    return out


def _first_member(member: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` bool membership -> for each row, the index of the first column that is True (0 if none)."""
    return member.to(torch.uint8).argmax(dim=1)


class InstanceLossTransform(nn.Module):
    """Wrap a torchvision ``FasterRCNN``/``MaskRCNN``: training forward returns its loss dict +
    ``loss_consistency``; eval forward returns the model's detections unchanged.

    Args:
        model: a torchvision ``GeneralizedRCNN`` (``FasterRCNN``, ``MaskRCNN``).
        num_repeats: replicas per source image ``m`` (consecutive in the batch).
        rho: weight of the consistency term (0 = plain multi-task loss, term still measured for logging).
        box_weight, mask_weight: weights of the box and mask terms inside the consistency.
        min_visible: replicas where an instance's visible fraction is below this are left out of its group.
        box_beta: smooth-L1 beta for the (image-size normalised) box term.
        detach_consensus: stop gradients through the consensus.
    After each training call ``last_parts`` holds the detached class/box/mask terms and group counts.
    """

    def __init__(self, model: nn.Module, num_repeats: int, rho: float = 1.0, box_weight: float = 1.0,
                 mask_weight: float = 1.0, min_visible: float = 0.5, box_beta: float = 0.02,
                 detach_consensus: bool = False):
        super().__init__()
        if not isinstance(num_repeats, int) or num_repeats < 1:
            raise ValueError(f'num_repeats must be an integer >= 1 (--aug-repeats), got {num_repeats!r}.')
        if not rho >= 0:
            raise ValueError(f'rho must be >= 0 (--lt-rho), got {rho!r}.')
        self.model = model
        self.num_repeats = num_repeats
        self.rho = float(rho)
        self.box_weight = float(box_weight)
        self.mask_weight = float(mask_weight)
        self.min_visible = float(min_visible)
        self.box_beta = float(box_beta)
        self.detach_consensus = detach_consensus
        self.last_parts_tensors: Dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (f'num_repeats={self.num_repeats}, rho={self.rho}, box_weight={self.box_weight}, '
                f'mask_weight={self.mask_weight}, min_visible={self.min_visible}')

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None,
                replica_params: Optional[Sequence[ReplicaParams]] = None):
        if not self.training:
            return self.model(images)
        if targets is None or len(targets) != len(images):
            raise ValueError('InstanceLossTransform in training mode needs one target dict per image.')
        model = self.model
        targets = sanitize_targets(targets)
        original_sizes = [tuple(int(s) for s in img.shape[-2:]) for img in images]
        if replica_params is None:
            replica_params = [identity_params(s) for s in original_sizes]
        if len(replica_params) != len(images):
            raise ValueError(f'{len(replica_params)} replica_params for {len(images)} images.')
        image_list, tgts = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            from collections import OrderedDict
            features = OrderedDict([('0', features)])
        proposals, rpn_losses = model.rpn(image_list, features, tgts)
        _, det_losses = model.roi_heads(features, proposals, image_list.image_sizes, tgts)
        losses = dict(det_losses)
        losses.update(rpn_losses)
        if self.rho > 0:
            cons = self.consistency(features, image_list.image_sizes, original_sizes, tgts, replica_params)
            losses['loss_consistency'] = self.rho * cons
        else:
            with torch.no_grad():
                self.consistency(features, image_list.image_sizes, original_sizes, tgts, replica_params)
            losses['loss_consistency'] = image_list.tensors.new_zeros(())
        return losses

    # -------------------------------------------------------------------------------------- consistency
    @property
    def last_parts(self) -> Dict[str, float]:
        """The detached class/box/mask terms and the number of groups of the last call, as Python numbers (one host
        synchronisation, on access only). :attr:`last_parts_tensors` has them as 0-d tensors on the device."""
        t = self.last_parts_tensors
        if not t:
            return {'cls': 0.0, 'box': 0.0, 'mask': 0.0, 'groups': 0}
        vals = torch.stack([t['cls'].float(), t['box'].float(), t['mask'].float(), t['groups'].float()]).tolist()
        return {'cls': vals[0], 'box': vals[1], 'mask': vals[2], 'groups': int(vals[3])}

    def consistency(self, features, image_sizes, original_sizes, targets, replica_params) -> torch.Tensor:
        """The unweighted consistency term (class + box_weight*box + mask_weight*mask).

        Vectorised over all GT rows of the batch: the (image, instance) groups come from an ``(n, n)`` comparison
        of row keys on the device (each group is named by its first row; rows left out of a term form groups of
        their own and get weight 0), the RoI heads run once on every GT box, and the replica geometry is one small
        table copied to the device once. No Python loop over rows or instances and no host synchronisation.
        """
        heads = self.model.roi_heads
        b = len(targets)
        first = next(iter(features.values()))
        device = first.device
        zero = sum(f.sum() for f in features.values()) * 0.0  # keeps the graph connected, exactly 0
        counts = [int(t['boxes'].shape[0]) for t in targets]
        n = sum(counts)
        nothing = first.new_zeros((), dtype=torch.float32)
        self.last_parts_tensors = {'cls': nothing, 'box': nothing, 'mask': nothing,
                                   'groups': torch.zeros((), dtype=torch.long, device=device)}
        if n == 0:
            return zero
        rep = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(counts, device=device),
                                      output_size=n)  # replica of each row
        ids = torch.cat([t['instance_ids'].to(device).long().reshape(-1) if 'instance_ids' in t
                         else torch.arange(c, device=device) for t, c in zip(targets, counts)])
        vis = torch.cat([t['visible'].to(device).reshape(-1) if 'visible' in t
                         else torch.ones(c, device=device) for t, c in zip(targets, counts)])
        keep = vis >= self.min_visible
        full = vis.float() >= 1.0 - 1e-6
        key = replica_groups(b, self.num_repeats, device=device)[rep] * (1 << 20) + ids
        same = key.view(-1, 1) == key.view(1, -1)
        arange = torch.arange(n, device=device)

        # class term: rows visible enough, in groups of >= 2 of them
        member = same & keep.view(1, -1) & keep.view(-1, 1)
        multi = keep & (member.sum(dim=1) >= 2)
        gid = torch.where(keep, _first_member(member), arange)
        boxes = [t['boxes'].float() for t in targets]
        all_boxes = torch.cat(boxes)
        labels = torch.cat([t['labels'] for t in targets]).to(device).long()
        x = heads.box_head(heads.box_roi_pool(features, boxes, image_sizes))
        class_logits, box_regression = heads.box_predictor(x)
        kl = grouped_kl(log_distribution(class_logits, 'softmax'), gid, self.detach_consensus, num_groups=n)
        n_multi = multi.sum()
        cls_term = torch.where(multi, kl, kl.new_zeros(())).sum() / n_multi.clamp_min(1)
        total = cls_term
        parts = self.last_parts_tensors
        parts.update(cls=cls_term.detach(), groups=(multi & (gid == arange)).sum())

        # box and mask terms: fully visible rows of those groups, in groups that still hold >= 2 of them
        fm = multi & full
        fmember = same & fm.view(1, -1) & fm.view(-1, 1)
        fcount = fmember.sum(dim=1)
        fsel = fm & (fcount >= 2)
        fgid = torch.where(fsel, _first_member(fmember), arange)
        n_full = fsel.sum().clamp_min(1)
        geo = self._geometry(image_sizes, original_sizes, replica_params, device)[rep]
        if self.box_weight > 0:
            pred = heads.box_coder.decode(box_regression, [all_boxes]).reshape(n, -1, 4)[arange, labels].float()
            bx = (pred / geo[:, 0:4] - geo[:, 4:8]) / geo[:, 8:12]  # model input -> replica -> un-flipped source
            src_w = geo[:, 12:13]
            unflipped = torch.cat([src_w - bx[:, 2:3], bx[:, 1:2], src_w - bx[:, 0:1], bx[:, 3:4]], dim=1)
            bx = torch.where(geo[:, 16:17] > 0, unflipped, bx)
            src = torch.where(fsel.view(-1, 1), bx / geo[:, 12:16], bx.new_zeros(()))  # normalised source frame
            mean = src.new_zeros((n, 4)).index_add(0, fgid, src) / torch.bincount(
                fgid, minlength=n).to(src.dtype).clamp_min(1).view(-1, 1)
            if self.detach_consensus:
                mean = mean.detach()
            per_row = F.smooth_l1_loss(src, mean[fgid], beta=self.box_beta, reduction='none').sum(dim=1)
            box_term = torch.where(fsel, per_row, per_row.new_zeros(())).sum() / n_full
            total = total + self.box_weight * box_term
            parts['box'] = box_term.detach()
        if self.mask_weight > 0 and getattr(heads, 'mask_roi_pool', None) is not None:
            mx = heads.mask_head(heads.mask_roi_pool(features, boxes, image_sizes))
            mlogits = heads.mask_predictor(mx)[arange, labels]  # (n, S, S)
            mlogits = torch.where(geo[:, 16].view(-1, 1, 1) > 0, mlogits.flip(-1), mlogits)
            mkl = grouped_kl(log_distribution(mlogits, 'bernoulli'), fgid, self.detach_consensus, num_groups=n)
            mask_term = torch.where(fsel, mkl, mkl.new_zeros(())).sum() / n_full / float(
                mlogits.shape[-1] * mlogits.shape[-2])
            total = total + self.mask_weight * mask_term
            parts['mask'] = mask_term.detach()
        return total + zero

    @staticmethod
    def _geometry(image_sizes, original_sizes, replica_params, device) -> torch.Tensor:
        """``(B, 17)`` float32 per replica: model-input/replica scale (4), translation (4), augmentation scale (4),
        source ``(W, H, W, H)`` (4), flip (1). Built on the host from Python numbers, copied once."""
        rows = []
        for (h0, w0), (h1, w1), p in zip(original_sizes, image_sizes, replica_params):
            sh, sw = p.src_size
            rows.append([w1 / w0, h1 / h0, w1 / w0, h1 / h0, p.tx, p.ty, p.tx, p.ty, p.sx, p.sy, p.sx, p.sy,
                         sw, sh, sw, sh, float(bool(p.flip))])
        return torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)
