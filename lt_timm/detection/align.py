"""Aligning instances across the m replicas of one image.

(a) Annotation-based (the paper's ``Resort(p_k | y)``): every replica's predictions/proposals are assigned
    to the ground-truth instance they belong to, in the *source* frame, and instances the augmentation cut
    out (visible-area fraction below a threshold) are dropped — see :func:`assign_to_gt` and
    :func:`gt_instance_groups`.
(b) Annotation-free: greedy matching of inverse-mapped boxes across replicas by IoU — :func:`greedy_match`.

Both return *group ids*: rows with the same id are one physical instance seen by different replicas, which
is exactly the ``groups`` argument of :func:`lt_timm.loss.grouped_kl`.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torchvision.ops import box_iou

__all__ = ['assign_to_gt', 'gt_instance_groups', 'greedy_match', 'compact_groups']


def assign_to_gt(
        boxes: torch.Tensor, gt_boxes: torch.Tensor, iou_threshold: float = 0.5,
        gt_keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Index of the ground-truth box each predicted box belongs to (max IoU), or -1.

    Args:
        boxes: ``(N, 4)`` xyxy predictions/proposals, already mapped to the source frame.
        gt_boxes: ``(J, 4)`` xyxy source-frame ground truth.
        iou_threshold: a prediction whose best IoU is below this is unassigned (-1).
        gt_keep: optional ``(J,)`` bool — instances to consider (e.g. visible enough in this replica).
    """
    n, j = boxes.shape[0], gt_boxes.shape[0]
    if n == 0 or j == 0:
        return torch.full((n,), -1, dtype=torch.long, device=boxes.device)
    iou = box_iou(boxes.float(), gt_boxes.float())
    if gt_keep is not None:
        iou = iou.masked_fill(~gt_keep.view(1, -1), -1.0)
    best, idx = iou.max(dim=1)
    return torch.where(best >= iou_threshold, idx, torch.full_like(idx, -1))


def compact_groups(keys: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Relabel arbitrary non-negative keys to ``0..G-1`` (order of first appearance not guaranteed)."""
    if keys.numel() == 0:
        return keys.new_zeros((0,), dtype=torch.long), 0
    uniq, inv = torch.unique(keys, return_inverse=True)
    return inv, int(uniq.numel())


def gt_instance_groups(
        image_index: Sequence[int], instance_ids: Sequence[torch.Tensor],
        visible: Optional[Sequence[torch.Tensor]] = None, min_visible: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Group the GT instances of a replica batch by (source image, instance).

    Args:
        image_index: for each replica, the index of its source image in the batch (replica_groups).
        instance_ids: for each replica, ``(J_r,)`` source-instance index of each of its GT boxes.
        visible: for each replica, ``(J_r,)`` visible-area fraction; rows below ``min_visible`` are dropped.
    Returns:
        ``keep`` — ``(sum J_r,)`` bool over the concatenated rows; ``groups`` — ``(keep.sum(),)`` group id of
        each kept row; the number of groups.
    """
    keys, keeps = [], []
    for r, ids in enumerate(instance_ids):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        k = torch.ones_like(ids, dtype=torch.bool)
        if visible is not None:
            k = torch.as_tensor(visible[r]).reshape(-1) >= min_visible
        keeps.append(k)
        keys.append(int(image_index[r]) * (1 << 20) + ids)
    if not keys:
        return torch.zeros((0,), dtype=torch.bool), torch.zeros((0,), dtype=torch.long), 0
    keep = torch.cat(keeps)
    groups, g = compact_groups(torch.cat(keys)[keep])
    return keep, groups, g


def greedy_match(
        boxes: Sequence[torch.Tensor], scores: Optional[Sequence[torch.Tensor]] = None,
        iou_threshold: float = 0.5,
) -> List[torch.Tensor]:
    """Annotation-free matching of source-frame boxes across the replicas of one image.

    Boxes are visited in decreasing score order (replica order, then row order, when ``scores`` is None).
    Each box joins the existing cluster whose *first* box (its anchor) it overlaps most, provided that the
    IoU is at least ``iou_threshold`` and the cluster holds no box of the same replica yet; otherwise it
    starts a new cluster. Returns, for each replica, ``(N_r,)`` cluster ids (every box gets one; a cluster of
    a single box contributes nothing to a consistency term).
    """
    m = len(boxes)
    if scores is None:
        scores = [torch.zeros(b.shape[0]) for b in boxes]
    rows = [(r, i) for r in range(m) for i in range(boxes[r].shape[0])]
    out = [torch.full((b.shape[0],), -1, dtype=torch.long) for b in boxes]
    if not rows:
        return out
    allb = torch.cat([b.detach().float().reshape(-1, 4) for b in boxes])
    alls = torch.cat([s.detach().float().reshape(-1) for s in scores])
    order = sorted(range(len(rows)), key=lambda k: (-float(alls[k]), k))  # stable: ties keep input order
    iou = box_iou(allb, allb)
    anchors: List[int] = []  # flat row index of each cluster's anchor
    members: List[set] = []  # replicas present in each cluster
    for k in order:
        r, i = rows[k]
        best, best_c = iou_threshold, -1
        for c, a in enumerate(anchors):
            if r in members[c]:
                continue
            v = float(iou[k, a])
            if v >= best and (best_c < 0 or v > best):
                best, best_c = v, c
        if best_c < 0:
            anchors.append(k)
            members.append({r})
            best_c = len(anchors) - 1
        else:
            members[best_c].add(r)
        out[r][i] = best_c
    return out
