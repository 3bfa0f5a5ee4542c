"""Tests for lt_timm.detection (instance-level LossTransform for torchvision detectors).

Everything runs on tiny generated images with tiny models built with ``weights=None``: nothing is downloaded.
"""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lt_timm.detection.align import assign_to_gt, compact_groups, greedy_match, gt_instance_groups
from lt_timm.detection.consistency import InstanceLossTransform, sanitize_targets
from lt_timm.detection.data import (PennFudanDataset, ReplicaDataset, masks_to_boxes_safe, replica_collate,
                                    split_indices)
from lt_timm.detection.transforms import (ReplicaAugment, ReplicaParams, apply_image, apply_masks, apply_replica,
                                          forward_boxes, invert_boxes, invert_masks, sample_params)
from lt_timm.layout import replica_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures('one_thread')


# ------------------------------------------------------------------------------------------ transforms
def test_forward_boxes_hand_computed():
    b = torch.tensor([[10., 20., 30., 50.]])
    # flip only, W = 100: x -> 100 - x, x1/x2 swap
    p = ReplicaParams(src_size=(80, 100), out_size=(80, 100), flip=True)
    assert torch.equal(forward_boxes(b, p), torch.tensor([[70., 20., 90., 50.]]))
    # scale x2 (160x200) then translate (-5, 7)
    p = ReplicaParams(src_size=(80, 100), out_size=(80, 100), scaled_size=(160, 200), tx=-5, ty=7)
    assert torch.equal(forward_boxes(b, p), torch.tensor([[15., 47., 55., 107.]]))
    # flip + scale 0.5 + translate (3, 4): x1 = (100-30)*0.5+3 = 38, x2 = (100-10)*.5+3 = 48
    p = ReplicaParams(src_size=(80, 100), out_size=(80, 100), flip=True, scaled_size=(40, 50), tx=3, ty=4)
    assert torch.equal(forward_boxes(b, p), torch.tensor([[38., 14., 48., 29.]]))


@pytest.mark.parametrize('p', [
    ReplicaParams(src_size=(64, 64), out_size=(64, 64), flip=True),
    ReplicaParams(src_size=(64, 48), out_size=(64, 48), tx=5, ty=-3),
    ReplicaParams(src_size=(64, 48), out_size=(64, 48), scaled_size=(128, 96)),
    ReplicaParams(src_size=(64, 48), out_size=(64, 48), flip=True, scaled_size=(32, 24), tx=-7, ty=11),
])
def test_invert_boxes_exact(p):
    b = torch.tensor([[0., 0., 48., 64.], [4., 8., 12., 40.], [20., 2., 21., 3.]])
    assert torch.equal(invert_boxes(forward_boxes(b, p), p), b)


def test_invert_boxes_property_random():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        h, w = int(torch.randint(16, 200, (1,), generator=g)), int(torch.randint(16, 200, (1,), generator=g))
        p = sample_params((h, w), 0.5, (0.5, 2.0), 0.3, generator=g)
        xy = torch.rand(10, 2, generator=g) * torch.tensor([w, h])
        wh = torch.rand(10, 2, generator=g) * torch.tensor([w, h]) * 0.5 + 0.5
        b = torch.cat([xy, xy + wh], 1)
        back = invert_boxes(forward_boxes(b, p), p)
        assert torch.allclose(back, b, atol=1e-4, rtol=0), p
        fwd = forward_boxes(b, p)
        assert (fwd[:, 2] > fwd[:, 0]).all() and (fwd[:, 3] > fwd[:, 1]).all()


def test_image_and_mask_follow_boxes():
    """A one-pixel-precise rectangle: the transformed mask's bounding box equals the transformed box."""
    img = torch.zeros(3, 40, 60)
    mask = torch.zeros(1, 40, 60, dtype=torch.uint8)
    mask[0, 10:20, 5:25] = 1
    img[:, 10:20, 5:25] = 1.
    box = torch.tensor([[5., 10., 25., 20.]])
    p = ReplicaParams(src_size=(40, 60), out_size=(40, 60), flip=True, scaled_size=(80, 120), tx=-60, ty=-10)
    m2 = apply_masks(mask, p)
    assert m2.shape == (1, 40, 60)
    assert torch.equal(masks_to_boxes_safe(m2), forward_boxes(box, p))
    i2 = apply_image(img, p)
    assert i2.shape == (3, 40, 60)
    assert torch.equal(masks_to_boxes_safe((i2[:1] > 0.5).to(torch.uint8)), forward_boxes(box, p))
    # inverse of the mask returns the original mask where it stayed visible
    back = invert_masks(m2.float(), p, mode='nearest')
    assert torch.equal(back.round().to(torch.uint8), mask)


def test_forward_boxes_matches_mask_within_canvas():
    mask = torch.zeros(1, 40, 60, dtype=torch.uint8)
    mask[0, 10:20, 5:25] = 1
    p = ReplicaParams(src_size=(40, 60), out_size=(40, 60), flip=True, scaled_size=(80, 120), tx=-60, ty=-10)
    # box after flip+scale: x [70, 110) -> +tx -> [10, 50); y [20, 40) -> [10, 30)
    assert torch.equal(forward_boxes(torch.tensor([[5., 10., 25., 20.]]), p), torch.tensor([[10., 10., 50., 30.]]))
    assert torch.equal(masks_to_boxes_safe(apply_masks(mask, p)), torch.tensor([[10., 10., 50., 30.]]))


