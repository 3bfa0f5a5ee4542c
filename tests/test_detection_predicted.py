"""``--lt-match predicted``: the paper's instance-level LossTransform on matched *predictions*, and RetinaNet.

The vectorised greedy matching (lt_timm.detection.align) is compared with ``slow_greedy_match`` below, a plain
sequential loop over score-ordered boxes (the implementation align.py had before), kept here as the reference.
Models are tiny (timm mobilenetv3_small_050, 64 px, narrow heads, no weights); nothing is downloaded.
"""
import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from conftest import REPO, cli_env
from lt_timm.detection.align import cluster_mean_boxes, greedy_match, greedy_match_rows
from lt_timm.detection.backbone import build_backbone, build_detector
from lt_timm.detection.consistency import (InstanceLossTransform, canvas_cut, replica_geometry, retinanet_detections,
                                           source_boxes)
from lt_timm.detection.transforms import ReplicaParams, apply_replica, forward_boxes, invert_boxes

pytestmark = pytest.mark.usefixtures('one_thread')

SIZE = 64


# ------------------------------------------------------------------------------------ slow reference
def slow_greedy_match(boxes, scores=None, iou_threshold=0.5):
    """Sequential greedy matching: visit boxes by decreasing score (ties: replica, then row order); join the existing
    cluster whose first box has the largest IoU >= threshold (ties: the earliest cluster) unless the cluster already
    holds a box of this replica; else start a cluster. Cluster ids in the order clusters are started."""
    rows = [(r, i) for r in range(len(boxes)) for i in range(boxes[r].shape[0])]
    out = [torch.full((b.shape[0],), -1, dtype=torch.long) for b in boxes]
    if not rows:
        return out
    allb = torch.cat([b.float().reshape(-1, 4) for b in boxes])
    alls = (torch.cat([s.float().reshape(-1) for s in scores]) if scores is not None
            else torch.zeros(len(rows)))
    order = sorted(range(len(rows)), key=lambda k: (-float(alls[k]), k))
    iou = box_iou(allb, allb)
    anchors, members = [], []
    for k in order:
        r, i = rows[k]
        best, best_c = None, -1
        for c, a in enumerate(anchors):
            # the threshold test in the IoU's float32, as torch compares a tensor with a Python number: an IoU
            # of exactly 56/80 passes 0.7 (float64(float32(0.7)) < 0.7 would not)
            if r in members[c] or not bool(iou[k, a] >= iou_threshold):
                continue
            v = float(iou[k, a])
            if best_c < 0 or v > best:
                best, best_c = v, c
        if best_c < 0:
            anchors.append(k)
            members.append({r})
            best_c = len(anchors) - 1
        else:
            members[best_c].add(r)
        out[r][i] = best_c
    return out


def _random_replicas(g, m, max_boxes=8, grid=True):
    """Boxes around a few objects, on an integer grid (many exact IoU ties) and with coarse scores (score ties)."""
    nobj = int(torch.randint(1, 6, (), generator=g))
    centres = torch.randint(0, 40, (nobj, 2), generator=g).float()
    boxes, scores = [], []
    for _ in range(m):
        k = int(torch.randint(0, max_boxes + 1, (), generator=g))
        idx = torch.randint(0, nobj, (k,), generator=g)
        c = centres[idx] + torch.randint(-3, 4, (k, 2), generator=g).float()
        wh = torch.randint(4, 12, (k, 2), generator=g).float()
        if not grid:
            c = c + torch.rand(k, 2, generator=g)
        boxes.append(torch.cat([c, c + wh], 1))
        scores.append(torch.randint(0, 3, (k,), generator=g).float() / 2)
    return boxes, scores


