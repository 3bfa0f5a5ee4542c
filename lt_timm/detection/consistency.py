"""Instance-level LossTransform for torchvision's ``FasterRCNN`` / ``MaskRCNN`` / ``RetinaNet`` (models unchanged).

Design
------
A training batch holds ``m`` consecutive replicas of each source image (:mod:`lt_timm.layout`), each made by
:mod:`lt_timm.detection.transforms` with recorded :class:`~lt_timm.detection.transforms.ReplicaParams`. Each
replica's target carries ``instance_ids`` (index of the instance in the source annotation) and ``visible``
(visible-area fraction after cropping).

:class:`InstanceLossTransform` runs the model's own training path from its public submodules (R-CNN:
``transform`` -> ``backbone`` -> ``rpn`` -> ``roi_heads``; RetinaNet: ``transform`` -> ``backbone`` -> ``head`` ->
``compute_loss``), which yields the usual loss dict, keeps the FPN features, and adds
``loss_consistency = rho * (class + box_weight * box + mask_weight * mask)``. The paper's instance-level
LossTransform pulls the predictions that the ``m`` replicas make for one physical instance to their consensus;
two ways of finding "one instance" are built (``match``, ``--lt-match``):

``match='gt'`` — *annotation-based alignment* (the paper's ``Resort(p|y)``; Faster/Mask R-CNN only). For every
ground-truth instance ``j`` of a source image, every replica that still sees it (``visible >= min_visible``)
gives one row by running the model's own RoI heads on RoI-aligned features of *its* version of the GT box. Rows
of the same (image, instance) form a group, and

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
``visible >= min_visible``. It costs one extra RoI-head pass over the GT boxes only (a handful of RoIs per
image), no extra backbone pass.

``match='predicted'`` — the paper's *instance matching* on the model's own predictions (no annotations used by
the term; Faster/Mask R-CNN and RetinaNet). Each replica's detections are computed under ``no_grad`` from the
same forward (R-CNN: the box head on this step's RPN proposals + torchvision's ``postprocess_detections``;
RetinaNet: :func:`retinanet_detections`, torchvision's post-processing keeping each detection's anchor index;
both with the model's own score threshold, NMS and ``detections_per_img`` cap), mapped to the source frame with
the replica's geometry, and clustered across the replicas of each source image by the vectorised greedy matching
:func:`~lt_timm.detection.align.greedy_match_rows` (score order, IoU >= ``match_iou`` with the cluster's first
box, at most one box per replica per cluster). Clusters of one box are left alone. For the boxes of clusters of
two or more:

* class term: R-CNN — the RoI heads run *with* gradients on each replica's matched box (its own frame), and
  the softmax KL to the cluster consensus is taken as in ``gt`` mode; RetinaNet — the class logits of the
  detection's own anchor (with gradients) are per-class sigmoids, so the distribution is one Bernoulli per class
  (``log_distribution(..., 'bernoulli')``) and the KL to the cluster's consensus is *summed over classes*, as the
  classification LossTransform does for sigmoid/BCE models;
* box term: the regressed box (R-CNN: of the cluster's class = the label of its highest-scoring box, decoded around
  the matched box; RetinaNet: the detection's anchor regression, i.e. the detection itself with gradients),
  clipped to the image, mapped to the normalised source frame and pulled with smooth-L1 to the cluster's *anchor
  box*, the mean of its matched (no-grad) source-frame detection boxes — a fixed target;
* mask term (Mask R-CNN): as in ``gt`` mode, on the matched boxes, with the cluster's class.

Box and mask terms leave out boxes that touch a canvas edge which the replica's crop cut through (their box is
the visible part only; the ``gt`` mode's "fully visible" rule without annotations); the anchor box is the mean
over the remaining boxes. Extra cost: one no-grad box-head pass over the RPN proposals (R-CNN; as in an eval
forward), the matching (``O(n^2)`` in the detections of the batch) and one RoI-head pass with gradients over the
matched boxes. Before any prediction is good there may be no (matched) detection: the term is then exactly 0.

The paper's section 3.2 as written gives two more ways to find the rows (both on the model's own detections, then
the same class / box / mask terms as ``predicted``):

``match='resort'`` — ``Resort(p_k | y)``, the paper's matching "when training a model from scratch": each annotated
instance of a replica takes the replica's *nearest* detection (Euclidean distance of the normalised source-frame
xyxy coordinates, :func:`~lt_timm.detection.align.resort_rows`), dropped when that detection overlaps the annotation
by less than ``match_iou`` (the paper's threshold for instances the augmentation removed); the replicas' detections
of one annotated instance form a group (the annotation's label is the group's class).

``match='area-greedy'`` — the paper's matching otherwise: two replicas are taken as augmentations of the same image
when the ratio of their detections' summed (normalised source-frame) areas is at least ``area_ratio``
(:func:`~lt_timm.detection.align.replica_area_pairs`), and the detections of such replicas are matched greedily as in
``predicted``. The batch layout (which replicas come from one image) is *not* used: the area test alone decides, as
in the paper, so replicas of different images whose areas agree can be paired.

Every mode: objects that simple copy-paste added to a replica (``instance_ids < 0``; their source-frame boxes in
``ReplicaParams.pasted``) have no counterpart in the source image and are never grouped: annotations with negative
ids are left out, and detections overlapping a pasted box by ``match_iou`` are left out of the matching. Groups of
one row contribute nothing and are not counted in the means; empty images, degenerate boxes (dropped before
torchvision sees them) and replicas that lost every instance give a zero term and a finite loss; with ``rho = 0``
the term is only measured (no gradient).
"""
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from ..layout import replica_groups
from ..loss import grouped_kl, log_distribution
from .align import cluster_mean_boxes, greedy_match_rows, replica_area_pairs, resort_rows
from .transforms import ReplicaParams, identity_params