def test_apply_replica_visibility_and_drop():
    img = torch.rand(3, 50, 50)
    boxes = torch.tensor([[0., 0., 10., 10.], [20., 20., 40., 40.], [45., 0., 50., 50.]])
    masks = torch.zeros(3, 50, 50, dtype=torch.uint8)
    for j, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        masks[j, y1:y2, x1:x2] = 1
    t = {'boxes': boxes, 'labels': torch.tensor([1, 2, 1]), 'masks': masks, 'image_id': 7,
         'iscrowd': torch.zeros(3, dtype=torch.long)}
    # shift left by 8: box0 -> [-8,2]: visible 2/10 = 0.2 (dropped at 0.3); box1 fully visible; box2 -> [37, 42]
    p = ReplicaParams(src_size=(50, 50), out_size=(50, 50), tx=-8)
    _, out = apply_replica(img, t, p, min_visible=0.3)
    assert out['instance_ids'].tolist() == [1, 2]
    assert out['labels'].tolist() == [2, 1]
    assert torch.equal(out['boxes'], torch.tensor([[12., 20., 32., 40.], [37., 0., 42., 50.]]))
    assert torch.allclose(out['visible'], torch.tensor([1., 1.]))
    assert out['masks'].shape == (2, 50, 50) and out['image_id'] == 7
    # shift right by 45: box1 -> [65, 85] gone; box0 -> [45,55] visible 0.5; box2 gone
    p = ReplicaParams(src_size=(50, 50), out_size=(50, 50), tx=45)
    _, out = apply_replica(img, t, p, min_visible=0.3)
    assert out['instance_ids'].tolist() == [0]
    assert torch.allclose(out['visible'], torch.tensor([0.5]))


# ----------------------------------------------------------------------------------------------- align
def test_assign_to_gt_hand_made():
    gt = torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]])
    pred = torch.tensor([[1., 1., 10., 10.], [20., 20., 31., 30.], [50., 50., 60., 60.], [0., 0., 10., 5.]])
    # IoUs: 0.81 with gt0; 100/110 with gt1; none; 0.5 with gt0
    assert assign_to_gt(pred, gt, 0.5).tolist() == [0, 1, -1, 0]
    assert assign_to_gt(pred, gt, 0.6).tolist() == [0, 1, -1, -1]
    # an instance cut out of this replica cannot receive predictions
    assert assign_to_gt(pred, gt, 0.5, gt_keep=torch.tensor([False, True])).tolist() == [-1, 1, -1, -1]
    assert assign_to_gt(torch.zeros(0, 4), gt).shape == (0,)
    assert assign_to_gt(pred, torch.zeros(0, 4)).tolist() == [-1] * 4


def test_gt_instance_groups():
    # 2 source images x 2 replicas; image 0 has instances {0,1}, replica 1 lost instance 0 (visible 0.2)
    keep, groups, g = gt_instance_groups(
        [0, 0, 1, 1],
        [torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([], dtype=torch.long)],
        [torch.tensor([1., 0.9]), torch.tensor([0.2, 1.]), torch.tensor([1.]), torch.tensor([])],
        min_visible=0.5)
    assert keep.tolist() == [True, True, False, True, True]
    assert g == 3
    # rows kept: (img0,inst0), (img0,inst1), (img0,inst1), (img1,inst0)
    assert groups[1] == groups[2] and len({int(groups[0]), int(groups[1]), int(groups[3])}) == 3
    keep, groups, g = gt_instance_groups([0], [torch.tensor([], dtype=torch.long)])
    assert g == 0 and groups.numel() == 0
    inv, n = compact_groups(torch.tensor([7, 3, 7]))
    assert n == 2 and inv[0] == inv[2] != inv[1]


def test_greedy_match_hand_made():
    r0 = torch.tensor([[0., 0., 10., 10.], [50., 50., 70., 70.]])
    r1 = torch.tensor([[51., 50., 70., 71.], [1., 0., 10., 11.], [100., 100., 110., 110.]])
    r2 = torch.tensor([[0., 1., 10., 10.], [2., 2., 9., 9.]])  # two boxes near instance A: only one may join
    out = greedy_match([r0, r1, r2], iou_threshold=0.5)
    a, b = int(out[0][0]), int(out[0][1])
    assert out[1].tolist()[:2] == [b, a]
    assert int(out[1][2]) not in (a, b)  # unmatched -> its own cluster
    assert int(out[2][0]) == a
    assert int(out[2][1]) not in (a, b)  # same replica already in cluster a
    # scores decide the anchor: the high-score box of replica 1 anchors, replica 0 joins it
    out = greedy_match([r0[:1], r1[1:2]], [torch.tensor([0.1]), torch.tensor([0.9])], 0.5)
    assert int(out[0][0]) == int(out[1][0]) == 0
    # threshold above the IoU -> no match
    out = greedy_match([r0[:1], torch.tensor([[5., 5., 15., 15.]])], iou_threshold=0.5)  # IoU 25/175
    assert int(out[0][0]) != int(out[1][0])
    assert [o.numel() for o in greedy_match([torch.zeros(0, 4), torch.zeros(0, 4)])] == [0, 0]