def test_vectorised_matching_equals_slow_reference():
    """Exactly the same cluster ids over many random cases: ties in IoU and score, no scores, empty replicas, one
    replica, several thresholds; and the batched form (several images at once) equals matching each image alone."""
    g = torch.Generator().manual_seed(0)
    n_multi = 0
    for seed in range(300):
        m = int(torch.randint(1, 5, (), generator=g))
        boxes, scores = _random_replicas(g, m, grid=seed % 2 == 0)
        sc = None if seed % 5 == 0 else scores
        thr = (0.3, 0.5, 0.7)[seed % 3]
        ref = slow_greedy_match(boxes, sc, thr)
        got = greedy_match(boxes, sc, thr)
        assert [x.tolist() for x in got] == [x.tolist() for x in ref], seed
        flat = torch.cat(ref) if ref else torch.zeros(0, dtype=torch.long)
        n_multi += int(flat.numel() > 0 and torch.bincount(flat).max() >= 2)
    assert n_multi >= 100  # the cases do produce multi-box clusters
    # one call over a batch of images == each image on its own (anchor rows -> same partition)
    for seed in range(20):
        imgs = [_random_replicas(g, int(torch.randint(1, 4, (), generator=g))) for _ in range(3)]
        allb, alls, rep, image, refs = [], [], [], [], []
        for i, (boxes, scores) in enumerate(imgs):
            for r, (b, s) in enumerate(zip(boxes, scores)):
                allb.append(b)
                alls.append(s)
                rep.append(torch.full((b.shape[0],), 10 * i + r))
                image.append(torch.full((b.shape[0],), i))
            refs.append(torch.cat(slow_greedy_match(boxes, scores, 0.5)) + 1000 * i)
        anchor = greedy_match_rows(torch.cat(allb), torch.cat(alls), torch.cat(rep), torch.cat(image), 0.5)
        ref = torch.cat(refs)
        assert torch.equal(anchor.view(-1, 1) == anchor.view(1, -1), ref.view(-1, 1) == ref.view(1, -1)), seed
        assert torch.equal(anchor[anchor], anchor)  # an anchor points to itself


def test_matching_edge_cases():
    assert [x.numel() for x in greedy_match([torch.zeros(0, 4), torch.zeros(0, 4)])] == [0, 0]
    assert greedy_match_rows(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0
    # one replica: never two boxes in one cluster, however much they overlap
    b = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.], [1., 0., 10., 10.]])
    assert greedy_match([b])[0].tolist() == [0, 1, 2]
    # identical boxes in two replicas: the highest score anchors, the other box of its replica cannot join it
    r1 = torch.tensor([[0., 0., 10., 10.]])
    out = greedy_match([b[:2], r1], [torch.tensor([0.2, 0.9]), torch.tensor([0.5])])
    assert out[0].tolist() == [1, 0] and out[1].tolist() == [0]
    # equal IoU (90/110) with two anchors: the box joins the cluster started first, whichever that is
    ab = torch.tensor([[0., 0., 10., 10.], [2., 0., 12., 10.]])
    c = torch.tensor([[1., 0., 11., 10.]])
    out = greedy_match([ab, c], [torch.tensor([0.9, 0.8]), torch.tensor([0.5])])
    assert out[0].tolist() == [0, 1] and out[1].tolist() == [0]
    out = greedy_match([ab, c], [torch.tensor([0.8, 0.9]), torch.tensor([0.5])])
    assert out[0].tolist() == [1, 0] and out[1].tolist() == [0]
    # cluster of the anchor: mean of the matched boxes
    mean = cluster_mean_boxes(torch.tensor([[0., 0., 2., 2.], [2., 2., 4., 4.], [9., 9., 9., 9.]]),
                              torch.tensor([0, 0, 2]))
    assert mean.tolist() == [[1., 1., 3., 3.], [1., 1., 3., 3.], [9., 9., 9., 9.]]