__all__ = ['InstanceLossTransform', 'GTRows', 'sanitize_targets', 'is_retinanet', 'rcnn_detections',
           'retinanet_detections', 'source_boxes', 'canvas_cut', 'clip_to_input', 'replica_geometry', 'pasted_overlap', 'MATCH_MODES']

MATCH_MODES = ('gt', 'predicted', 'resort', 'area-greedy')


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


class GTRows(NamedTuple):
    """The annotated instances of a batch as rows, for the ``gt``-mode term (:meth:`InstanceLossTransform.gt_rows`):
    each row's replica (``rep``), whether the class term keeps it (``keep``) and whether it is fully visible
    (``full``), ``same``: ``(n, n)`` same (source image, instance), the boxes per replica and concatenated, the
    labels, and ``arange(n)``; all on the device."""
    rep: torch.Tensor
    keep: torch.Tensor
    full: torch.Tensor
    same: torch.Tensor
    boxes: List[torch.Tensor]
    all_boxes: torch.Tensor
    labels: torch.Tensor
    arange: torch.Tensor


def is_retinanet(model: nn.Module) -> bool:
    """A torchvision ``RetinaNet`` (one-stage: no RoI heads, only ``match='predicted'`` applies)."""
    from torchvision.models.detection import RetinaNet
    return isinstance(model, RetinaNet)


# ------------------------------------------------------------------------------------------- geometry
def replica_geometry(image_sizes, original_sizes, replica_params, device) -> torch.Tensor:
    """``(B, 21)`` float32 per replica: model-input/replica scale (4), translation (4), augmentation scale (4),
    source ``(W, H, W, H)`` (4), flip (1), replica canvas ``(W, H)`` (2), model input ``(W, H)`` (2). Built on the
    host from Python numbers (``image_sizes``: torchvision's model-input sizes, ``original_sizes``: the replicas'),
    copied once. Index it with each row's replica to get the ``geo`` rows of :func:`source_boxes` & co."""
    rows = []
    for (h0, w0), (h1, w1), p in zip(original_sizes, image_sizes, replica_params):
        sh, sw = p.src_size
        rows.append([w1 / w0, h1 / h0, w1 / w0, h1 / h0, p.tx, p.ty, p.tx, p.ty, p.sx, p.sy, p.sx, p.sy,
                     sw, sh, sw, sh, float(bool(p.flip)), w0, h0, w1, h1])
    return torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)