# ------------------------------------------------------------------------------------------ consistency
def _tiny_model(mask=True):
    from lt_timm.detection.backbone import build_detector
    torch.manual_seed(0)
    return build_detector('maskrcnn' if mask else 'fasterrcnn', 'mobilenetv3_small_050', 2, min_size=64,
                          max_size=64, fpn_channels=32, mask_head_channels=16, box_head_dim=64,
                          rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=50, box_batch_size_per_image=32)


def _scene(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, size, size, generator=g) * 0.2
    boxes, masks = [], torch.zeros(n, size, size, dtype=torch.uint8)
    for j in range(n):
        x1, y1 = 4 + 20 * j, 6 + 8 * j
        x2, y2 = x1 + 14, y1 + 30
        boxes.append([x1, y1, x2, y2])
        masks[j, y1:y2, x1:x2] = 1
        img[:, y1:y2, x1:x2] += 0.7
    return img, {'boxes': torch.tensor(boxes, dtype=torch.float32), 'labels': torch.ones(n, dtype=torch.long),
                 'masks': masks, 'image_id': seed}


@pytest.fixture(scope='module')
def maskrcnn():
    return _tiny_model(True)


def _replicas(img, t, params):
    out = [apply_replica(img, dict(t, instance_ids=torch.arange(t['boxes'].shape[0])), p) for p in params]
    return [o[0] for o in out], [o[1] for o in out], list(params)


def _finite(losses):
    return all(bool(torch.isfinite(v)) for v in losses.values())


def test_identical_replicas_zero_consistency(maskrcnn):
    """m identical (identity) replicas: class, box and mask predictions coincide -> consistency exactly ~0."""
    img, t = _scene()
    p = ReplicaParams(src_size=(64, 64), out_size=(64, 64))
    w = InstanceLossTransform(maskrcnn, 2, rho=1.0).train()
    losses = w(*_replicas(img, t, [p, p]))
    assert set(losses) >= {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg',
                           'loss_consistency'}
    assert _finite(losses)
    assert abs(float(losses['loss_consistency'].detach())) < 1e-5
    assert w.last_parts['groups'] == 2


def test_flip_replica_consistency_hand_checked(maskrcnn):
    """Consistency of a (identity, flip) pair equals KL/box/mask terms computed by hand from the heads."""
    from lt_timm.loss import grouped_kl, log_distribution
    img, t = _scene(n=1)
    p0 = ReplicaParams(src_size=(64, 64), out_size=(64, 64))
    p1 = ReplicaParams(src_size=(64, 64), out_size=(64, 64), flip=True)
    images, targets, params = _replicas(img, t, [p0, p1])
    w = InstanceLossTransform(maskrcnn, 2, rho=2.0, box_weight=1.0, mask_weight=1.0).train()
    losses = w(images, targets, params)
    cons = float(losses['loss_consistency'].detach()) / 2.0
    # by hand: run the heads on each replica's GT box
    m = maskrcnn
    with torch.no_grad():
        il, tg = m.transform(images, [dict(x) for x in targets])
        feats = m.backbone(il.tensors)
        rois = [x['boxes'] for x in tg]
        h = m.roi_heads
        cl, reg = h.box_predictor(h.box_head(h.box_roi_pool(feats, rois, il.image_sizes)))
        kl = grouped_kl(log_distribution(cl), torch.tensor([0, 0])).mean()
        dec = h.box_coder.decode(reg, rois).reshape(2, -1, 4)[:, 1]  # class 1
        b0, b1 = dec[0].clone(), dec[1].clone()
        b1 = torch.stack([64 - b1[2], b1[1], 64 - b1[0], b1[3]])  # un-flip
        src = torch.stack([b0, b1]) / 64.
        mean = src.mean(0, keepdim=True)
        box = torch.nn.functional.smooth_l1_loss(src, mean.expand_as(src), beta=0.02, reduction='none').sum(1).mean()
        ml = h.mask_predictor(h.mask_head(h.mask_roi_pool(feats, rois, il.image_sizes)))[:, 1]
        ml = torch.stack([ml[0], ml[1].flip(-1)])
        mk = grouped_kl(log_distribution(ml, 'bernoulli'), torch.tensor([0, 0])).mean() / ml[0].numel()
    expected = float(kl + box + mk)
    assert expected > 1e-6
    assert math.isclose(cons, expected, rel_tol=1e-3, abs_tol=1e-6)
    assert math.isclose(w.last_parts['cls'], float(kl), rel_tol=1e-3, abs_tol=1e-7)
    assert math.isclose(w.last_parts['mask'], float(mk), rel_tol=1e-3, abs_tol=1e-7)
    # the weights act term by term: no box term -> class + mask only
    w2 = InstanceLossTransform(maskrcnn, 2, rho=1.0, box_weight=0.0, mask_weight=0.5).train()
    cons2 = float(w2(images, targets, params)['loss_consistency'].detach())
    assert math.isclose(cons2, float(kl + 0.5 * mk), rel_tol=1e-3, abs_tol=1e-6)
    assert w2.last_parts['box'] == 0.0