def test_hand_made_matches_after_known_transforms():
    """A source box seen through a flip, a scale + translation and the identity maps back to the same source box and
    lands in one cluster; a box elsewhere does not; a second box of one replica on the same instance never joins."""
    src = torch.tensor([[10., 12., 30., 40.]])
    ps = [ReplicaParams(src_size=(64, 64), out_size=(64, 64)),
          ReplicaParams(src_size=(64, 64), out_size=(64, 64), flip=True),
          ReplicaParams(src_size=(64, 64), out_size=(64, 64), scaled_size=(96, 80), tx=-7, ty=5)]
    seen = [forward_boxes(src, p) for p in ps]
    assert torch.equal(seen[1], torch.tensor([[34., 12., 54., 40.]]))  # x -> 64 - x by hand
    assert torch.equal(seen[2], torch.tensor([[5.5, 23., 30.5, 65.]]))  # x * 1.25 - 7, y * 1.5 + 5 by hand
    other = torch.tensor([[45., 45., 60., 60.]])  # in replica 0's frame: nowhere near the instance
    near = seen[2] + torch.tensor([[1., 1., 1., 1.]])  # replica 2 sees the instance twice
    per_replica = [torch.cat([seen[0], other]), seen[1], torch.cat([seen[2], near])]
    back = [invert_boxes(b, p) for b, p in zip(per_replica, ps)]
    assert torch.allclose(back[1], src) and torch.allclose(back[2][:1], src)
    scores = [torch.tensor([0.9, 0.8]), torch.tensor([0.7]), torch.tensor([0.6, 0.5])]
    ids = greedy_match(back, scores, 0.5)
    a = int(ids[0][0])
    assert int(ids[1][0]) == a and int(ids[2][0]) == a
    assert int(ids[0][1]) != a and int(ids[2][1]) != a and int(ids[2][1]) != int(ids[0][1])
    # without the flip's inverse the flipped box would not match: the geometry matters
    assert greedy_match([back[0][:1], seen[1]], iou_threshold=0.5)[1].tolist() == [1]


def _geo(params, model_sizes):
    return replica_geometry(model_sizes, [p.out_size for p in params], params, torch.device('cpu'))


def test_source_boxes_and_canvas_cut_by_hand():
    """The wrapper's vectorised frame mapping equals invert_boxes after undoing torchvision's resize; a box on a
    canvas edge that the crop cut through is flagged, one on an edge with padding behind it is not."""
    p_cut = ReplicaParams(src_size=(64, 64), out_size=(64, 64), scaled_size=(96, 96), tx=-16, ty=-16)  # crop
    p_pad = ReplicaParams(src_size=(64, 64), out_size=(64, 64), flip=True, scaled_size=(48, 48), tx=8, ty=8)
    model_sizes = [(128, 128), (64, 64)]  # torchvision resized replica 0 by 2
    geo = _geo([p_cut, p_pad], model_sizes)
    boxes = torch.tensor([[0., 10., 40., 50.],     # replica 0, touches x = 0 where the crop cut the source
                          [20., 20., 60., 60.],    # replica 0, inside
                          [8., 8., 20., 30.]])     # replica 1, touches the padded border only
    rows = geo[[0, 0, 1]]
    expected = torch.cat([invert_boxes(boxes[:2] / 2, p_cut), invert_boxes(boxes[2:], p_pad)])
    assert torch.allclose(source_boxes(boxes, rows), expected)
    assert canvas_cut(boxes, rows).tolist() == [True, False, False]
    right = torch.tensor([[60., 10., 128., 20.]])  # replica 0, x2 = 128 px = 64 replica px: cut on the right
    assert canvas_cut(right, geo[[0]]).tolist() == [True]


# ---------------------------------------------------------------------------------------------- models
def _tiny(kind='maskrcnn', **kw):
    torch.manual_seed(0)
    if kind == 'retinanet':
        return build_detector('retinanet', 'mobilenetv3_small_050', 2, min_size=SIZE, max_size=SIZE, fpn_channels=16,
                              **kw)
    return build_detector(kind, 'mobilenetv3_small_050', 2, min_size=SIZE, max_size=SIZE, fpn_channels=32,
                          mask_head_channels=16, box_head_dim=64, rpn_pre_nms_top_n_train=50,
                          rpn_post_nms_top_n_train=50, box_batch_size_per_image=32, box_detections_per_img=30, **kw)


