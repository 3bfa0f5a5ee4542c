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
from .align import compact_groups, gt_instance_groups
from .transforms import ReplicaParams, identity_params, invert_boxes

__all__ = ['InstanceLossTransform', 'sanitize_targets']


def sanitize_targets(targets: List[Dict[str, torch.Tensor]], min_size: float = 1e-3) -> List[Dict[str, torch.Tensor]]:
    """Drop degenerate boxes (width or height < ``min_size``) and non-finite boxes, with their masks/labels."""
    out = []
    for t in targets:
        b = t['boxes']
        n = b.shape[0]
        if n == 0:
            out.append(t)
            continue
        ok = torch.isfinite(b).all(dim=1) & ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
        if bool(ok.all()):
            out.append(t)
            continue
        out.append({k: (v[ok] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n and k != 'image_id'
                        else v) for k, v in t.items()})
    return out


def _mean_over_groups(per_row: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    counts = torch.bincount(groups, minlength=num_groups).to(per_row.dtype).clamp_min(1)
    return per_row.new_zeros((num_groups,) + per_row.shape[1:]).index_add(0, groups, per_row) / counts.view(
        -1, *([1] * (per_row.dim() - 1)))


def _multi(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Bool per row: its group holds at least two rows."""
    if groups.numel() == 0:
        return torch.zeros((0,), dtype=torch.bool, device=groups.device)
    return torch.bincount(groups, minlength=num_groups)[groups] >= 2


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
        self.last_parts: Dict[str, float] = {}

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
    def consistency(self, features, image_sizes, original_sizes, targets, replica_params) -> torch.Tensor:
        """The unweighted consistency term (class + box_weight*box + mask_weight*mask)."""
        heads = self.model.roi_heads
        b = len(targets)
        device = next(iter(features.values())).device
        zero = sum(f.sum() for f in features.values()) * 0.0  # keeps the graph connected, exactly 0
        img_idx = replica_groups(b, self.num_repeats).tolist()
        ids = [t.get('instance_ids', torch.arange(t['boxes'].shape[0], device=device)) for t in targets]
        vis = [t.get('visible', torch.ones(t['boxes'].shape[0], device=device)) for t in targets]
        keep, groups, g = gt_instance_groups(img_idx, [i.cpu() for i in ids], [v.cpu() for v in vis],
                                             self.min_visible)
        parts = {'cls': 0.0, 'box': 0.0, 'mask': 0.0, 'groups': 0}
        self.last_parts = parts
        if g == 0:
            return zero
        rows = torch.cat([torch.full((t['boxes'].shape[0],), r, dtype=torch.long) for r, t in enumerate(targets)])
        all_boxes = torch.cat([t['boxes'] for t in targets]).float()
        all_labels = torch.cat([t['labels'] for t in targets]).long()
        all_vis = torch.cat([v.float().cpu() for v in vis])
        multi = torch.zeros_like(keep)
        multi[keep] = _multi(groups, g)
        if not bool(multi.any()):
            return zero
        groups, g = compact_groups(torch.zeros(keep.shape[0], dtype=torch.long).masked_scatter(keep, groups)[multi])
        rows, boxes, labels, full = rows[multi], all_boxes[multi.to(device)], all_labels[multi.to(device)], \
            all_vis[multi] >= 1.0 - 1e-6
        groups_d = groups.to(device)
        rois = [boxes[rows.to(device) == r] for r in range(b)]  # rows are sorted by replica
        x = heads.box_roi_pool(features, rois, image_sizes)
        x = heads.box_head(x)
        class_logits, box_regression = heads.box_predictor(x)
        kl = grouped_kl(log_distribution(class_logits, 'softmax'), groups_d, self.detach_consensus, num_groups=g)
        cls_term = kl.mean()
        total = cls_term
        parts.update(cls=float(cls_term.detach()), groups=g)

        # rows fully visible, in groups that still hold >= 2 of them
        fgroups, fg = compact_groups(groups[full])
        fsel = full.clone()
        fsel[full] = _multi(fgroups, fg)
        if not bool(fsel.any()):
            return total + zero
        fgroups, fg = compact_groups(groups[fsel])
        fgroups_d = fgroups.to(device)
        fd = fsel.to(device)
        k = int(fsel.sum())
        if self.box_weight > 0:
            pred = heads.box_coder.decode(box_regression[fd], [boxes[fd]]).reshape(k, -1, 4)
            pred = pred[torch.arange(k, device=device), labels[fd]]
            src = []
            for i, r in enumerate(rows[fsel].tolist()):
                (h0, w0), (h1, w1) = original_sizes[r], image_sizes[r]
                p = replica_params[r]
                bx = pred[i:i + 1] / pred.new_tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0])
                bx = invert_boxes(bx, p)
                sh, sw = p.src_size
                src.append(bx / bx.new_tensor([sw, sh, sw, sh]))
            src = torch.cat(src)
            mean = _mean_over_groups(src, fgroups_d, fg)
            if self.detach_consensus:
                mean = mean.detach()
            box_term = F.smooth_l1_loss(src, mean[fgroups_d], beta=self.box_beta, reduction='none')
            box_term = box_term.sum(dim=1).mean()
            total = total + self.box_weight * box_term
            parts['box'] = float(box_term.detach())
        if self.mask_weight > 0 and getattr(heads, 'mask_roi_pool', None) is not None:
            mrois = [boxes[fd & (rows.to(device) == r)] for r in range(b)]
            mx = heads.mask_head(heads.mask_roi_pool(features, mrois, image_sizes))
            mlogits = heads.mask_predictor(mx)
            mlogits = mlogits[torch.arange(k, device=device), labels[fd]]  # (k, S, S)
            flips = torch.tensor([bool(replica_params[r].flip) for r in rows[fsel].tolist()], device=device)
            mlogits = torch.where(flips.view(-1, 1, 1), mlogits.flip(-1), mlogits)
            mkl = grouped_kl(log_distribution(mlogits, 'bernoulli'), fgroups_d, self.detach_consensus,
                             num_groups=fg)
            mask_term = mkl.mean() / float(mlogits.shape[-1] * mlogits.shape[-2])
            total = total + self.mask_weight * mask_term
            parts['mask'] = float(mask_term.detach())
        return total + zero