def test_consistency_gradient_flows_and_rho_zero(maskrcnn):
    img, t = _scene()
    ps = [ReplicaParams(src_size=(64, 64), out_size=(64, 64)),
          ReplicaParams(src_size=(64, 64), out_size=(64, 64), flip=True, scaled_size=(72, 72), tx=-4, ty=-4)]
    w = InstanceLossTransform(maskrcnn, 2, rho=1.0).train()
    maskrcnn.zero_grad()
    losses = w(*_replicas(img, t, ps))
    losses['loss_consistency'].backward()
    g = maskrcnn.roi_heads.box_predictor.cls_score.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    w0 = InstanceLossTransform(maskrcnn, 2, rho=0.0).train()
    losses0 = w0(*_replicas(img, t, ps))
    assert float(losses0['loss_consistency'].detach()) == 0.0 and not losses0['loss_consistency'].requires_grad
    assert w0.last_parts['cls'] > 0  # still measured for logging


def test_no_nan_edge_cases(maskrcnn):
    w = InstanceLossTransform(maskrcnn, 2, rho=1.0).train()
    img, t = _scene()
    ident = ReplicaParams(src_size=(64, 64), out_size=(64, 64))
    # 1) empty images (no instances at all)
    empty = {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.long),
             'masks': torch.zeros(0, 64, 64, dtype=torch.uint8), 'image_id': 0}
    losses = w(*_replicas(img, empty, [ident, ident]))
    assert _finite(losses) and float(losses['loss_consistency'].detach()) == 0.0
    sum(losses.values()).backward()
    # 2) a replica that loses every instance to the crop (shifted far away)
    gone = ReplicaParams(src_size=(64, 64), out_size=(64, 64), tx=63, ty=63)
    images, targets, params = _replicas(img, t, [ident, gone])
    assert targets[1]['boxes'].shape[0] == 0
    losses = w(images, targets, params)
    assert _finite(losses) and float(losses['loss_consistency'].detach()) == 0.0
    # 3) degenerate boxes (zero width / height, NaN) are dropped before torchvision sees them
    images, targets, params = _replicas(img, t, [ident, ident])
    for x in targets:
        x['boxes'] = torch.cat([x['boxes'], torch.tensor([[5., 5., 5., 20.], [float('nan'), 0., 3., 3.]])])
        x['labels'] = torch.cat([x['labels'], torch.tensor([1, 1])])
        x['masks'] = torch.cat([x['masks'], torch.zeros(2, 64, 64, dtype=torch.uint8)])
        x['instance_ids'] = torch.cat([x['instance_ids'], torch.tensor([5, 6])])
        x['visible'] = torch.cat([x['visible'], torch.ones(2)])
    losses = w(images, targets, params)
    assert _finite(losses)
    assert w.last_parts['groups'] == 2
    # 4) batch not divisible by m, single replica groups -> zero term
    w3 = InstanceLossTransform(maskrcnn, 3, rho=1.0).train()
    images, targets, params = _replicas(img, t, [ident])
    losses = w3(images, targets, params)
    assert _finite(losses) and float(losses['loss_consistency'].detach()) == 0.0


def test_sanitize_targets():
    t = {'boxes': torch.tensor([[0., 0., 5., 5.], [3., 3., 3., 9.]]), 'labels': torch.tensor([1, 2]),
         'image_id': torch.tensor([4, 4])}
    out = sanitize_targets([t])[0]
    assert out['boxes'].tolist() == [[0., 0., 5., 5.]] and out['labels'].tolist() == [1]
    assert out['image_id'].tolist() == [4, 4]


def test_fasterrcnn_and_eval_mode():
    m = _tiny_model(mask=False)
    w = InstanceLossTransform(m, 2, rho=1.0).train()
    img, t = _scene()
    t.pop('masks')
    ps = [ReplicaParams(src_size=(64, 64), out_size=(64, 64)),
          ReplicaParams(src_size=(64, 64), out_size=(64, 64), flip=True)]
    losses = w(*_replicas(img, t, ps))
    assert _finite(losses) and 'loss_mask' not in losses and float(losses['loss_consistency'].detach()) > 0
    assert w.last_parts['mask'] == 0.0
    w.eval()
    out = w([img])
    assert isinstance(out, list) and set(out[0]) >= {'boxes', 'scores', 'labels'}