def source_boxes(boxes: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
    """Model-input-frame xyxy boxes -> source-image frame (pixels), one :func:`replica_geometry` row per box:
    undo torchvision's resize, then :func:`~lt_timm.detection.transforms.invert_boxes` (translation, scale, flip),
    vectorised and differentiable."""
    bx = (boxes / geo[:, 0:4] - geo[:, 4:8]) / geo[:, 8:12]  # model input -> replica -> un-flipped source
    src_w = geo[:, 12:13]
    unflipped = torch.cat([src_w - bx[:, 2:3], bx[:, 1:2], src_w - bx[:, 0:1], bx[:, 3:4]], dim=1)
    return torch.where(geo[:, 16:17] > 0, unflipped, bx)


def canvas_cut(boxes: torch.Tensor, geo: torch.Tensor, tol: float = 0.5) -> torch.Tensor:
    """``(n,)`` bool: the model-input-frame box touches (within ``tol`` replica pixels) an edge of its replica's
    canvas *through which the crop cut the source image* — its box is only the visible part of the instance."""
    r = boxes / geo[:, 0:4]  # replica frame
    tx, ty, sw, sh = geo[:, 4], geo[:, 5], geo[:, 8] * geo[:, 12], geo[:, 9] * geo[:, 13]
    ow, oh = geo[:, 17], geo[:, 18]
    return (((tx < 0) & (r[:, 0] <= tol)) | ((ty < 0) & (r[:, 1] <= tol))
            | ((tx + sw > ow) & (r[:, 2] >= ow - tol)) | ((ty + sh > oh) & (r[:, 3] >= oh - tol)))


def clip_to_input(boxes: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
    """Clip model-input-frame boxes to their own model-input image (``geo`` columns 19-20), differentiably."""
    size = geo[:, 19:21].repeat(1, 2)
    return torch.minimum(boxes.clamp_min(0.0), size)


def pasted_overlap(src: torch.Tensor, rep: torch.Tensor, replica_params: Sequence[ReplicaParams],
                   iou_threshold: float) -> torch.Tensor:
    """``(n,)`` bool: the source-frame box overlaps (IoU >= ``iou_threshold``) an object that copy-paste added to its
    own replica (``ReplicaParams.pasted``) — a detection of something the source image does not hold."""
    rows = [(r, box) for r, p in enumerate(replica_params) for box in getattr(p, 'pasted', ())]
    if not rows or src.shape[0] == 0:
        return torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    boxes = torch.tensor([b for _, b in rows], dtype=torch.float32, device=src.device)
    owner = torch.tensor([r for r, _ in rows], device=src.device)
    iou = box_iou(src.detach().float(), boxes).masked_fill(rep.view(-1, 1) != owner.view(1, -1), 0.0)
    return (iou >= iou_threshold).any(dim=1)


# ----------------------------------------------------------------------------------------- detections
def rcnn_detections(heads: nn.Module, features, proposals: List[torch.Tensor], image_sizes
                    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Faster/Mask R-CNN detections of a training forward, without gradients: torchvision's box head on the RPN's
    proposals and its own ``postprocess_detections`` (the model's ``score_thresh``, ``nms_thresh`` and
    ``detections_per_img``). Returns per-image boxes (model-input frame), scores, labels."""
    with torch.no_grad():
        x = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = heads.box_predictor(x)
        return heads.postprocess_detections(class_logits, box_regression, proposals, image_sizes)


def anchors_per_level(features: List[torch.Tensor], head_outputs: Dict[str, torch.Tensor]) -> List[int]:
    """Number of RetinaNet anchors on each feature level (as ``RetinaNet.forward`` computes it)."""
    hw = [int(f.shape[-2] * f.shape[-1]) for f in features]
    a = int(head_outputs['cls_logits'].shape[1]) // sum(hw)
    return [v * a for v in hw]


def retinanet_detections(model: nn.Module, head_outputs: Dict[str, torch.Tensor], anchors: List[torch.Tensor],
                         level_sizes: Sequence[int], image_sizes
                         ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """torchvision ``RetinaNet.postprocess_detections`` (per level: sigmoid scores above ``score_thresh``, the
    ``topk_candidates`` best, decoded with the model's ``box_coder`` and clipped; then class-wise NMS at
    ``nms_thresh``, ``detections_per_img`` kept), without gradients, also returning each detection's anchor
    index (into the image's concatenated anchors). Returns per-image boxes, scores, labels, anchor indices."""
    out_boxes, out_scores, out_labels, out_idx = [], [], [], []
    with torch.no_grad():
        cls_all, reg_all = head_outputs['cls_logits'], head_outputs['bbox_regression']
        for i, shape in enumerate(image_sizes):
            boxes, scores, labels, idxs = [], [], [], []
            start = 0
            for count in level_sizes:
                logits = cls_all[i, start:start + count]
                num_classes = logits.shape[-1]
                s = torch.sigmoid(logits).flatten()
                keep = s > model.score_thresh
                flat = torch.where(keep)[0]
                s, top = s[keep].topk(min(int(model.topk_candidates), int(flat.numel())))
                flat = flat[top]
                a = torch.div(flat, num_classes, rounding_mode='floor')
                level = slice(start, start + count)
                b = model.box_coder.decode_single(reg_all[i, level][a], anchors[i][level][a])
                boxes.append(clip_boxes_to_image(b, shape))
                scores.append(s)
                labels.append(flat % num_classes)
                idxs.append(a + start)
                start += count
            boxes, scores, labels, idxs = torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(idxs)
            keep = batched_nms(boxes, scores, labels, model.nms_thresh)[:model.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
            out_idx.append(idxs[keep])
    return out_boxes, out_scores, out_labels, out_idx


class InstanceLossTransform(nn.Module):
    """Wrap a torchvision ``FasterRCNN``/``MaskRCNN``/``RetinaNet``: training forward returns its loss dict +
    ``loss_consistency`` (the paper's instance-level LossTransform); eval forward returns the model's detections
    unchanged.

    Args:
        model: a torchvision ``GeneralizedRCNN`` (``FasterRCNN``, ``MaskRCNN``) or ``RetinaNet``.
        num_repeats: replicas per source image ``m`` (consecutive in the batch).
        rho: weight of the consistency term (0 = plain multi-task loss, term still measured for logging).
        box_weight, mask_weight: weights of the box and mask terms inside the consistency.
        min_visible: (``gt``) replicas where an instance's visible fraction is below this are left out of its group.
        box_beta: smooth-L1 beta for the (image-size normalised) box term.
        detach_consensus: stop gradients through the class/box/mask consensus (the ``predicted`` box anchor is
            always a fixed target).
        match: ``'gt'`` (instances = annotated instances, R-CNN only), ``'predicted'`` (instances = the model's
            detections matched across replicas), ``'resort'`` (each annotation's nearest detection per replica) or
            ``'area-greedy'`` (replicas paired by their detections' area ratio, then greedy matching); see the
            module docstring.
        match_iou: (``predicted`` / ``area-greedy``) IoU a detection needs with a cluster's first box to join it;
            (``resort``) IoU the nearest detection needs with the annotation to be kept.
        area_ratio: (``area-greedy``) the area ratio two replicas need to be matched.
    After each training call ``last_parts`` holds the detached class/box/mask terms and group counts.
    """

    def __init__(self, model: nn.Module, num_repeats: int, rho: float = 1.0, box_weight: float = 1.0,
                 mask_weight: float = 1.0, min_visible: float = 0.5, box_beta: float = 0.02,
                 detach_consensus: bool = False, match: str = 'gt', match_iou: float = 0.5,
                 area_ratio: float = 0.8):
        super().__init__()
        if not isinstance(num_repeats, int) or num_repeats < 1:
            raise ValueError(f'num_repeats must be an integer >= 1 (--aug-repeats), got {num_repeats!r}.')
        if not rho >= 0:
            raise ValueError(f'rho must be >= 0 (--lt-rho), got {rho!r}.')
        if match not in MATCH_MODES:
            raise ValueError(f'match must be one of {MATCH_MODES} (--lt-match), got {match!r}.')
        if not 0.0 < match_iou <= 1.0:
            raise ValueError(f'match_iou must be in (0, 1] (--lt-match-iou), got {match_iou!r}.')
        if not 0.0 < area_ratio <= 1.0:
            raise ValueError(f'area_ratio must be in (0, 1] (--lt-area-ratio), got {area_ratio!r}.')
        if match == 'gt' and is_retinanet(model):
            raise ValueError("RetinaNet has no RoI heads to evaluate ground-truth instances: use match='predicted' "
                             "(--lt-match predicted).")
        self.model = model
        self.num_repeats = num_repeats
        self.rho = float(rho)
        self.box_weight = float(box_weight)
        self.mask_weight = float(mask_weight)
        self.min_visible = float(min_visible)
        self.box_beta = float(box_beta)
        self.detach_consensus = detach_consensus
        self.match = match
        self.match_iou = float(match_iou)
        self.area_ratio = float(area_ratio)
        self.last_parts_tensors: Dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (f'num_repeats={self.num_repeats}, rho={self.rho}, box_weight={self.box_weight}, '
                f'mask_weight={self.mask_weight}, min_visible={self.min_visible}, match={self.match!r}, '
                f'match_iou={self.match_iou}, area_ratio={self.area_ratio}')

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None,
                replica_params: Optional[Sequence[ReplicaParams]] = None):
        if not self.training:
            return self.model(images)
        if targets is None or len(targets) != len(images):
            raise ValueError('InstanceLossTransform in training mode needs one target dict per image.')
        targets = sanitize_targets(targets)
        original_sizes = [tuple(int(s) for s in img.shape[-2:]) for img in images]
        if replica_params is None:
            replica_params = [identity_params(s) for s in original_sizes]
        if len(replica_params) != len(images):
            raise ValueError(f'{len(replica_params)} replica_params for {len(images)} images.')
        if is_retinanet(self.model):
            return self.forward_retinanet(images, targets, original_sizes, replica_params)
        model = self.model
        image_list, tgts = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([('0', features)])
        proposals, rpn_losses = model.rpn(image_list, features, tgts)
        _, det_losses = model.roi_heads(features, proposals, image_list.image_sizes, tgts)
        losses = dict(det_losses)
        losses.update(rpn_losses)
        if self.match == 'gt':
            def term():
                return self.consistency(features, image_list.image_sizes, original_sizes, tgts, replica_params)
        else:
            def term():
                return self.predicted_consistency(features, proposals, image_list.image_sizes, original_sizes,
                                                  replica_params, tgts)
        return self._add_consistency(losses, term, image_list.tensors)

    def forward_retinanet(self, images, targets, original_sizes, replica_params) -> Dict[str, torch.Tensor]:
        """RetinaNet's training path (``transform`` -> ``backbone`` -> ``head`` -> ``compute_loss``) + the
        ``predicted`` consistency from the same head outputs. Masks in the targets are dropped (unused)."""
        model = self.model
        targets = [{k: v for k, v in t.items() if k != 'masks'} for t in targets]
        image_list, tgts = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([('0', features)])
        feats = list(features.values())
        head_outputs = model.head(feats)
        anchors = model.anchor_generator(image_list, feats)
        losses = dict(model.compute_loss(tgts, head_outputs, anchors))

        def term():
            return self.retinanet_consistency(head_outputs, anchors, anchors_per_level(feats, head_outputs),
                                              image_list.image_sizes, original_sizes, replica_params, tgts)
        return self._add_consistency(losses, term, image_list.tensors)

    def _add_consistency(self, losses: Dict[str, torch.Tensor], term: Callable[[], torch.Tensor],
                         like: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.rho > 0:
            losses['loss_consistency'] = self.rho * term()
        else:
            with torch.no_grad():
                term()
            losses['loss_consistency'] = like.new_zeros(())
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

    def _reset_parts(self, like: torch.Tensor) -> None:
        nothing = like.new_zeros((), dtype=torch.float32)
        self.last_parts_tensors = {'cls': nothing, 'box': nothing, 'mask': nothing,
                                   'groups': torch.zeros((), dtype=torch.long, device=like.device)}

    def consistency(self, features, image_sizes, original_sizes, targets, replica_params) -> torch.Tensor:
        """The unweighted ``gt``-mode consistency term (class + box_weight*box + mask_weight*mask).

        Vectorised over all GT rows of the batch: the (image, instance) groups come from an ``(n, n)`` comparison
        of row keys on the device (each group is named by its first row; rows left out of a term form groups of
        their own and get weight 0), the RoI heads run once on every GT box, and the replica geometry is one small
        table copied to the device once. No Python loop over rows or instances and no host synchronisation.
        Steps: :meth:`gt_rows`, the class term (:meth:`_gt_class_term`), the fully visible groups
        (:meth:`_gt_full_groups`), the box and mask terms (:meth:`_gt_box_term`, :meth:`_gt_mask_term`).
        """
        heads = self.model.roi_heads
        first = next(iter(features.values()))
        zero = sum(f.sum() for f in features.values()) * 0.0  # keeps the graph connected, exactly 0
        self._reset_parts(first)
        rows = self.gt_rows(targets, first.device)
        if rows is None:
            return zero
        class_logits, box_regression = heads.box_predictor(
            heads.box_head(heads.box_roi_pool(features, rows.boxes, image_sizes)))
        total, multi = self._gt_class_term(class_logits, rows)
        fsel, fgid, n_full = self._gt_full_groups(rows, multi)
        geo = replica_geometry(image_sizes, original_sizes, replica_params, first.device)[rows.rep]
        if self.box_weight > 0:
            box_term = self._gt_box_term(box_regression, rows, geo, fsel, fgid, n_full)
            total = total + self.box_weight * box_term
            self.last_parts_tensors['box'] = box_term.detach()
        if self.mask_weight > 0 and getattr(heads, 'mask_roi_pool', None) is not None:
            mask_term = self._gt_mask_term(features, image_sizes, rows, geo, fsel, fgid, n_full)
            total = total + self.mask_weight * mask_term
            self.last_parts_tensors['mask'] = mask_term.detach()
        return total + zero

    def gt_rows(self, targets: List[Dict[str, torch.Tensor]], device: torch.device) -> Optional[GTRows]:
        """The batch's annotated instances as rows (:class:`GTRows`), or None when the batch has none. A row is in
        the class term when it is visible enough (``min_visible``) and not pasted (copy-paste's negative ids); rows
        of the same (source image, instance) are one group."""
        counts = [int(t['boxes'].shape[0]) for t in targets]
        n = sum(counts)
        if n == 0:
            return None
        rep = torch.repeat_interleave(torch.arange(len(targets), device=device), torch.tensor(counts, device=device),
                                      output_size=n)  # replica of each row
        ids = torch.cat([t['instance_ids'].to(device).long().reshape(-1) if 'instance_ids' in t
                         else torch.arange(c, device=device) for t, c in zip(targets, counts)])
        vis = torch.cat([t['visible'].to(device).reshape(-1) if 'visible' in t
                         else torch.ones(c, device=device) for t, c in zip(targets, counts)])
        key = replica_groups(len(targets), self.num_repeats, device=device)[rep] * (1 << 20) + ids
        boxes = [t['boxes'].float() for t in targets]
        return GTRows(rep=rep, keep=(vis >= self.min_visible) & (ids >= 0), full=vis.float() >= 1.0 - 1e-6,
                      same=key.view(-1, 1) == key.view(1, -1), boxes=boxes, all_boxes=torch.cat(boxes),
                      labels=torch.cat([t['labels'] for t in targets]).to(device).long(),
                      arange=torch.arange(n, device=device))

    def _gt_class_term(self, class_logits: torch.Tensor, rows: GTRows) -> Tuple[torch.Tensor, torch.Tensor]:
        """The class term: ``mean KL(pbar || p_row)`` of the box classifier's softmax over the class-term rows in
        groups of >= 2 of them (records ``cls`` and ``groups``); returns it and those rows (``multi``)."""
        keep, arange = rows.keep, rows.arange
        member = rows.same & keep.view(1, -1) & keep.view(-1, 1)
        multi = keep & (member.sum(dim=1) >= 2)
        gid = torch.where(keep, _first_member(member), arange)
        kl = grouped_kl(log_distribution(class_logits, 'softmax'), gid, self.detach_consensus,
                        num_groups=arange.shape[0])
        cls_term = torch.where(multi, kl, kl.new_zeros(())).sum() / multi.sum().clamp_min(1)
        self.last_parts_tensors.update(cls=cls_term.detach(), groups=(multi & (gid == arange)).sum())
        return cls_term, multi

    @staticmethod
    def _gt_full_groups(rows: GTRows, multi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The box and mask terms' rows: fully visible rows of the class term's groups, in groups that still hold
        >= 2 of them. Returns (those rows ``fsel``, their group ids ``fgid``, their count, at least 1)."""
        fm = multi & rows.full
        fmember = rows.same & fm.view(1, -1) & fm.view(-1, 1)
        fsel = fm & (fmember.sum(dim=1) >= 2)
        fgid = torch.where(fsel, _first_member(fmember), rows.arange)
        return fsel, fgid, fsel.sum().clamp_min(1)

    def _gt_box_term(self, box_regression: torch.Tensor, rows: GTRows, geo: torch.Tensor, fsel: torch.Tensor,
                     fgid: torch.Tensor, n_full: torch.Tensor) -> torch.Tensor:
        """The box term: each row's regressed box (of its label) in the normalised source frame, against its
        group's mean box."""
        n, arange = rows.arange.shape[0], rows.arange
        pred = self.model.roi_heads.box_coder.decode(box_regression, [rows.all_boxes]).reshape(n, -1, 4)
        bx = source_boxes(pred[arange, rows.labels].float(), geo)
        src = torch.where(fsel.view(-1, 1), bx / geo[:, 12:16], bx.new_zeros(()))  # normalised source frame
        mean = src.new_zeros((n, 4)).index_add(0, fgid, src) / torch.bincount(
            fgid, minlength=n).to(src.dtype).clamp_min(1).view(-1, 1)
        if self.detach_consensus:
            mean = mean.detach()
        return self._box_term(src, mean[fgid], fsel, n_full)

    def _gt_mask_term(self, features, image_sizes, rows: GTRows, geo: torch.Tensor, fsel: torch.Tensor,
                      fgid: torch.Tensor, n_full: torch.Tensor) -> torch.Tensor:
        """The mask term: the mask head on every GT box, each row's logits of its label (a flipped replica's
        un-flipped), per-pixel KL to the group's consensus."""
        heads = self.model.roi_heads
        mx = heads.mask_head(heads.mask_roi_pool(features, rows.boxes, image_sizes))
        mlogits = heads.mask_predictor(mx)[rows.arange, rows.labels]  # (n, S, S)
        mlogits = torch.where(geo[:, 16].view(-1, 1, 1) > 0, mlogits.flip(-1), mlogits)
        return self._mask_term(mlogits, fgid, fsel, n_full, num_groups=rows.arange.shape[0])

    # -------------------------------------------------------------------------- predicted (matched) mode
    def predicted_consistency(self, features, proposals, image_sizes, original_sizes, replica_params,
                              targets=None) -> torch.Tensor:
        """The unweighted term of the detection-based modes (``predicted``, ``resort``, ``area-greedy``) for
        Faster/Mask R-CNN (see the module docstring): detections from this step's proposals (no grad), grouped
        across replicas, then the RoI heads with gradients on each replica's grouped boxes."""
        heads = self.model.roi_heads
        first = next(iter(features.values()))
        zero = sum(f.sum() for f in features.values()) * 0.0  # keeps the graph connected, exactly 0
        self._reset_parts(first)
        boxes, scores, labels = rcnn_detections(heads, features, proposals, image_sizes)
        c = self.matched_rows(boxes, scores, labels, image_sizes, original_sizes, replica_params, targets)
        if c is None:
            return zero
        k = c['det'].shape[0]
        rows = torch.arange(k, device=first.device)
        rois = list(c['det'].split(c['per_replica']))
        class_logits, box_regression = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois,
                                                                                              image_sizes)))
        src = None
        if self.box_weight > 0:
            pred = heads.box_coder.decode(box_regression, [c['det']]).reshape(k, -1, 4)[rows, c['label']].float()
            src = source_boxes(clip_to_input(pred, c['geo']), c['geo']) / c['geo'][:, 12:16]
        mlogits = None
        if self.mask_weight > 0 and getattr(heads, 'mask_roi_pool', None) is not None:
            mx = heads.mask_head(heads.mask_roi_pool(features, rois, image_sizes))
            mlogits = heads.mask_predictor(mx)[rows, c['label']]  # (k, S, S)
            mlogits = torch.where(c['geo'][:, 16].view(-1, 1, 1) > 0, mlogits.flip(-1), mlogits)
        return self._matched_terms(log_distribution(class_logits, 'softmax'), src, mlogits, c) + zero

    def retinanet_consistency(self, head_outputs, anchors, level_sizes, image_sizes, original_sizes,
                              replica_params, targets=None) -> torch.Tensor:
        """The unweighted ``predicted``-mode term for RetinaNet: detections with their anchor indices (no grad),
        matched across replicas; the class logits and box regression of each matched detection's anchor (with
        gradients) give a per-class Bernoulli KL (summed over classes) and the box term."""
        cls_logits, bbox_regression = head_outputs['cls_logits'], head_outputs['bbox_regression']
        zero = cls_logits.sum() * 0.0 + bbox_regression.sum() * 0.0  # keeps the graph connected, exactly 0
        self._reset_parts(cls_logits)
        boxes, scores, labels, anchor_idx = retinanet_detections(self.model, head_outputs, anchors, level_sizes,
                                                                 image_sizes)
        c = self.matched_rows(boxes, scores, labels, image_sizes, original_sizes, replica_params, targets)
        if c is None:
            return zero
        r, a = c['rep'], torch.cat(anchor_idx)[c['index']]
        src = None
        if self.box_weight > 0:
            pred = self.model.box_coder.decode_single(bbox_regression[r, a], torch.stack(anchors)[r, a]).float()
            src = source_boxes(clip_to_input(pred, c['geo']), c['geo']) / c['geo'][:, 12:16]
        return self._matched_terms(log_distribution(cls_logits[r, a], 'bernoulli'), src, None, c) + zero

    def matched_rows(self, boxes, scores, labels, image_sizes, original_sizes, replica_params,
                     targets) -> Optional[Dict]:
        """The rows of the detection-based modes: the detections (per replica, model-input frame) grouped across
        replicas by :meth:`_resort` (``resort``: through the annotations ``targets``) or :meth:`_clusters`
        (``predicted``, ``area-greedy``); None when no group holds two rows. A dict of the rows' detection box
        (``det``), replica (``rep``), label, group id (``gid``), box/mask rows (``fsel``), target box, geometry,
        index among the detections, the number of group ids ``n`` and the rows per replica."""
        if self.match == 'resort':
            if targets is None:
                raise ValueError("match='resort' pairs detections through the annotations: pass the targets.")
            return self._resort(boxes, targets, image_sizes, original_sizes, replica_params)
        return self._clusters(boxes, scores, labels, image_sizes, original_sizes, replica_params)

    def _clusters(self, boxes, scores, labels, image_sizes, original_sizes, replica_params) -> Optional[Dict]:
        """Match the batch's detections (per replica, model-input frame) across the replicas of each source image
        (``predicted``) or of each pair of replicas that passes the area test (``area-greedy``).

        Returns None when no cluster holds two boxes, else the rows in clusters of >= 2 (in replica order):
        ``det`` (model-input boxes), ``rep``, ``label`` (of the cluster's highest-scoring box), ``gid`` (cluster =
        its anchor row, in ``[0, n)``), ``fsel`` (rows of the box/mask terms: not cut by the canvas, in clusters
        with >= 2 of them), ``target`` (the cluster's anchor box: mean normalised source-frame box of its ``fsel``
        rows), ``geo``, ``index`` (into the flattened detections), ``n`` and ``per_replica`` (row counts)."""
        b = len(boxes)
        counts = [int(x.shape[0]) for x in boxes]
        n = sum(counts)
        if n == 0:
            return None
        device = boxes[0].device
        det = torch.cat(boxes).float()
        rep = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(counts, device=device),
                                      output_size=n)
        geo = replica_geometry(image_sizes, original_sizes, replica_params, device)[rep]
        src = source_boxes(det, geo)
        arange = torch.arange(n, device=device)
        pairs = None
        if self.match == 'area-greedy':  # the area test decides which replicas show one image, not the layout
            image = torch.zeros(n, dtype=torch.long, device=device)
            pairs = replica_area_pairs(src / geo[:, 12:16], rep, b, self.area_ratio)
        else:
            image = replica_groups(b, self.num_repeats, device=device)[rep]
        pasted = pasted_overlap(src, rep, replica_params, self.match_iou)
        image = torch.where(pasted, -1 - arange, image)  # an image of their own: never matched
        anchor = greedy_match_rows(src, torch.cat(scores), rep, image, self.match_iou, replica_pairs=pairs)
        multi = torch.bincount(anchor, minlength=n)[anchor] >= 2
        self.last_parts_tensors['groups'] = (multi & (anchor == arange)).sum()
        whole = multi & ~canvas_cut(det, geo)
        fsel = whole & (torch.zeros(n, device=device).index_add(0, anchor, whole.float())[anchor] >= 2)
        target = cluster_mean_boxes(src / geo[:, 12:16], anchor, weight=fsel, num_groups=n)
        index = torch.nonzero(multi).squeeze(1)
        if index.numel() == 0:
            return None
        return {'det': det[index], 'rep': rep[index], 'label': torch.cat(labels).long()[anchor[index]],
                'gid': anchor[index], 'fsel': fsel[index], 'target': target[index], 'geo': geo[index],
                'index': index, 'n': n, 'per_replica': torch.bincount(rep[index], minlength=b).tolist()}

    def _resort(self, boxes, targets, image_sizes, original_sizes, replica_params) -> Optional[Dict]:
        """``Resort(p_k | y)``: each annotation row (model-input frame, after torchvision's transform) takes its
        replica's nearest detection (:func:`~lt_timm.detection.align.resort_rows`); rows of one (source image,
        instance) form a group. Annotations copy-paste added (negative ids) or less visible than ``min_visible``
        are left out. Box and mask rows: fully visible annotations whose detection no crop edge cuts, in groups
        with >= 2 of them; the anchor box is the mean of their detections. Same dict as :meth:`_clusters`, over
        the annotation rows (``n`` = their number; ``label`` = the annotation's)."""
        b = len(boxes)
        counts = [int(x.shape[0]) for x in boxes]
        gcounts = [int(t['boxes'].shape[0]) for t in targets]
        g = sum(gcounts)
        if sum(counts) == 0 or g == 0:
            return None
        device = boxes[0].device
        geo_all = replica_geometry(image_sizes, original_sizes, replica_params, device)
        det = torch.cat(boxes).float()
        drep = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(counts, device=device))
        dsrc = source_boxes(det, geo_all[drep]) / geo_all[drep][:, 12:16]
        grep = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(gcounts, device=device))
        geo = geo_all[grep]
        gsrc = source_boxes(torch.cat([t['boxes'].float() for t in targets]), geo) / geo[:, 12:16]
        ids = torch.cat([t['instance_ids'].to(device).long().reshape(-1) if 'instance_ids' in t
                         else torch.arange(c, device=device) for t, c in zip(targets, gcounts)])
        vis = torch.cat([t['visible'].to(device).reshape(-1) if 'visible' in t
                         else torch.ones(c, device=device) for t, c in zip(targets, gcounts)])
        pick = resort_rows(gsrc, grep, dsrc, drep, self.match_iou)
        valid = (pick >= 0) & (ids >= 0) & (vis >= self.min_visible)
        key = replica_groups(b, self.num_repeats, device=device)[grep] * (1 << 20) + ids
        member = (key.view(-1, 1) == key.view(1, -1)) & valid.view(1, -1) & valid.view(-1, 1)
        multi = valid & (member.sum(dim=1) >= 2)
        arange = torch.arange(g, device=device)
        gid = torch.where(multi, _first_member(member), arange)
        self.last_parts_tensors['groups'] = (multi & (gid == arange)).sum()
        index = torch.nonzero(multi).squeeze(1)
        if index.numel() == 0:
            return None
        safe = pick.clamp_min(0)
        whole = multi & (vis.float() >= 1.0 - 1e-6) & ~canvas_cut(det[safe], geo)
        fsel = whole & (torch.zeros(g, device=device).index_add(0, gid, whole.float())[gid] >= 2)
        target = cluster_mean_boxes(dsrc[safe], gid, weight=fsel, num_groups=g)
        labels = torch.cat([t['labels'] for t in targets]).to(device).long()
        return {'det': det[pick[index]], 'rep': grep[index], 'label': labels[index], 'gid': gid[index],
                'fsel': fsel[index], 'target': target[index], 'geo': geo[index], 'index': pick[index], 'n': g,
                'per_replica': torch.bincount(grep[index], minlength=b).tolist()}

    def _matched_terms(self, logp: torch.Tensor, src: Optional[torch.Tensor], mlogits: Optional[torch.Tensor],
                       c: Dict) -> torch.Tensor:
        """class KL to the cluster consensus (mean over rows) + box smooth-L1 to the anchor box and per-pixel mask
        KL (means over the ``fsel`` rows), each weighted; records ``last_parts_tensors``."""
        k, n, gid, fsel = logp.shape[0], c['n'], c['gid'], c['fsel']
        parts = self.last_parts_tensors
        cls_term = grouped_kl(logp, gid, self.detach_consensus, num_groups=n).sum() / k
        total = cls_term
        parts['cls'] = cls_term.detach()
        n_full = fsel.sum().clamp_min(1)
        if src is not None:
            box_term = self._box_term(src, c['target'], fsel, n_full)
            total = total + self.box_weight * box_term
            parts['box'] = box_term.detach()
        if mlogits is not None:
            fgid = torch.where(fsel, gid, n + torch.arange(k, device=gid.device))  # others: groups of their own
            mask_term = self._mask_term(mlogits, fgid, fsel, n_full, num_groups=n + k)
            total = total + self.mask_weight * mask_term
            parts['mask'] = mask_term.detach()
        return total

    def _box_term(self, src: torch.Tensor, target: torch.Tensor, fsel: torch.Tensor,
                  n_full: torch.Tensor) -> torch.Tensor:
        """Both modes' box term: smooth-L1 (summed over the 4 normalised source-frame coordinates) of the ``fsel``
        rows to their target box, averaged over those ``n_full`` rows."""
        per_row = F.smooth_l1_loss(src, target, beta=self.box_beta, reduction='none').sum(dim=1)
        return torch.where(fsel, per_row, per_row.new_zeros(())).sum() / n_full

    def _mask_term(self, mlogits: torch.Tensor, groups: torch.Tensor, fsel: torch.Tensor, n_full: torch.Tensor,
                   num_groups: int) -> torch.Tensor:
        """Both modes' mask term: per-pixel Bernoulli KL of the ``fsel`` rows' (un-flipped) mask logits to their
        group's consensus, averaged over those ``n_full`` rows and the pixels."""
        mkl = grouped_kl(log_distribution(mlogits, 'bernoulli'), groups, self.detach_consensus, num_groups=num_groups)
        return torch.where(fsel, mkl, mkl.new_zeros(())).sum() / n_full / float(mlogits.shape[-1] * mlogits.shape[-2])