@pytest.fixture(scope='module')
def maskrcnn():
    return _tiny('maskrcnn')


def _scene(n=2, seed=0, masks=True):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, SIZE, SIZE, generator=g) * 0.2
    boxes, mk = [], torch.zeros(n, SIZE, SIZE, dtype=torch.uint8)
    for j in range(n):
        x1, y1 = 4 + 24 * j, 6 + 10 * j
        boxes.append([x1, y1, x1 + 16, y1 + 30])
        mk[j, y1:y1 + 30, x1:x1 + 16] = 1
        img[:, y1:y1 + 30, x1:x1 + 16] += 0.7
    t = {'boxes': torch.tensor(boxes, dtype=torch.float32), 'labels': torch.ones(n, dtype=torch.long), 'image_id': seed}
    if masks:
        t['masks'] = mk
    return img, t


def _replicas(img, t, params):
    out = [apply_replica(img, dict(t, instance_ids=torch.arange(t['boxes'].shape[0])), p) for p in params]
    return [o[0] for o in out], [o[1] for o in out], list(params)


IDENT = ReplicaParams(src_size=(SIZE, SIZE), out_size=(SIZE, SIZE))
FLIP = ReplicaParams(src_size=(SIZE, SIZE), out_size=(SIZE, SIZE), flip=True)
SCALED = ReplicaParams(src_size=(SIZE, SIZE), out_size=(SIZE, SIZE), flip=True, scaled_size=(72, 72), tx=-4, ty=-4)


def test_predicted_mode_finite_with_gradients(maskrcnn):
    """Matched detections exist on a random-init model (scores ~0.5 > the model's 0.05 threshold): every term is
    finite and positive, and the consistency alone sends gradients into the box predictor and the mask head."""
    w = InstanceLossTransform(maskrcnn, 2, match='predicted').train()
    maskrcnn.zero_grad()
    losses = w(*_replicas(*_scene(), [IDENT, SCALED]))
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    parts = w.last_parts
    assert parts['groups'] > 0 and parts['cls'] > 0 and parts['box'] > 0 and parts['mask'] > 0
    total = parts['cls'] + parts['box'] + parts['mask']
    assert float(losses['loss_consistency'].detach()) == pytest.approx(total, rel=1e-5)
    losses['loss_consistency'].backward()
    pred = maskrcnn.roi_heads.box_predictor
    for p in (pred.cls_score.weight, pred.bbox_pred.weight, maskrcnn.roi_heads.mask_predictor.mask_fcn_logits.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    # rho = 0: measured, no gradient
    w0 = InstanceLossTransform(maskrcnn, 2, rho=0.0, match='predicted').train()
    losses0 = w0(*_replicas(*_scene(), [IDENT, SCALED]))
    assert float(losses0['loss_consistency']) == 0.0 and not losses0['loss_consistency'].requires_grad
    assert w0.last_parts['cls'] > 0


def test_predicted_mode_zero_without_detections(maskrcnn):
    """No detection survives the score threshold (early training): the term is exactly 0, finite, and the total loss
    still backpropagates; the same for replicas without any instance and a single replica."""
    w = InstanceLossTransform(maskrcnn, 2, match='predicted').train()
    old = maskrcnn.roi_heads.score_thresh
    try:
        maskrcnn.roi_heads.score_thresh = 1.0  # softmax scores are never > 1
        losses = w(*_replicas(*_scene(), [IDENT, FLIP]))
    finally:
        maskrcnn.roi_heads.score_thresh = old
    assert float(losses['loss_consistency'].detach()) == 0.0 and w.last_parts == {'cls': 0.0, 'box': 0.0, 'mask': 0.0,
                                                                         'groups': 0}
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    sum(losses.values()).backward()
    img, _ = _scene()
    empty = {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.long),
             'masks': torch.zeros(0, SIZE, SIZE, dtype=torch.uint8), 'image_id': 0}
    losses = w(*_replicas(img, empty, [IDENT, FLIP]))
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    w3 = InstanceLossTransform(maskrcnn, 3, match='predicted').train()
    losses = w3(*_replicas(*_scene(), [IDENT]))  # one replica: every cluster has one box
    assert float(losses['loss_consistency'].detach()) == 0.0 and w3.last_parts['groups'] == 0