# ------------------------------------------------------------------------------------------- backbone
def test_timm_fpn_backbone():
    from lt_timm.detection.backbone import TimmFPNBackbone, build_detector
    bb = TimmFPNBackbone('resnet18', out_channels=32)
    feats = bb(torch.rand(1, 3, 64, 64))
    assert list(feats) == ['0', '1', '2', '3', 'pool'] and bb.out_channels == 32
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    m = build_detector('fasterrcnn', 'resnet18', 3, min_size=64, max_size=64, fpn_channels=32)
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 64, 64)])
    assert 'boxes' in out[0]
    with pytest.raises(ValueError, match='--model'):
        build_detector('ssd', 'resnet18')
    # narrow RoI heads for CPU runs
    m = build_detector('maskrcnn', 'resnet18', 2, min_size=64, max_size=64, fpn_channels=16,
                       mask_head_channels=8, box_head_dim=24)
    assert m.roi_heads.box_predictor.cls_score.in_features == 24
    assert m.roi_heads.box_predictor.cls_score.out_features == 2
    assert m.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 2
    assert m.roi_heads.mask_head[0][0].out_channels == 8
    # anchors: one size per level, scaled with the input size
    assert m.rpn.anchor_generator.sizes == ((8,), (8,), (8,), (12,), (25,))


def test_torchvision_backbones():
    from lt_timm.detection.backbone import build_backbone
    bb = build_backbone('tv_shufflenet_v2_x0_5')
    feats = bb(torch.rand(1, 3, 64, 64))
    assert list(feats) == ['0', '1', '2', 'pool'] and bb.out_channels == 256 and bb.num_levels == 3
    assert [f.shape[-1] for f in feats.values()] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match='tv_'):
        build_backbone('tv_nonexistent')
    from lt_timm.detection.backbone import build_detector
    m = build_detector('fasterrcnn', 'tv_shufflenet_v2_x0_5', 2, min_size=800, max_size=1333)
    assert m.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),) * 4  # < 5 levels: all sizes everywhere
    assert m.rpn.head.cls_logits.out_channels == 15


# ------------------------------------------------------------------------------------------------ data
def write_pennfudan(root, n=3):
    from PIL import Image
    os.makedirs(os.path.join(root, 'PNGImages'))
    os.makedirs(os.path.join(root, 'PedMasks'))
    for i in range(n):
        img = np.full((40, 50, 3), 30 * i, dtype=np.uint8)
        mask = np.zeros((40, 50), dtype=np.uint8)
        mask[5:15, 2:10] = 1
        if i:
            mask[20:35, 30:45] = 2
        Image.fromarray(img).save(os.path.join(root, 'PNGImages', f'img{i:03d}.png'))
        Image.fromarray(mask).save(os.path.join(root, 'PedMasks', f'img{i:03d}_mask.png'))


def test_pennfudan_dataset(tmp_path):
    root = str(tmp_path / 'PennFudanPed')
    write_pennfudan(root)
    ds = PennFudanDataset(root)
    assert len(ds) == 3
    img, t = ds[1]
    assert img.shape == (3, 40, 50) and img.dtype == torch.float32
    assert t['boxes'].tolist() == [[2., 5., 10., 15.], [30., 20., 45., 35.]]
    assert t['labels'].tolist() == [1, 1] and t['masks'].shape == (2, 40, 50)
    assert int(t['masks'][1].sum()) == 15 * 15
    ds2 = PennFudanDataset(root, img_size=25)  # halve
    img, t = ds2[1]
    assert img.shape == (3, 20, 25)
    assert torch.allclose(t['boxes'], torch.tensor([[1., 2.5, 5., 7.5], [15., 10., 22.5, 17.5]]))
    with pytest.raises(FileNotFoundError, match='nope'):
        PennFudanDataset(str(tmp_path / 'nope'))
    os.remove(os.path.join(root, 'PedMasks', 'img002_mask.png'))
    with pytest.raises(FileNotFoundError, match='img002_mask.png'):
        PennFudanDataset(root)


def test_replica_dataset_and_collate(tmp_path):
    root = str(tmp_path / 'PennFudanPed')
    write_pennfudan(root, 4)
    ds = ReplicaDataset(PennFudanDataset(root), 3, ReplicaAugment(), seed=1)
    images, targets, params = replica_collate([ds[0], ds[1]])
    assert len(images) == 6 and len(params) == 6
    groups = replica_groups(6, 3).tolist()
    for r, t in enumerate(targets):
        # each replica's boxes map back to its source image's boxes (instances it kept, fully visible ones exact)
        src = ds.base[ds.indices[groups[r]]][1]['boxes']
        full = t['visible'] >= 1 - 1e-6
        back = invert_boxes(t['boxes'][full], params[r])
        assert torch.allclose(back, src[t['instance_ids'][full]], atol=1e-4)
    # deterministic per (seed, epoch, index); changes with the epoch
    a = ds[0][0][2]
    assert ds[0][0][2] == a
    ds.set_epoch(1)
    assert [x[2] for x in ds[0]] != [x[2] for x in (ReplicaDataset(ds.base, 3, ReplicaAugment(), seed=1)[0])]
    tr, va = split_indices(10, 3, 0)
    assert len(tr) == 7 and len(va) == 3 and sorted(tr + va) == list(range(10))


