"""Aligning instances across the m replicas of one image.

(a) Annotation-based (the paper's ``Resort(p_k | y)``): every replica's predictions/proposals are assigned
    to the ground-truth instance they belong to, in the *source* frame, and instances the augmentation cut
    out (visible-area fraction below a threshold) are dropped — see :func:`assign_to_gt` and
    :func:`gt_instance_groups`.
(b) Annotation-free, the paper's instance matching (``--lt-match predicted``): predicted boxes, mapped back to
    the source frame, are clustered across the replicas of one image by greedy IoU matching —
    :func:`greedy_match` (one image, a list of replicas) and :func:`greedy_match_rows` (all images of a batch at
    once, on the device; what :class:`~lt_timm.detection.consistency.InstanceLossTransform` uses). The matching
    is vectorised and exact (same result as the sequential greedy loop, see :func:`greedy_match_rows`).

(c) The paper's section 3.2 as written, on predictions: ``Resort(p_k | y)`` — "When training a model from scratch,
    pairing positive instances requires using the annotations y = {bbox_1, bbox_2, ...} to reorder all bounding
    boxes in replicas", each annotation taking the nearest prediction of the replica, with "a threshold ... to
    exclude instances that were removed from the original image due to data augmentation" — is
    :func:`resort_rows`; the replica test before greedy matching ("compute the area ratio of all bounding boxes in
    both replicas. If the ratio exceeds a predefined confidence threshold, the two replicas are considered to have
    been augmented from the same image") is :func:`replica_area_pairs`, whose pairs restrict
    :func:`greedy_match_rows` (``replica_pairs``).

All give *group ids*: rows with the same id are one physical instance seen by different replicas, which is
exactly the ``groups`` argument of :func:`lt_timm.loss.grouped_kl`. :func:`cluster_mean_boxes` gives each
cluster's anchor box (the mean of its matched boxes).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torchvision.ops import box_iou

__all__ = ['assign_to_gt', 'gt_instance_groups', 'greedy_match', 'greedy_match_rows', 'cluster_mean_boxes',
           'compact_groups', 'resort_rows', 'replica_area_pairs', 'box_areas']


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


def greedy_match_rows(
        boxes: torch.Tensor, scores: torch.Tensor, replica: torch.Tensor, image: Optional[torch.Tensor] = None,
        iou_threshold: float = 0.5, replica_pairs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Greedy cross-replica matching of all boxes of a batch at once, vectorised; returns each row's anchor row.

    This is the matching step of the paper's instance-level LossTransform without annotations: the boxes are
    predictions already mapped to their source image's frame. Semantics (those of :func:`greedy_match`, exactly):
    within each source image (``image``), boxes are visited in decreasing ``scores`` (ties: row order); a box joins
    the existing cluster whose *anchor* (the cluster's first, highest-scoring box) it overlaps most, provided the
    IoU is ``>= iou_threshold`` and the cluster holds no box of the same ``replica`` yet (ties: the earliest
    cluster); otherwise it starts a cluster of its own. Steps: the visiting order, the pairs a row may join
    (:func:`_join_allowed`), the greedy decisions as a fixed point of parallel sweeps (:func:`_greedy_fixed_point`,
    where the exact vectorised formulation is given).

    Cost: one ``(n, n)`` IoU matrix (``n`` = boxes of the batch), ``O(n^2)`` work and one host synchronisation per
    sweep; the number of sweeps is the longest chain of dependent decisions + 1: 1-7 on random scenes with
    hundreds of boxes, 15-90 in pathological clutter (200-600 overlapping boxes on 2-5 objects). No Python
    loop over boxes.

    Args:
        boxes: ``(n, 4)`` xyxy boxes in the source frame.
        scores: ``(n,)`` visiting priority (higher first).
        replica: ``(n,)`` integer id of the replica each box comes from (any integers).
        image: ``(n,)`` integer id of the source image (boxes of different images never match); None = one image.
        iou_threshold: minimal IoU with a cluster's anchor to join it.
        replica_pairs: optional ``(R, R)`` bool indexed by ``replica`` values (``0..R-1``): a box may join a cluster
            only if its replica and the anchor's are a pair (:func:`replica_area_pairs`).
    Returns:
        ``(n,)`` long: the row index of each box's cluster anchor (an anchor points to itself).
    """
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    order = torch.sort(scores.detach().reshape(-1).float(), descending=True, stable=True).indices
    b = boxes.detach().reshape(-1, 4).float()[order]
    raw_rep = replica.reshape(-1)[order]
    iou = box_iou(b, b)
    allowed = _join_allowed(iou, iou_threshold, raw_rep, None if image is None else image.reshape(-1)[order],
                            replica_pairs)
    anchor = _greedy_fixed_point(iou, allowed, torch.unique(raw_rep, return_inverse=True)[1])
    out = torch.empty_like(anchor)
    out[order] = order[anchor]
    return out