def test_identical_replicas_lower_consistency(maskrcnn):
    """Property: when the replicas' predictions are made identical (identical replicas), the class and mask terms
    vanish and the consistency is lower than for differently augmented replicas of the same image."""
    w = InstanceLossTransform(maskrcnn, 2, match='predicted').train()
    scene = _scene()
    different = float(w(*_replicas(*scene, [IDENT, SCALED]))['loss_consistency'].detach())
    same = float(w(*_replicas(*scene, [IDENT, IDENT]))['loss_consistency'].detach())
    parts = w.last_parts
    assert parts['groups'] > 0 and parts['cls'] < 1e-6 and parts['mask'] < 1e-6
    assert same < different


def test_class_and_box_terms_equal_slow_computation(maskrcnn):
    """(identity, flip) replicas: detections from the same proposals, mapped back with invert_boxes, matched with the
    slow reference, then per row the heads on its own box, the softmax KL to the cluster mean and the smooth-L1 of
    the regressed box to the mean matched box — one row at a time — equal the wrapper's class and box terms."""
    m = maskrcnn
    images, targets, params = _replicas(*_scene(), [IDENT, FLIP])
    w = InstanceLossTransform(m, 2, match='predicted').train()
    w(images, targets, params)
    parts = w.last_parts
    h = m.roi_heads
    with torch.no_grad():
        il, tg = m.transform(images, [dict(t) for t in targets])
        assert il.image_sizes == [(SIZE, SIZE)] * 2  # no resize: model-input frame = replica frame
        feats = m.backbone(il.tensors)
        proposals, _ = m.rpn(il, feats, tg)
        cl, reg = h.box_predictor(h.box_head(h.box_roi_pool(feats, proposals, il.image_sizes)))
        det, scores, labels = h.postprocess_detections(cl, reg, proposals, il.image_sizes)
        src = [invert_boxes(d, p) for d, p in zip(det, params)]
        ids = slow_greedy_match(src, scores, 0.5)
        rows = [(r, i) for r in range(2) for i in range(det[r].shape[0])]
        clusters = {}
        for r, i in rows:
            clusters.setdefault(int(ids[r][i]), []).append((r, i))
        cls_terms, box_terms = [], []
        for members in clusters.values():
            if len(members) < 2:
                continue
            top = max(members, key=lambda ri: float(scores[ri[0]][ri[1]]))  # the cluster's label: its best box
            label = int(labels[top[0]][top[1]])
            probs, boxes = [], []
            for r, i in members:
                one = {k: v[r:r + 1] for k, v in feats.items()}
                c1, r1 = h.box_predictor(h.box_head(h.box_roi_pool(one, [det[r][i:i + 1]], [(SIZE, SIZE)])))
                probs.append(torch.softmax(c1[0], 0))
                b = h.box_coder.decode(r1, [det[r][i:i + 1]]).reshape(-1, 4)[label].clamp(0, SIZE)
                boxes.append(invert_boxes(b[None], params[r])[0] / SIZE)
            pbar = torch.stack(probs).mean(0)
            anchor = torch.stack([src[r][i] for r, i in members]).mean(0) / SIZE
            for p, b in zip(probs, boxes):
                cls_terms.append(float((pbar * (pbar.log() - p.log())).sum()))
                box_terms.append(float(F.smooth_l1_loss(b, anchor, beta=0.02, reduction='sum')))
    assert len(cls_terms) >= 2 and parts['groups'] == len(clusters) - sum(len(v) < 2 for v in clusters.values())
    assert math.isclose(parts['cls'], sum(cls_terms) / len(cls_terms), rel_tol=1e-3, abs_tol=1e-7)
    assert math.isclose(parts['box'], sum(box_terms) / len(box_terms), rel_tol=1e-3, abs_tol=1e-7)