def test_coco_dataset_and_eval(tmp_path):
    """COCO-format loading and COCOeval: perfect predictions give AP 100, shifted ones give less."""
    from PIL import Image
    from lt_timm.detection.data import CocoDetectionDataset
    from lt_timm.detection.evaluate import coco_ap, coco_from_dataset, predictions_to_coco
    img_dir = tmp_path / 'imgs'
    img_dir.mkdir()
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(img_dir / 'a.png')
    ann = {'images': [{'id': 5, 'file_name': 'a.png', 'height': 40, 'width': 60}],
           'categories': [{'id': 3, 'name': 'cat'}, {'id': 9, 'name': 'dog'}],
           'annotations': [
               {'id': 1, 'image_id': 5, 'category_id': 9, 'bbox': [10, 5, 20, 20], 'area': 400, 'iscrowd': 0,
                'segmentation': [[10, 5, 30, 5, 30, 25, 10, 25]]},
               {'id': 2, 'image_id': 5, 'category_id': 3, 'bbox': [40, 10, 10, 20], 'area': 200, 'iscrowd': 0,
                'segmentation': [[40, 10, 50, 10, 50, 30, 40, 30]]}]}
    ann_file = tmp_path / 'inst.json'
    ann_file.write_text(json.dumps(ann))
    ds = CocoDetectionDataset(str(img_dir), str(ann_file))
    img, t = ds[0]
    assert ds.num_classes == 3 and t['labels'].tolist() == [2, 1]
    assert t['boxes'].tolist() == [[10., 5., 30., 25.], [40., 10., 50., 30.]]
    gt = coco_from_dataset(ds)
    out = {'boxes': t['boxes'], 'scores': torch.tensor([0.9, 0.8]), 'labels': t['labels'],
           'masks': t['masks'][:, None].float()}
    res = predictions_to_coco(5, out)
    assert coco_ap(gt, res, 'bbox') == pytest.approx({'AP': 1.0, 'AP50': 1.0, 'AP75': 1.0})
    assert coco_ap(gt, res, 'segm')['AP'] == pytest.approx(1.0)
    # box 0 shifted by 6 px: IoU = 14*20/(2*400-280) = 0.538 -> counts at .5 only, class 2 AP50 = 1, AP75 = 0
    out['boxes'] = t['boxes'] + torch.tensor([[6., 0., 6., 0.], [0., 0., 0., 0.]])
    r = coco_ap(gt, predictions_to_coco(5, out), 'bbox')
    assert r['AP50'] == pytest.approx(1.0) and r['AP75'] == pytest.approx(0.5)
    assert coco_ap(gt, [], 'bbox') == {'AP': 0.0, 'AP50': 0.0, 'AP75': 0.0}
    with pytest.raises(FileNotFoundError, match='missing.json'):
        CocoDetectionDataset(str(img_dir), str(tmp_path / 'missing.json'))


# ----------------------------------------------------------------------------------------- entry point
TINY_CFG = ('model: maskrcnn\nbackbone: mobilenetv3_small_050\nfpn_channels: 32\nmask_head_channels: 16\n'
            'box_head_dim: 64\nloss: losstransform\naug_repeats: 2\n'
            'batch_size: 4\nimg_size: 64\nlr_steps: [1]\nwarmup_iters: 1\nval_size: 2\n'
            'rpn_pre_nms: 50\nrpn_post_nms: 50\nbox_batch_per_image: 32\nlog_interval: 1\nthreads: 1\n')