def _join_allowed(iou: torch.Tensor, iou_threshold: float, replica: torch.Tensor, image: Optional[torch.Tensor],
                  replica_pairs: Optional[torch.Tensor]) -> torch.Tensor:
    """``[k, a]`` (rows in visiting order): row ``k`` may join a cluster anchored at row ``a``: ``a`` comes first,
    their IoU is ``>= iou_threshold``, they are of one source image and (``replica_pairs``) a pair of replicas."""
    pos = torch.arange(iou.shape[0], device=iou.device)
    allowed = (iou >= iou_threshold) & (pos.view(1, -1) < pos.view(-1, 1))
    if image is not None:
        allowed &= image.view(-1, 1) == image.view(1, -1)
    if replica_pairs is not None:
        allowed &= replica_pairs.to(iou.device)[replica.view(-1, 1), replica.view(1, -1)]
    return allowed


def _greedy_fixed_point(iou: torch.Tensor, allowed: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
    """Each row's anchor position (rows in visiting order; ``rep``: replica ids ``0..R-1``), by parallel sweeps.

    Exact vectorised formulation: with the rows in visiting order, the decision of row ``k`` is a function ``F_k``
    of the decisions of rows ``< k`` only. The state (each row's anchor) starts as "every row is an anchor" and one
    *sweep* applies every ``F_k`` at once on the device: ``(n, n)`` masks of allowed (anchor, row) pairs (same image,
    earlier, IoU >= threshold), of current anchors and of clusters already holding a row of the row's replica
    before it (a ``scatter_reduce`` of first positions per (replica, cluster)), then a max-IoU pick. After sweep
    ``s`` the first ``s`` rows are final (induction), and a state that a sweep leaves unchanged is the sequential
    result (its rows satisfy ``x_k = F_k(x_<k)`` in order); so the loop stops at the first unchanged sweep, after
    at most ``n + 1`` sweeps."""
    n = iou.shape[0]
    num_rep = int(rep.max()) + 1
    pos = torch.arange(n, device=iou.device)
    anchor = pos.clone()  # position (in visiting order) of each row's cluster anchor
    for _ in range(n + 1):
        new = _greedy_sweep(anchor, rep, pos, iou, allowed, num_rep)
        if torch.equal(new, anchor):
            break
        anchor = new
    return anchor


def _greedy_sweep(anchor: torch.Tensor, rep: torch.Tensor, pos: torch.Tensor, iou: torch.Tensor,
                  allowed: torch.Tensor, num_rep: int) -> torch.Tensor:
    """One parallel application of every row's greedy decision to the current state (rows in visiting order)."""
    n = pos.shape[0]
    is_anchor = anchor == pos
    first = torch.full((num_rep * n,), n, dtype=torch.long, device=pos.device)
    first = first.scatter_reduce(0, rep * n + anchor, pos, reduce='amin', include_self=True).view(num_rep, n)
    taken = first[rep] < pos.view(-1, 1)  # [k, a]: cluster a already holds a row of k's replica before k
    cand = allowed & is_anchor.view(1, -1) & ~taken
    v = torch.where(cand, iou, iou.new_full((), -1.0))
    best = v.max(dim=1, keepdim=True).values
    pick = torch.where(cand & (v == best), pos.view(1, -1), pos.new_full((), n)).min(dim=1).values  # earliest tie
    return torch.where(cand.any(dim=1), pick, pos)


def greedy_match(
        boxes: Sequence[torch.Tensor], scores: Optional[Sequence[torch.Tensor]] = None,
        iou_threshold: float = 0.5,
) -> List[torch.Tensor]:
    """Annotation-free matching of source-frame boxes across the replicas of one image.

    Boxes are visited in decreasing score order (replica order, then row order, when ``scores`` is None or
    tied). Each box joins the existing cluster whose *first* box (its anchor) it overlaps most, provided that the
    IoU is at least ``iou_threshold`` (compared in float32, the IoU's dtype) and the cluster holds no box of the same
    replica yet (IoU ties: the earliest cluster); otherwise it starts a new cluster. Returns, for each replica,
    ``(N_r,)`` cluster ids numbered ``0, 1, ...`` in the order the clusters were started (every box gets one; a
    cluster of a single box contributes nothing to a consistency term), on the boxes' device. Vectorised, exact:
    :func:`greedy_match_rows` (this replaces the former per-box Python loop, with the same results).
    """
    counts = [int(b.shape[0]) for b in boxes]
    device = boxes[0].device if len(boxes) else torch.device('cpu')
    n = sum(counts)
    if n == 0:
        return [torch.zeros((c,), dtype=torch.long, device=device) for c in counts]
    allb = torch.cat([b.detach().float().reshape(-1, 4).to(device) for b in boxes])
    if scores is None:
        alls = torch.zeros(n, device=device)
    else:
        alls = torch.cat([s.detach().float().reshape(-1).to(device) for s in scores])
    rep = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    anchor = greedy_match_rows(allb, alls, rep, iou_threshold=iou_threshold)
    # clusters numbered in the order they were started = their anchor's rank in the visiting order
    order = torch.sort(alls, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=device)
    ids = torch.unique(rank[anchor], return_inverse=True)[1]
    return list(ids.split(counts))


def cluster_mean_boxes(boxes: torch.Tensor, groups: torch.Tensor, weight: Optional[torch.Tensor] = None,
                       num_groups: Optional[int] = None) -> torch.Tensor:
    """Each row's cluster anchor box: the (``weight``-masked) mean of the boxes of its group, ``(n, 4)``.

    ``groups`` are ids in ``[0, num_groups)`` (e.g. anchor rows from :func:`greedy_match_rows`); rows with
    ``weight`` False are left out of the means (their own entry is still the mean of their group, 0 if empty)."""
    n = boxes.shape[0]
    num_groups = n if num_groups is None else int(num_groups)
    w = boxes.new_ones(n) if weight is None else weight.to(boxes.dtype)
    sums = boxes.new_zeros((num_groups, 4)).index_add(0, groups, boxes * w.view(-1, 1))
    counts = boxes.new_zeros(num_groups).index_add(0, groups, w).clamp_min(1)
    return (sums / counts.view(-1, 1))[groups]


def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    """``(n,)`` areas of xyxy boxes (0 for degenerate ones)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


def resort_rows(gt_boxes: torch.Tensor, gt_replica: torch.Tensor, det_boxes: torch.Tensor,
                det_replica: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """The paper's ``Resort(p_k | y)``: for each annotation row, the index of the *nearest* prediction of the same
    replica — the smallest Euclidean distance between the xyxy coordinates, the paper's ``arg min`` of a norm — or
    -1 where the replica has no prediction or the nearest one overlaps the annotation by less than
    ``iou_threshold`` (the paper's threshold for "instances that were removed from the original image due to data
    augmentation": no prediction of the replica is at the annotation's place).

    Args:
        gt_boxes: ``(G, 4)`` annotation boxes in a frame shared by the replicas of an image, e.g. the source frame
            divided by the source width/height (the distance then does not depend on the image size).
        gt_replica, det_replica: ``(G,)`` / ``(D,)`` replica of each annotation / prediction row.
        det_boxes: ``(D, 4)`` predictions in the same frame.
    Returns:
        ``(G,)`` long: a row of ``det_boxes``, or -1.
    """
    g, d = gt_boxes.shape[0], det_boxes.shape[0]
    device = gt_boxes.device
    if g == 0 or d == 0:
        return torch.full((g,), -1, dtype=torch.long, device=device)
    gt, det = gt_boxes.detach().float(), det_boxes.detach().float()
    same = gt_replica.view(-1, 1) == det_replica.view(1, -1)
    dist = torch.cdist(gt, det).masked_fill(~same, float('inf'))
    best = dist.argmin(dim=1)
    rows = torch.arange(g, device=device)
    iou = box_iou(gt, det)[rows, best]
    ok = same[rows, best] & (iou >= iou_threshold)
    return torch.where(ok, best, torch.full_like(best, -1))


def replica_area_pairs(boxes: torch.Tensor, replica: torch.Tensor, num_replicas: int,
                       threshold: float) -> torch.Tensor:
    """The paper's replica test before greedy matching: two replicas "are considered to have been augmented from the
    same image" when the area ratio of their bounding boxes exceeds a threshold. Here the area of a replica is the
    summed area of its boxes (given in a shared frame, e.g. the normalised source frame, so that the augmentation's
    scale does not change it) and the ratio is ``min / max`` of two replicas' areas.

    Returns ``(R, R)`` bool: ``[k, k']`` is True when both replicas have boxes and ``ratio >= threshold``."""
    area = boxes.new_zeros(num_replicas).index_add(0, replica, box_areas(boxes.detach().float()))
    lo = torch.minimum(area.view(-1, 1), area.view(1, -1))
    hi = torch.maximum(area.view(-1, 1), area.view(1, -1))
    ratio = torch.where(hi > 0, lo / hi.clamp_min(1e-12), torch.zeros_like(hi))
    return (ratio >= threshold) & (lo > 0)