# ------------------------------------------------------------------------------------------- RetinaNet
def test_retinanet_backbone_and_anchors():
    bb = build_backbone('mobilenetv3_small_050', out_channels=16, extra='p6p7')
    feats = bb(torch.rand(1, 3, SIZE, SIZE))
    assert list(feats) == ['0', '1', '2', 'p6', 'p7'] and bb.num_levels == 3 and bb.num_extra == 2
    assert [f.shape[-1] for f in feats.values()] == [8, 4, 2, 1, 1]  # strides 8, 16, 32, 64, 128
    r = build_detector('retinanet', 'mobilenetv3_small_050', 3, min_size=800, max_size=1333, fpn_channels=16)
    assert r.anchor_generator.sizes[0] == (32, 40, 50) and len(r.anchor_generator.sizes) == 5
    assert r.head.classification_head.num_classes == 3 and r.anchor_generator.num_anchors_per_location() == [9] * 5
    with pytest.raises(ValueError, match='anchor sizes'):
        build_detector('retinanet', 'mobilenetv3_small_050', 2, anchor_sizes=[8, 16])


def _retinanet_head(r, images):
    """RetinaNet's own forward up to its head (no grad by the caller): image list, head outputs, anchors and the
    number of anchors per level (counted here from the feature maps, independently of the library)."""
    il, _ = r.transform(images)
    feats = list(r.backbone(il.tensors).values())
    out = r.head(feats)
    anchors = r.anchor_generator(il, feats)
    hw = [f.shape[-2] * f.shape[-1] for f in feats]
    return il, out, anchors, [v * (out['cls_logits'].shape[1] // sum(hw)) for v in hw]


def test_retinanet_detections_equal_torchvision_postprocess():
    """The index-keeping post-processing gives torchvision's detections, and each anchor index decodes to its box."""
    r = _tiny('retinanet', score_thresh=0.005, detections_per_img=40).eval()
    img, _ = _scene()
    with torch.no_grad():
        expected = r([img])[0]
        il, out, anchors, levels = _retinanet_head(r, [img])
        boxes, scores, labels, idx = retinanet_detections(r, out, anchors, levels, il.image_sizes)
    assert boxes[0].shape[0] == 40
    assert torch.equal(boxes[0], expected['boxes']) and torch.equal(scores[0], expected['scores'])
    assert torch.equal(labels[0], expected['labels'])
    dec = r.box_coder.decode_single(out['bbox_regression'][0, idx[0]], anchors[0][idx[0]]).clamp(0, SIZE)
    assert torch.allclose(dec, boxes[0])
    assert torch.allclose(torch.sigmoid(out['cls_logits'][0, idx[0], labels[0]]), scores[0])


class _Images(torch.utils.data.Dataset):
    num_classes = 2

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_retinanet_trains_one_step_and_evaluates():
    from lt_timm.detection.data import eval_collate
    from lt_timm.detection.evaluate import coco_from_dataset, evaluate
    r = _tiny('retinanet', score_thresh=0.005, detections_per_img=40)
    with pytest.raises(ValueError, match='--lt-match predicted'):
        InstanceLossTransform(r, 2)  # gt mode needs RoI heads
    w = InstanceLossTransform(r, 2, match='predicted').train()
    losses = w(*_replicas(*_scene(masks=False), [IDENT, SCALED]))
    assert set(losses) == {'classification', 'bbox_regression', 'loss_consistency'}
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    parts = w.last_parts
    assert parts['groups'] > 0 and parts['cls'] > 0 and parts['box'] > 0 and parts['mask'] == 0.0
    opt = torch.optim.SGD(w.parameters(), lr=0.01)
    losses['loss_consistency'].backward(retain_graph=True)
    g = r.head.classification_head.cls_logits.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    assert float(r.head.regression_head.bbox_reg.weight.grad.abs().sum()) > 0
    before = r.head.classification_head.cls_logits.weight.detach().clone()
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(before, r.head.classification_head.cls_logits.weight)
    # identical replicas: the per-class Bernoulli KL and the box term vanish
    w(*_replicas(*_scene(masks=False), [IDENT, IDENT]))
    assert w.last_parts['groups'] > 0 and w.last_parts['cls'] < 1e-6 and w.last_parts['box'] < 1e-6
    # evaluation through the existing COCO path: box AP, no masks
    ds = _Images([_scene(seed=s, masks=False) for s in range(2)])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=eval_collate)
    res = evaluate(w, loader, coco_from_dataset(ds, with_masks=False), with_masks=False)
    assert set(res) == {'box_AP', 'box_AP50', 'box_AP75'} and all(0.0 <= v <= 100.0 for v in res.values())
    # default init (prior 0.01 < score_thresh 0.05): no detection, the term is exactly 0
    w2 = InstanceLossTransform(_tiny('retinanet'), 2, match='predicted').train()
    losses = w2(*_replicas(*_scene(masks=False), [IDENT, FLIP]))
    assert float(losses['loss_consistency'].detach()) == 0.0 and w2.last_parts['groups'] == 0


def test_retinanet_class_term_is_summed_bernoulli_kl():
    """The RetinaNet class term equals, from the model's own anchors' logits, the per-class Bernoulli KL to the
    cluster's mean sigmoid, summed over classes and averaged over matched rows."""
    r = _tiny('retinanet', score_thresh=0.005, detections_per_img=20)
    images, targets, params = _replicas(*_scene(masks=False), [IDENT, FLIP])
    w = InstanceLossTransform(r, 2, match='predicted').train()
    w(images, targets, params)
    with torch.no_grad():
        il, out, anchors, levels = _retinanet_head(r, images)
        boxes, scores, _, idx = retinanet_detections(r, out, anchors, levels, il.image_sizes)
        ids = slow_greedy_match([invert_boxes(b, p) for b, p in zip(boxes, params)], scores, 0.5)
        terms = []
        for c in set(torch.cat(ids).tolist()):
            members = [(rr, i) for rr in range(2) for i in range(ids[rr].numel()) if int(ids[rr][i]) == c]
            if len(members) < 2:
                continue
            q = [torch.sigmoid(out['cls_logits'][rr, idx[rr][i]]) for rr, i in members]
            qbar = torch.stack(q).mean(0)
            for qi in q:
                kl = qbar * (qbar / qi).log() + (1 - qbar) * ((1 - qbar) / (1 - qi)).log()
                terms.append(float(kl.sum()))
    assert len(terms) >= 2
    assert math.isclose(w.last_parts['cls'], sum(terms) / len(terms), rel_tol=1e-3, abs_tol=1e-7)


# ------------------------------------------------------------------------------------------------- CLI
def _write_pedestrians(root, n=5):
    """A tiny PennFudanPed-like folder: PNG images with bright 'pedestrians' and their instance masks."""
    from PIL import Image
    os.makedirs(os.path.join(root, 'PNGImages'))
    os.makedirs(os.path.join(root, 'PedMasks'))
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
        mask = np.zeros((48, 64), dtype=np.uint8)
        for j in range(1 + i % 2):
            x, y = 6 + 28 * j + i, 4 + 3 * j
            mask[y:y + 36, x:x + 14] = j + 1
            img[y:y + 36, x:x + 14] = 200
        Image.fromarray(img).save(os.path.join(root, 'PNGImages', f'p{i:03d}.png'))
        Image.fromarray(mask).save(os.path.join(root, 'PedMasks', f'p{i:03d}_mask.png'))


_CFG = ('backbone: mobilenetv3_small_050\nfpn_channels: 32\nmask_head_channels: 16\nbox_head_dim: 64\n'
        'loss: losstransform\naug_repeats: 2\nbatch_size: 4\nimg_size: 64\nlr: 0.01\nlr_steps: [1]\nwarmup_iters: 1\n'
        'val_size: 2\nrpn_pre_nms: 50\nrpn_post_nms: 50\nbox_batch_per_image: 32\ndetections_per_img: 30\n'
        'log_interval: 1\nthreads: 1\nlt_epoch: full\nno_plot: true\n')


@pytest.fixture(scope='module')
def pedestrians(tmp_path_factory):
    root = tmp_path_factory.mktemp('peds') / 'PennFudanPed'
    _write_pedestrians(str(root))
    cfg = root.parent / 'cfg.yaml'
    cfg.write_text(_CFG + 'lt_match: predicted\nlt_match_iou: 0.6\n')  # YAML keys like every other flag
    return str(root), str(cfg)


def test_cli_end_to_end_predicted(pedestrians, tmp_path):
    """train_detection.py, one tiny epoch of Mask R-CNN with --lt-match predicted from the YAML config."""
    root, cfg = pedestrians
    r = subprocess.run([sys.executable, os.path.join(REPO, 'train_detection.py'), '-c', cfg, '--data-dir', root,
                        '--model', 'maskrcnn', '--epochs', '1', '--output', str(tmp_path), '--experiment', 'pred'],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert '--lt-match predicted' in log and 'Train: 0 [' in log and 'Eval:' in log
    rows = list(csv.DictReader(open(tmp_path / 'pred' / 'summary.csv')))
    assert len(rows) == 1 and math.isfinite(float(rows[0]['train_consistency']))
    assert math.isfinite(float(rows[0]['eval_mask_AP']))
    args = (tmp_path / 'pred' / 'args.yaml').read_text()
    assert 'lt_match: predicted' in args and 'lt_match_iou: 0.6' in args


def _main(argv):
    from lt_timm.cli.detection import main
    return main(argv)


def test_cli_retinanet_in_process_and_errors(pedestrians, tmp_path, capsys):
    """--model retinanet trains and evaluates (box AP only); with the default --lt-match gt it stops with one clear
    error naming --lt-match predicted, before anything is written; a bad --lt-match-iou too."""
    root, cfg = pedestrians
    base = ['-c', cfg, '--data-dir', root, '--model', 'retinanet', '--epochs', '1', '--output', str(tmp_path)]
    for extra, expected in ((['--lt-match', 'gt'], '--lt-match predicted'),
                            (['--lt-match-iou', '0'], '--lt-match-iou 0.0')):
        with pytest.raises(SystemExit) as e:
            _main(base + extra + ['--experiment', 'bad'])
        err = capsys.readouterr().err
        assert e.value.code == 2 and expected in err and err.startswith('error: ') and len(err.splitlines()) == 1
    assert not (tmp_path / 'bad').exists()
    assert _main(base + ['--experiment', 'retina']) == 0
    rows = list(csv.DictReader(open(tmp_path / 'retina' / 'summary.csv')))
    assert len(rows) == 1 and 'eval_box_AP' in rows[0] and 'eval_mask_AP' not in rows[0]
    assert math.isfinite(float(rows[0]['train_loss'])) and math.isfinite(float(rows[0]['eval_box_AP']))


def test_match_flags_defaults_and_choices(pedestrians):
    """--lt-match defaults to gt (the former behaviour), its choices are the wrapper's modes, YAML keys set both."""
    from lt_timm.detection import consistency
    from lt_timm.cli.detection import MATCH_MODES, parse_args
    assert MATCH_MODES == consistency.MATCH_MODES
    a = parse_args(['--data-dir', 'x'])
    assert a.lt_match == 'gt' and a.lt_match_iou == 0.5 and a.model == 'maskrcnn'
    a = parse_args(['-c', pedestrians[1], '--data-dir', 'x'])
    assert a.lt_match == 'predicted' and a.lt_match_iou == 0.6
    assert parse_args(['-c', pedestrians[1], '--data-dir', 'x', '--lt-match', 'gt']).lt_match == 'gt'
    with pytest.raises(SystemExit):
        parse_args(['--data-dir', 'x', '--lt-match', 'nearest'])