def test_train_entry_point_end_to_end(tmp_path):
    """One tiny epoch (config YAML, logging, summary.csv in timm's column order, curves, atomic checkpoint), then
    --resume continues the same folder; a new run with the same name never overwrites it."""
    root = str(tmp_path / 'PennFudanPed')
    write_pennfudan(root, 5)
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(TINY_CFG + 'lt_epoch: full\n')  # 3 training images: v1 would have 3 rows, less than -b 4
    out = tmp_path / 'out'
    cmd = [sys.executable, os.path.join(REPO, 'train_detection.py'), '-c', str(cfg), '--data-dir', root,
           '--output', str(out), '--experiment', 'run']
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(cmd + ['--epochs', '1'], capture_output=True, text=True, env=env, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert 'Train: 0 [' in log and 'Eval:' in log and 'mode full, 1 batches/epoch' in log
    run = out / 'run'
    rows = list(csv.DictReader(open(run / 'summary.csv')))
    assert [row['epoch'] for row in rows] == ['0']
    assert {'eval_box_AP', 'eval_mask_AP', 'train_loss', 'train_loss_base', 'train_loss_consistency',
            'train_consistency', 'lr'} <= set(rows[0])
    header = list(rows[0])  # timm's order: epoch, train_*, eval_*, lr
    kinds = [k.split('_')[0] for k in header]
    assert kinds == sorted(kinds, key=['epoch', 'train', 'eval', 'lr'].index), header
    assert (run / 'curves.png').stat().st_size > 0 and (run / 'last.pth.tar').exists()
    assert sorted(os.listdir(run)) == ['args.yaml', 'curves.png', 'last.pth.tar', 'summary.csv']  # no tmp, no lock
    ck = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert ck['epoch'] == 0 and {'state_dict', 'optimizer', 'args'} <= set(ck)
    # resume: the run folder is taken from the checkpoint, epoch 1 continues the schedule
    r = subprocess.run([sys.executable, os.path.join(REPO, 'train_detection.py'), '-c', str(cfg), '--data-dir', root,
                        '--epochs', '2', '--resume', str(run / 'last.pth.tar')],
                       capture_output=True, text=True, env=env, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert 'continuing at epoch 1' in log
    rows = list(csv.DictReader(open(run / 'summary.csv')))
    assert [row['epoch'] for row in rows] == ['0', '1']
    assert float(rows[1]['lr']) == pytest.approx(0.002)  # lr-steps [1], gamma 0.1, base 0.02
    assert torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=False)['epoch'] == 1
    # the same --experiment again without --resume: a new folder, the first run untouched
    r = subprocess.run(cmd + ['--epochs', '0'], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (out / 'run-1' / 'args.yaml').exists() and len(list(csv.DictReader(open(run / 'summary.csv')))) == 2


def test_train_torchrun_two_processes_gloo(tmp_path):
    """DDP under torchrun (gloo, CPU): each rank trains its share of the images, rank 0 evaluates and writes."""
    root = str(tmp_path / 'PennFudanPed')
    write_pennfudan(root, 6)
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(TINY_CFG + 'lt_epoch: full\n')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        os.path.join(REPO, 'train_detection.py'), '-c', str(cfg), '--data-dir', root, '--epochs', '1',
                        '--device', 'cpu', '--output', str(tmp_path / 'out'), '--experiment', 'ddp'],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert 'process 1/2' in log and 'per rank x 2 ranks' in log and 'Eval:' in log
    rows = list(csv.DictReader(open(tmp_path / 'out' / 'ddp' / 'summary.csv')))
    assert len(rows) == 1 and float(rows[0]['train_loss_consistency']) >= 0
    assert sorted(os.listdir(tmp_path / 'out')) == ['ddp']


def _main_exit(argv, capsys):
    from lt_timm.cli.detection import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_train_user_errors(tmp_path, capsys):
    """Clear errors, exit 2, nothing written: missing data, too few images for a batch (the former unbound-lr
    crash), missing / corrupt --resume checkpoint, no validation image."""
    out = tmp_path / 'out'
    err = _main_exit(['--data-dir', str(tmp_path / 'no_such_dir'), '--output', str(out)], capsys)
    assert 'no_such_dir' in err and '--data-dir' in err
    root = str(tmp_path / 'PennFudanPed')
    write_pennfudan(root, 5)
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(TINY_CFG)
    base = ['-c', str(cfg), '--data-dir', root, '--output', str(out), '--epochs', '1']
    err = _main_exit(base, capsys)  # 3 training images, v1: 3 rows per epoch < -b 4
    assert 'too few for one batch' in err and '-b/--batch-size' in err
    err = _main_exit(base + ['--lt-epoch', 'full', '--resume', str(tmp_path / 'nope.pth.tar')], capsys)
    assert 'nope.pth.tar not found' in err
    bad = tmp_path / 'bad.pth.tar'
    bad.write_bytes(b'not a checkpoint')
    err = _main_exit(base + ['--lt-epoch', 'full', '--resume', str(bad)], capsys)
    assert 'bad.pth.tar' in err and 'not a readable PyTorch file' in err
    err = _main_exit(base + ['--val-size', '0'], capsys)
    assert 'no validation images' in err
    err = _main_exit(base + ['--val-size', '7'], capsys)
    assert '--val-size 7' in err
    assert not out.exists() or not os.listdir(out)


def test_block_batches_v1_and_full(tmp_path):
    """-b rows per batch in the layout of lt_timm.layout (short blocks too); v1 = N rows per epoch, full = m N."""
    from dataclasses import replace
    from lt_timm.config import DetectionBatchOptions
    from lt_timm.detection.data import BlockBatchSampler
    from lt_timm.detection.train import build_sampler
    from lt_timm.errors import UserError
    root = str(tmp_path / 'PennFudanPed')
    write_pennfudan(root, 6)
    batch = DetectionBatchOptions(batch_size=4, aug_repeats=2, lt_epoch='v1', seed=0)
    assert len(build_sampler(batch, 6)) == 1  # 6 rows -> 1 batch of 4 rows (2 images x 2)
    batch = replace(batch, lt_epoch='full')
    assert len(build_sampler(batch, 6)) == 3  # 12 rows -> 3 batches
    batch = replace(batch, batch_size=8, aug_repeats=3)  # blocks [3, 2, 3]: the short block in the middle
    bs = BlockBatchSampler(build_sampler(batch, 6))
    batches = list(bs)
    assert len(batches) == 2 and [[c for _, c in b] for b in batches] == [[3, 2, 3]] * 2
    ds = ReplicaDataset(PennFudanDataset(root), 3, ReplicaAugment(), seed=0)
    images, targets, params = replica_collate([ds[item] for item in batches[0]])
    assert len(images) == 8 and replica_groups(8, 3).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert params[0] != params[1]  # replicas independently augmented
    # DDP ranks get disjoint images, same number of batches
    batch = replace(batch, batch_size=2, aug_repeats=2, lt_epoch='full')
    r0, r1 = build_sampler(batch, 6, 2, 0), build_sampler(batch, 6, 2, 1)
    seen0 = {i for b in r0 for i in b}
    seen1 = {i for b in r1 for i in b}
    assert len(r0) == len(r1) == 3 and not seen0 & seen1
    batch = replace(batch, batch_size=4)
    with pytest.raises(UserError, match='too few') as full:  # already --lt-epoch full: no advice to set it
        build_sampler(batch, 1)
    assert '--lt-epoch full' not in str(full.value)
    with pytest.raises(UserError, match=r'too few.*or --lt-epoch full'):
        build_sampler(replace(batch, lt_epoch='v1'), 1)


def test_detection_configs_parse():
    """Every recipe in configs/detection parses (keys are argument dests), names a buildable combination and passes
    train_detection's checks (matching mode vs model; the COCO detector's fixed flags; no weights are loaded)."""
    import glob
    from lt_timm.cli.checks import check_match_args
    from lt_timm.cli.detection import parse_args
    from lt_timm.detection.finetune import (COCO_FIXED_FLAGS, check_coco_detector_args, dataset_label_space,
                                            uses_coco_detector)
    files = sorted(glob.glob(os.path.join(REPO, 'configs', 'detection', '*.yaml')))
    assert len(files) >= 21
    seen = set()
    for f in files:
        a = parse_args(['-c', f, '--data-dir', '/nonexistent'])
        assert a.model in ('maskrcnn', 'fasterrcnn', 'retinanet') and a.loss in ('multi', 'losstransform')
        check_match_args(a.model, a.lt_match, a.lt_match_iou, a.lt_area_ratio)
        coco = uses_coco_detector(a.detector_weights, a.detector_checkpoint)
        if coco:
            check_coco_detector_args(a.model, a.backbone, a.pretrained, a.detector_checkpoint,
                                     {k: getattr(a, k) for k in COCO_FIXED_FLAGS})
        dataset_label_space(a.dataset, coco, a.reset_predictors)
        seen.add((a.dataset, a.model, a.backbone, a.loss))
    for model, bb in (('fasterrcnn', 'tv_resnet50'), ('fasterrcnn', 'tv_mobilenet_v3_large'),
                      ('retinanet', 'tv_resnet50')):  # Table 6: torchvision's COCO detectors
        for loss in ('multi', 'losstransform'):
            assert ('coco', model, bb, loss) in seen
    for loss in ('multi', 'losstransform'):  # Table 4's backbones are checked in test_detection_paper.py
        assert ('pennfudan', 'maskrcnn', 'tv_resnet50', loss) in seen
    with pytest.raises(SystemExit):
        parse_args(['--data-dir', 'x', '--loss', 'jsd'])


def test_detection_config_is_the_resolved_flags():
    """What the run reads (lt_timm.config.DetectionConfig, built by the resolve step): every field of every option
    group is the flag of that name (lists as tuples), the derived fields follow the flags, ``record`` is the flags in
    the parser's order (args.yaml), and a checkpoint's ``args`` is a Namespace of the flags then the extras (the
    format older runs saved, which --resume reads back); the settings are frozen."""
    import argparse
    import dataclasses
    import glob
    from lt_timm.cli.detection import detection_config, parse_args
    files = sorted(glob.glob(os.path.join(REPO, 'configs', 'detection', '*.yaml')))
    checked = set()
    for f in files:
        a = parse_args(['-c', f, '--data-dir', '/nonexistent', '--freeze', 'rpn', '--anchor-sizes', '32,64', '128'])
        cfg = detection_config(a, coco_detector=True, label_space='coco_ids')
        for group in (cfg.data, cfg.detector, cfg.loss, cfg.batch, cfg.augment, cfg.schedule, cfg.run):
            for field in dataclasses.fields(group):
                if hasattr(a, field.name):
                    want = getattr(a, field.name)
                    assert getattr(group, field.name) == (tuple(want) if isinstance(want, list) else want), field
                    checked.add(field.name)
        assert cfg.detector.freeze == ('rpn',) and cfg.detector.anchor_sizes == ((32, 64), 128)
        assert cfg.data.masks == (a.model == 'maskrcnn') and cfg.data.label_space == 'coco_ids'
        assert cfg.detector.coco_detector and cfg.device == a.device and cfg.seed == a.seed
        assert cfg.loss.rho == (a.lt_rho if a.loss == 'losstransform' else 0.0)
        assert list(cfg.record.items()) == list(vars(a).items())
        saved = cfg.saved_args(train_images=3, world_size=2)
        assert type(saved) is argparse.Namespace
        assert list(vars(saved).items()) == list(vars(a).items()) + [('train_images', 3), ('world_size', 2)]
    assert len(checked) >= 60  # (nearly) every flag reaches the run through a typed field
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.schedule.lr = 1.0
