"""Issue 23: the paper's detection setup as written — Table 4's nine torchvision backbones with their FPNs and
anchors, random crop and simple copy-paste with exact inverses, the PASCAL VOC instance split, section 3.2's matchings
(Resort, area-ratio replica test + greedy) and Table 6's MobileNetV3-L FPN COCO detector.

Nothing is downloaded: every model is built with ``weights=None``; images are tiny and generated.
"""
import os
from collections import deque

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from lt_timm.detection.align import greedy_match_rows, replica_area_pairs, resort_rows
from lt_timm.detection.backbone import (TABLE4_BACKBONES, TABLE4_FPN, anchor_generator_sizes, build_backbone,
                                        build_detector, tv_feature_layers)
from lt_timm.detection.consistency import InstanceLossTransform
from lt_timm.detection.copy_paste import PASTED_ID, CopyPaste, paste_instances, place_donor
from lt_timm.detection.data import ReplicaDataset, masks_to_boxes_safe
from lt_timm.detection.transforms import (ReplicaAugment, ReplicaParams, apply_image, apply_masks, apply_replica,
                                          forward_boxes, invert_boxes, invert_masks, sample_crop_params)
from lt_timm.detection.voc import (VOC_CLASSES, VOCInstanceDataset, object_instances, read_index_png,
                                   read_voc_annotation, split_instances)
from lt_timm.layout import replica_groups

pytestmark = pytest.mark.usefixtures('one_thread')


# -------------------------------------------------------------------------------------------- Table 4 backbones
def _pair(size=(96, 80)):
    """Two replicas (one flipped) of a scene with one object: images and targets."""
    h, w = size
    img = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 0.3
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, 10:80, 12:44] = 1
    img[:, 10:80, 12:44] += 0.6
    t = {'boxes': torch.tensor([[12., 10., 44., 80.]]), 'labels': torch.tensor([1]), 'masks': masks,
         'instance_ids': torch.tensor([0]), 'visible': torch.ones(1)}
    p = [ReplicaParams(src_size=size, out_size=size), ReplicaParams(src_size=size, out_size=size, flip=True)]
    reps = [apply_replica(img, t, q) for q in p]
    return [r[0] for r in reps], [r[1] for r in reps], p


@pytest.mark.parametrize('name', sorted(TABLE4_BACKBONES))
def test_table4_backbone_builds_and_trains_from_scratch(name):
    """Each backbone of Table 4 is torchvision's ImageNet architecture (same parameter names and shapes as
    ``torchvision.models.get_model(name)`` for every layer it keeps), with the paper's FPN levels and anchors, and
    one T(l_multi) training step from scratch on a tiny image pair gives a finite loss and gradients in the body."""
    import torchvision.models as tvm
    lr, fpn = TABLE4_BACKBONES[name]
    assert lr in (0.01, 0.0025)
    torch.manual_seed(0)
    model = build_detector('maskrcnn', name, 2, min_size=96, max_size=96, anchor_sizes=fpn.anchor_sizes,
                           fpn_strides=fpn.strides, fpn_extra=fpn.extra, box_head_dim=64, mask_head_channels=16,
                           rpn_pre_nms_top_n_train=40, rpn_post_nms_top_n_train=40, box_batch_size_per_image=16)
    assert model.rpn.anchor_generator.sizes == tuple(fpn.anchor_sizes)
    body = model.backbone.body
    kwargs, stages, _ = tv_feature_layers(name[3:])
    ref = tvm.get_model(name[3:], weights=None, **kwargs)
    ref = getattr(ref, stages) if stages else ref
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in body.state_dict().items()}
    assert mine and all(ref_shapes.get(k) == s for k, s in mine.items())
    images, targets, params = _pair()
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 96, 96))
    assert len(feats) == len(fpn.anchor_sizes) == (5 if fpn.extra == 'pool' else 2)
    net = InstanceLossTransform(model, 2, rho=1.0)
    net.train()
    losses = net(images, targets, params)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in body.parameters())


def test_table4_settings_are_the_papers():
    """Quoted in section 4.1.6: lrs, and the two anchor settings with the backbones that use them."""
    five = {'tv_densenet121', 'tv_googlenet', 'tv_resnet50', 'tv_wide_resnet50_2'}
    two = {'tv_convnext_tiny', 'tv_efficientnet_b4', 'tv_inception_v3', 'tv_mnasnet1_0', 'tv_shufflenet_v2_x1_0'}
    assert set(TABLE4_BACKBONES) == five | two
    for name, (lr, fpn) in TABLE4_BACKBONES.items():
        assert fpn == TABLE4_FPN['five_levels' if name in five else 'two_levels']
        assert lr == (0.0025 if name in {'tv_convnext_tiny', 'tv_inception_v3', 'tv_mnasnet1_0'} else 0.01)
    assert TABLE4_FPN['five_levels'].anchor_sizes == ((32,), (64,), (128,), (256,), (512,))
    assert TABLE4_FPN['two_levels'].anchor_sizes == ((32, 64, 128, 256, 512),) * 2


def test_anchor_sizes_and_fpn_levels():
    assert anchor_generator_sizes([8, (16, 32)], 2, 800) == ((8,), (16, 32))
    assert anchor_generator_sizes(None, 5, 1333) == ((32,), (64,), (128,), (256,), (512,))
    assert anchor_generator_sizes(None, 2, 1333) == ((32, 64, 128, 256, 512),) * 2
    with pytest.raises(ValueError, match='need 2 anchor size entries'):
        anchor_generator_sizes([32, 64, 128], 2, 800)
    with pytest.raises(ValueError, match='positive'):
        anchor_generator_sizes([(32, 0), (64,)], 2, 800)
    bb = build_backbone('tv_mnasnet0_5', strides=(16, 32), extra='none', out_channels=16)
    out = bb(torch.rand(1, 3, 64, 64))
    assert list(out) == ['0', '1'] and [o.shape[-1] for o in out.values()] == [4, 2] and bb.num_extra == 0
    with pytest.raises(ValueError, match='strides'):
        build_backbone('tv_mnasnet0_5', strides=(2, 32))
    with pytest.raises(ValueError, match='unknown torchvision backbone'):
        build_backbone('tv_vgg16')


# ------------------------------------------------------------------------------------------------ random crop
def test_random_crop_inverts_exactly_on_boxes_and_masks():
    """Over random sizes, crops and flips: the crop is a slice of the (flipped) source; boxes map back exactly;
    masks map back to the source masks inside the window (0 outside)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        h, w = int(torch.randint(20, 90, (), generator=g)), int(torch.randint(20, 90, (), generator=g))
        p = sample_crop_params((h, w), 0.5, (0.3, 1.0), generator=g)
        ch, cw = p.out_size
        assert p.scaled_size is None and -p.tx + cw <= w and -p.ty + ch <= h and p.tx <= 0 and p.ty <= 0
        img = torch.rand(3, h, w, generator=g)
        src = img.flip(-1) if p.flip else img
        assert torch.equal(apply_image(img, p), src[:, -p.ty:-p.ty + ch, -p.tx:-p.tx + cw])
        xy = torch.randint(0, min(h, w) // 2, (6, 2), generator=g).float()
        b = torch.cat([xy, xy + torch.randint(1, min(h, w) // 2, (6, 2), generator=g).float()], dim=1)
        assert torch.equal(invert_boxes(forward_boxes(b, p), p), b)
        masks = (torch.rand(4, h, w, generator=g) > 0.6).to(torch.uint8)
        back = invert_masks(apply_masks(masks, p).float(), p, mode='nearest').to(torch.uint8)
        window = torch.zeros(h, w, dtype=torch.bool)
        x0 = w - (-p.tx + cw) if p.flip else -p.tx  # the window in the unflipped source
        window[-p.ty:-p.ty + ch, x0:x0 + cw] = True
        assert torch.equal(back, masks * window)


def test_crop_augment_drops_cut_instances_and_checks_flags():
    img = torch.rand(3, 40, 40)
    masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    masks[0, 0:10, 0:10] = 1
    masks[1, 20:40, 20:40] = 1
    t = {'boxes': masks_to_boxes_safe(masks), 'labels': torch.tensor([1, 1]), 'masks': masks}
    p = ReplicaParams(src_size=(40, 40), out_size=(25, 25), tx=-8, ty=-8)  # window [8, 33)^2
    out_img, out = apply_replica(img, t, p, min_visible=0.3)
    assert out_img.shape == (3, 25, 25) and out['instance_ids'].tolist() == [1]
    assert torch.allclose(out['visible'], torch.tensor([13 * 13 / 400.]))
    assert torch.equal(out['boxes'], masks_to_boxes_safe(out['masks']))
    with pytest.raises(ValueError, match='replaces scale'):
        ReplicaAugment(0.5, (0.8, 1.2), 0.1, crop_scale=(0.5, 1.0))
    with pytest.raises(ValueError, match='crop scale'):
        ReplicaAugment(0.5, (1, 1), 0.0, crop_scale=(0.0, 1.0))


# ------------------------------------------------------------------------------------------------ copy-paste
def _scene(h=48, w=64):
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    masks[0, 4:20, 4:20] = 1      # will be fully covered
    masks[1, 10:40, 30:50] = 1    # partly covered
    masks[2, 30:46, 2:14] = 1     # untouched
    img = torch.rand(3, h, w, generator=torch.Generator().manual_seed(1))
    t = {'boxes': masks_to_boxes_safe(masks) + torch.tensor([[0., 0., 0., 0.], [0, 0, 0, 0], [-1, -1, 1, 1]]),
         'labels': torch.tensor([1, 2, 1]), 'masks': masks, 'instance_ids': torch.arange(3),
         'iscrowd': torch.zeros(3, dtype=torch.long), 'image_id': 5}
    return img, t


def test_paste_instances_updates_target_exactly():
    img, t = _scene()
    paste = torch.zeros(2, 48, 64, dtype=torch.uint8)
    paste[0, 2:22, 2:40] = 1
    paste[1, 40:44, 40:60] = 1
    pimg = torch.rand(3, 48, 64)
    out_img, out = paste_instances(img, t, pimg, paste, torch.tensor([2, 1]), min_visible=0.3)
    alpha = paste.bool().any(0)
    assert torch.equal(out_img, torch.where(alpha, pimg, img))
    assert out['instance_ids'].tolist() == [1, 2, PASTED_ID, PASTED_ID]  # instance 0 fully covered: dropped
    kept1 = t['masks'][1].bool() & ~alpha
    assert torch.equal(out['masks'][0].bool(), kept1) and torch.equal(out['masks'][1], t['masks'][2])
    assert torch.equal(out['boxes'][0], masks_to_boxes_safe(kept1[None].to(torch.uint8))[0])  # recomputed
    assert torch.equal(out['boxes'][1], t['boxes'][2])  # untouched: its own box kept, not the mask's
    assert torch.equal(out['boxes'][2:], masks_to_boxes_safe(paste))
    assert torch.allclose(out['visible'], torch.tensor([kept1.sum() / 600., 1., 1., 1.]))
    assert out['labels'].tolist() == [2, 1, 2, 1] and out['iscrowd'].tolist() == [0] * 4 and out['image_id'] == 5


def test_copy_paste_then_crop_inverts_to_the_pasted_frame():
    """Copy-paste (source frame) then flip + crop: the replica's boxes of every instance the crop did not cut map
    back exactly to the copy-paste-frame boxes, masks map back exactly inside the window, pasted objects keep
    negative ids and their recorded boxes are where they were pasted."""
    g = torch.Generator().manual_seed(3)
    cp = CopyPaste(prob=1.0, scale_range=(0.6, 1.2))
    aug = ReplicaAugment(0.5, (1, 1), 0.0, min_visible=0.0, crop_scale=(0.6, 1.0))
    seen_pasted = 0
    for _ in range(30):
        img, t = _scene()
        dimg, dt = _scene()
        pimg, pt, pasted = cp(img, dict(t), dimg.flip(-1), dt, generator=g)
        seen_pasted += len(pasted)
        assert torch.equal(torch.tensor(pasted).reshape(-1, 4), pt['boxes'][pt['instance_ids'] == PASTED_ID])
        rimg, rt, p = aug(pimg, dict(pt), generator=g, pasted=pasted)
        assert p.pasted == tuple(tuple(b) for b in pasted)
        keep, before = rt['instance_ids'], pt.get('visible', torch.ones(len(pt['boxes'])))
        rows = [int((pt['instance_ids'] == i).nonzero()[0]) if i >= 0 else None for i in keep.tolist()]
        for j, r in enumerate(rows):
            if r is None or rt['visible'][j] < before[r] - 1e-6:  # pasted (several ids) or cut by the crop
                continue
            assert torch.equal(invert_boxes(rt['boxes'][j:j + 1], p), pt['boxes'][r:r + 1])
        back = invert_masks(rt['masks'].float(), p, mode='nearest').to(torch.uint8)
        src_rows = [r for r in rows if r is not None]
        window = invert_masks(torch.ones(1, *p.out_size), p, mode='nearest')[0].bool()
        assert torch.equal(back[[j for j, r in enumerate(rows) if r is not None]], pt['masks'][src_rows] * window)
    assert seen_pasted > 10


def test_place_donor_and_copy_paste_validation():
    dimg, dmasks = torch.rand(3, 10, 20), torch.zeros(1, 10, 20, dtype=torch.uint8)
    dmasks[0, 2:6, 3:9] = 1
    img, m = place_donor(dimg, dmasks, (30, 30), True, 2.0, (-4, 5))
    assert img.shape == (3, 30, 30) and m.shape == (1, 30, 30)
    assert torch.equal(masks_to_boxes_safe(m), torch.tensor([[(20 - 9) * 2 - 4., 2 * 2 + 5., (20 - 3) * 2 - 4., 17]]))
    with pytest.raises(ValueError, match='probability'):
        CopyPaste(prob=1.5)
    with pytest.raises(ValueError, match='masks'):
        CopyPaste(prob=1.0)(torch.rand(3, 8, 8), {'boxes': torch.zeros(0, 4)}, dimg, {'boxes': torch.zeros(0, 4)})


class _Scenes(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        img, t = _scene()
        t = {k: v for k, v in t.items() if k != 'instance_ids'}
        return img.roll(i, -1), dict(t, image_id=i)


def test_replica_dataset_with_copy_paste_is_seeded():
    ds = ReplicaDataset(_Scenes(), 3, ReplicaAugment(0.5, (1, 1), 0.0, crop_scale=(0.7, 1.0)), seed=1,
                        copy_paste=CopyPaste(prob=1.0))
    a, b = ds[2], ds[2]
    for (ia, ta, pa), (ib, tb, pb) in zip(a, b):
        assert torch.equal(ia, ib) and pa == pb and torch.equal(ta['boxes'], tb['boxes'])
    assert any(p.pasted for _, _, p in a)
    assert all(int(t['instance_ids'].min()) == PASTED_ID for _, t, p in a if p.pasted)
    with pytest.raises(ValueError, match='augment'):
        ReplicaDataset(_Scenes(), 2, None, copy_paste=CopyPaste())


# ----------------------------------------------------------------------------------------------------- VOC
def _components_reference(mask, connectivity):
    """Flood fill per class, raster order of the first pixel (an independent, slow reference)."""
    h, w = mask.shape
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if connectivity == 8 else [])
    out = []
    for c in sorted(set(mask.flatten().tolist()) - {0, 255}):
        seen = np.zeros_like(mask, dtype=bool)
        for y in range(h):
            for x in range(w):
                if mask[y, x] != c or seen[y, x]:
                    continue
                comp, todo = np.zeros_like(seen), deque([(y, x)])
                seen[y, x] = True
                while todo:
                    cy, cx = todo.popleft()
                    comp[cy, cx] = True
                    for dy, dx in steps:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and mask[ny, nx] == c:
                            seen[ny, nx] = True
                            todo.append((ny, nx))
                out.append((c, comp))
    return out


@pytest.mark.parametrize('connectivity', [4, 8])
def test_voc_instance_split_matches_flood_fill(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(25):
        shape = (int(rng.integers(3, 14)), int(rng.integers(3, 14)))
        mask = rng.choice([0, 0, 3, 15, 255], size=shape).astype(np.uint8)
        masks, labels = split_instances(mask, connectivity)
        ref = _components_reference(mask, connectivity)
        assert labels.tolist() == [c for c, _ in ref]
        assert masks.shape[0] == len(ref)
        for m, (_, r) in zip(masks, ref):
            assert np.array_equal(m.numpy().astype(bool), r)


def test_voc_split_void_borders_and_min_area():
    """Two people separated by VOC's void border are two instances; with 4-connectivity a diagonal touch splits,
    with 8 it does not; fragments below min_area are dropped."""
    m = np.zeros((12, 12), dtype=np.uint8)
    m[1:6, 1:5] = 15
    m[1:6, 5] = 255
    m[1:6, 6:10] = 15
    m[8, 8] = m[9, 9] = 3
    assert split_instances(m, 8)[1].tolist() == [3, 15, 15]
    assert split_instances(m, 4)[1].tolist() == [3, 3, 15, 15]
    assert split_instances(m, 4, min_area=2)[1].tolist() == [15, 15]
    with pytest.raises(ValueError, match='connectivity'):
        split_instances(m, 6)


def _write_voc(root, names=('2007_000001', '2007_000002')):
    """A VOC2012-layout folder: JPEG images, palette PNGs (class + object indices with void borders), XML."""
    from PIL import Image
    for d in ('JPEGImages', 'SegmentationClass', 'SegmentationObject', 'Annotations', 'ImageSets/Segmentation',
              'ImageSets/Main'):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    palette = [0, 0, 0] + [(i * 37) % 256 for i in range(3 * 254)] + [224, 224, 192]
    for k, name in enumerate(names):
        cls = np.zeros((30, 40), dtype=np.uint8)
        obj = np.zeros_like(cls)
        cls[2:12, 2:10], obj[2:12, 2:10] = 15, 1           # person
        cls[2:12, 10], obj[2:12, 10] = 255, 255              # void border
        cls[2:12, 11:19], obj[2:12, 11:19] = 15, 2         # another person, touching through the border
        cls[15:28, 20:38], obj[15:28, 20:38] = 7 + k, 3    # car (k=0) / cat (k=1)
        for sub, arr in (('SegmentationClass', cls), ('SegmentationObject', obj)):
            im = Image.fromarray(arr, mode='P')
            im.putpalette(palette)
            im.save(os.path.join(root, sub, f'{name}.png'))
        Image.fromarray(np.full((30, 40, 3), 90 + k, dtype=np.uint8)).save(os.path.join(root, 'JPEGImages',
                                                                                        f'{name}.jpg'))
        objects = [('person', (3, 3, 10, 12), 0), ('person', (12, 3, 19, 12), 1), (VOC_CLASSES[6 + k],
                                                                                   (21, 16, 38, 28), 0)]
        xml = '<annotation>' + ''.join(
            f'<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>'
            f'<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>' for n, b, d in objects) + '</annotation>'
        with open(os.path.join(root, 'Annotations', f'{name}.xml'), 'w') as f:
            f.write(xml)
    for sub in ('Segmentation', 'Main'):
        with open(os.path.join(root, 'ImageSets', sub, 'train.txt'), 'w') as f:
            f.write('\n'.join(names) + '\n')
    return root


def test_voc_dataset_three_instance_sources(tmp_path):
    root = _write_voc(str(tmp_path / 'VOC2012'))
    ds = VOCInstanceDataset(root, 'train', instances='components')
    img, t = ds[1]
    assert img.shape == (3, 30, 40) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert t['labels'].tolist() == [8, 15, 15] and t['image_id'] == 1 and t['masks'].shape == (3, 30, 40)
    assert t['boxes'].tolist() == [[20., 15., 38., 28.], [2., 2., 10., 12.], [11., 2., 19., 12.]]
    obj = VOCInstanceDataset(root, 'train', instances='objects')[1][1]
    assert obj['labels'].tolist() == [15, 15, 8] and torch.equal(obj['boxes'][:2], t['boxes'][1:])
    ann = VOCInstanceDataset(root, 'train', instances='annotations')[0][1]
    assert ann['labels'].tolist() == [15, 7] and 'masks' not in ann  # the difficult person left out
    assert ann['boxes'].tolist() == [[2., 2., 10., 12.], [20., 15., 38., 28.]]
    assert len(read_voc_annotation(os.path.join(root, 'Annotations', '2007_000001.xml'), True)[1]) == 3
    assert VOCInstanceDataset(root, 'train', img_size=20)[0][0].shape == (3, 15, 20)
    assert ds.num_classes == 21 and ds.categories[14] == {'id': 15, 'name': 'person'}


def test_voc_bad_input(tmp_path):
    from PIL import Image
    root = _write_voc(str(tmp_path / 'VOC2012'))
    with pytest.raises(FileNotFoundError, match='image set'):
        VOCInstanceDataset(root, 'val')
    with pytest.raises(ValueError, match='instances'):
        VOCInstanceDataset(root, 'train', instances='boxes')
    bad = os.path.join(root, 'SegmentationClass', '2007_000002.png')
    Image.new('RGB', (40, 30)).save(bad)
    with pytest.raises(ValueError, match='not an indexed'):
        read_index_png(bad)
    xml = os.path.join(root, 'Annotations', '2007_000002.xml')
    with open(xml, 'w') as f:
        f.write('<!DOCTYPE a [<!ENTITY x "y">]><annotation><object><name>&x;</name></object></annotation>')
    with pytest.raises(ValueError, match='DOCTYPE'):
        read_voc_annotation(xml)
    with open(xml, 'w') as f:
        f.write('<annotation><object><name>unicorn</name></object></annotation>')
    with pytest.raises(ValueError, match='unknown VOC class'):
        read_voc_annotation(xml)
    with pytest.raises(ValueError, match='sizes differ'):
        object_instances(np.zeros((3, 4), np.uint8), np.zeros((4, 3), np.uint8))
    os.remove(os.path.join(root, 'JPEGImages', '2007_000001.jpg'))
    with pytest.raises(FileNotFoundError):
        VOCInstanceDataset(root, 'train', instances='objects')[0]


# ------------------------------------------------------------------------------------- section 3.2 matchings
def test_resort_rows_against_a_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        gt = torch.rand(int(torch.randint(0, 7, (), generator=g)), 2, generator=g) * 0.6
        gt = torch.cat([gt, gt + 0.05 + torch.rand(gt.shape[0], 2, generator=g) * 0.3], 1)
        det = torch.rand(int(torch.randint(0, 9, (), generator=g)), 2, generator=g) * 0.6
        det = torch.cat([det, det + 0.05 + torch.rand(det.shape[0], 2, generator=g) * 0.3], 1)
        grep = torch.randint(0, 3, (gt.shape[0],), generator=g)
        drep = torch.randint(0, 3, (det.shape[0],), generator=g)
        got = resort_rows(gt, grep, det, drep, 0.3)
        for i in range(gt.shape[0]):
            cands = [(float(((gt[i] - det[j]) ** 2).sum().sqrt()), j) for j in range(det.shape[0])
                     if drep[j] == grep[i]]
            want = -1
            if cands:
                j = min(cands)[1]
                want = j if float(box_iou(gt[i:i + 1], det[j:j + 1])) >= 0.3 else -1
            assert int(got[i]) == want


def test_replica_area_pairs_hand_computed():
    boxes = torch.tensor([[0, 0, .5, .5], [0, 0, .1, .1], [0, 0, .5, .5], [0, 0, .2, .5], [0, 0, .1, .1]])
    rep = torch.tensor([0, 0, 1, 2, 2])  # areas 0.26, 0.25, 0.11; replica 3 has none
    pairs = replica_area_pairs(boxes, rep, 4, 0.9)
    assert pairs.tolist() == [[True, True, False, False], [True, True, False, False],
                              [False, False, True, False], [False, False, False, False]]


def _slow_greedy_pairs(boxes, scores, rep, pairs, thr):
    order = sorted(range(len(boxes)), key=lambda k: (-float(scores[k]), k))
    iou = box_iou(boxes, boxes)
    anchor, members, anchors = {}, [], []
    for k in order:
        best, best_c = None, -1
        for c, a in enumerate(anchors):
            if int(rep[k]) in members[c] or not bool(pairs[rep[k], rep[a]]) or not bool(iou[k, a] >= thr):
                continue
            if best_c < 0 or float(iou[k, a]) > best:
                best, best_c = float(iou[k, a]), c
        if best_c < 0:
            anchors.append(k)
            members.append({int(rep[k])})
            best_c = len(anchors) - 1
        members[best_c].add(int(rep[k]))
        anchor[k] = anchors[best_c]
    return [anchor[k] for k in range(len(boxes))]


def test_greedy_match_with_replica_pairs_equals_sequential():
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        n, r = int(torch.randint(1, 25, (), generator=g)), int(torch.randint(1, 5, (), generator=g))
        c = torch.randint(0, 20, (n, 2), generator=g).float()
        boxes = torch.cat([c, c + 8 + torch.randint(0, 3, (n, 2), generator=g)], 1)
        scores = torch.randint(0, 4, (n,), generator=g).float()
        rep = torch.randint(0, r, (n,), generator=g)
        pairs = torch.rand(r, r, generator=g) > 0.3
        pairs = pairs & pairs.T
        got = greedy_match_rows(boxes, scores, rep, None, 0.3, replica_pairs=pairs)
        assert got.tolist() == _slow_greedy_pairs(boxes, scores, rep, pairs, 0.3)


@pytest.fixture(scope='module')
def tiny_rcnn():
    torch.manual_seed(0)
    return build_detector('maskrcnn', 'mobilenetv3_small_050', 2, min_size=64, max_size=64, fpn_channels=32,
                          mask_head_channels=16, box_head_dim=64, rpn_pre_nms_top_n_train=50,
                          rpn_post_nms_top_n_train=50, box_batch_size_per_image=32)


def _two_images(flip=True):
    """2 images x 2 replicas at 64 px (model input = replica frame); image 1's replica 1 flipped."""
    size = (64, 64)
    params = [ReplicaParams(size, size), ReplicaParams(size, size, flip=flip), ReplicaParams(size, size),
              ReplicaParams(size, size)]
    gt = torch.tensor([[4., 4., 20., 40.], [30., 10., 60., 30.]])
    targets = []
    for p in params:
        b = forward_boxes(gt, p)
        targets.append({'boxes': b, 'labels': torch.tensor([1, 1]), 'instance_ids': torch.arange(2),
                        'visible': torch.ones(2)})
    return params, targets, gt


def test_resort_rows_group_nearest_detections(tiny_rcnn):
    """Resort: each annotation takes its replica's nearest detection; far or missing ones are dropped; groups are
    (image, instance); the group's label is the annotation's; pasted annotations (negative ids) are left out."""
    net = InstanceLossTransform(tiny_rcnn, 2, match='resort', match_iou=0.5)
    params, targets, gt = _two_images()
    sizes = [(64, 64)] * 4
    jitter = torch.tensor([1., -1., 1., 0.])
    dets = [forward_boxes(gt, p) + jitter for p in params]
    dets[3] = dets[3][:1]  # image 1, replica 1 lost instance 1
    dets[2] = torch.cat([dets[2], torch.tensor([[0., 50., 10., 60.]])])  # a stray detection
    targets[2]['instance_ids'] = torch.tensor([0, PASTED_ID])
    c = net.matched_rows(dets, None, None, sizes, sizes, params, targets)
    # rows: image 0 both instances in both replicas; image 1 instance 0 in both replicas
    assert c['rep'].tolist() == [0, 0, 1, 1, 2, 3] and c['label'].tolist() == [1] * 6
    assert c['gid'].tolist() == [0, 1, 0, 1, 4, 4]
    assert torch.equal(c['det'], torch.cat([dets[0], dets[1], dets[2][:1], dets[3]]))
    assert c['fsel'].all() and c['per_replica'] == [2, 2, 1, 1]
    src = torch.cat([gt + jitter, gt + jitter, (gt + jitter)[:1], (gt + jitter)[:1]])
    src[2:4] = invert_boxes(dets[1], params[1])
    want = torch.stack([(src[0] + src[2]) / 2, (src[1] + src[3]) / 2]) / 64
    assert torch.allclose(c['target'][:4], want.repeat(2, 1))
    far = [d + 30 for d in dets]
    assert net.matched_rows(far, None, None, sizes, sizes, params, targets) is None


def test_area_greedy_pairs_replicas_by_area_not_layout(tiny_rcnn):
    """area-greedy: replicas are paired by the area ratio of their detections, whatever image they come from;
    detections on pasted objects are never matched."""
    net = InstanceLossTransform(tiny_rcnn, 2, match='area-greedy', match_iou=0.5, area_ratio=0.9)
    size = (64, 64)
    params = [ReplicaParams(size, size) for _ in range(4)]
    box = torch.tensor([[10., 10., 30., 40.]])
    dets = [box, box + 1, box * 0.5, box + 2]  # replica 2: a quarter of the area
    scores = [torch.tensor([0.9]), torch.tensor([0.8]), torch.tensor([0.7]), torch.tensor([0.6])]
    labels = [torch.tensor([1])] * 4
    c = net.matched_rows(dets, scores, labels, [size] * 4, [size] * 4, params, None)
    assert c['rep'].tolist() == [0, 1, 3] and len(set(c['gid'].tolist())) == 1  # replica 3 of image 1 joins
    params[1] = ReplicaParams(size, size, pasted=((11., 11., 31., 41.),))
    c = net.matched_rows(dets, scores, labels, [size] * 4, [size] * 4, params, None)
    assert c['rep'].tolist() == [0, 3]
    gt_mode = InstanceLossTransform(tiny_rcnn, 2, match='predicted')
    c = gt_mode.matched_rows(dets, scores, labels, [size] * 4, [size] * 4, [ReplicaParams(size, size)] * 4, None)
    assert c['rep'].tolist() == [0, 1]  # the layout: replicas 0, 1 are image 0; 2, 3 image 1 (areas differ)


@pytest.mark.parametrize('match', ['resort', 'area-greedy'])
def test_section_3_2_modes_train_end_to_end(tiny_rcnn, match):
    """A training forward/backward in each mode on two flipped replicas: finite loss; with a loose threshold there
    are groups and the term's gradient reaches the box head."""
    net = InstanceLossTransform(tiny_rcnn, 2, rho=1.0, match=match, match_iou=0.01, area_ratio=0.05)
    tiny_rcnn.roi_heads.score_thresh = 0.0
    try:
        images, targets, params = _pair((64, 64))
        net.train()
        losses = net(images, targets, params)
        assert all(torch.isfinite(v) for v in losses.values())
        assert net.last_parts['groups'] >= 1
        tiny_rcnn.zero_grad()
        losses['loss_consistency'].backward()
        assert float(tiny_rcnn.roi_heads.box_head.fc6.weight.grad.abs().sum()) > 0
    finally:
        tiny_rcnn.roi_heads.score_thresh = 0.05


def test_gt_mode_ignores_pasted_instances(tiny_rcnn):
    net = InstanceLossTransform(tiny_rcnn, 2, rho=1.0, match='gt')
    images, targets, params = _pair((64, 64))
    net.train()
    net(images, targets, params)
    assert net.last_parts['groups'] == 1
    for t in targets:
        t['instance_ids'] = torch.tensor([PASTED_ID])
    net(images, targets, params)
    assert net.last_parts['groups'] == 0


def test_layout_of_rows_is_the_replica_groups():
    assert replica_groups(4, 2).tolist() == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- Table 6: MobileNetV3-L FPN COCO
def test_coco_mobilenet_v3_detector_is_torchvisions(monkeypatch):
    """Ours without weights equals torchvision's ``fasterrcnn_mobilenet_v3_large_fpn(weights=COCO_V1)`` (its
    download replaced by our state dict): same modules, settings, state-dict keys and shapes, and it loads."""
    import torchvision.models.detection as tvdet
    from torchvision.models import WeightsEnum
    from lt_timm.detection.backbone import build_coco_detector, coco_detector_weights
    kw = dict(min_size=64, max_size=64)
    torch.manual_seed(0)
    ours = build_coco_detector('fasterrcnn', backbone='tv_mobilenet_v3_large', **kw)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in ours.state_dict().items()}
    monkeypatch.setattr(WeightsEnum, 'get_state_dict', lambda self, *a, **k: dict(state))
    weights = coco_detector_weights('fasterrcnn', 'tv_mobilenet_v3_large')
    theirs = tvdet.fasterrcnn_mobilenet_v3_large_fpn(weights=weights, **kw)
    assert weights.meta['_metrics']['COCO-val2017']['box_map'] == 32.8
    assert repr(ours) == repr(theirs)
    for name in ('rpn', 'roi_heads', 'transform'):
        a, b = getattr(ours, name), getattr(theirs, name)
        keep = (int, float, str, bool, tuple, list, type(None))
        assert {k: v for k, v in vars(a).items() if isinstance(v, keep)} == \
            {k: v for k, v in vars(b).items() if isinstance(v, keep)}
    assert ours.rpn.anchor_generator.sizes == theirs.rpn.anchor_generator.sizes
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    ours.load_state_dict(theirs.state_dict())
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


# ------------------------------------------------------------------------------------------------- recipes, CLI
RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'detection')
TABLE4 = {  # recipe key -> --backbone (the paper's list, section 4.1.6)
    'convnext_tiny': 'tv_convnext_tiny', 'densenet121': 'tv_densenet121', 'efficientnet_b4': 'tv_efficientnet_b4',
    'googlenet': 'tv_googlenet', 'inception_v3': 'tv_inception_v3', 'mnasnet1_0': 'tv_mnasnet1_0',
    'resnet50': 'tv_resnet50', 'shufflenet_v2': 'tv_shufflenet_v2_x1_0', 'wide_resnet50': 'tv_wide_resnet50_2'}


def _parse(path, *extra):
    from lt_timm.cli.detection import parse_args
    return parse_args(['-c', path, '--data-dir', '/nonexistent', *extra])


def _twins(path):
    import yaml
    other = path.replace('_lt.yaml', '_multi.yaml') if path.endswith('_lt.yaml') else path.replace('_multi', '_lt')
    with open(path) as f, open(other) as g:
        a, b = yaml.safe_load(f), yaml.safe_load(g)
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_every_detection_recipe_parses_and_passes_the_checks():
    import glob
    from lt_timm.cli.checks import check_augment_args, check_match_args
    from lt_timm.detection.finetune import COCO_FIXED_FLAGS, check_coco_detector_args, uses_coco_detector
    files = sorted(glob.glob(os.path.join(RECIPES, '*.yaml')))
    assert len(files) >= 39
    for f in files:
        a = _parse(f)
        check_match_args(a.model, a.lt_match, a.lt_match_iou, a.lt_area_ratio)
        check_augment_args(a)
        if uses_coco_detector(a.detector_weights, a.detector_checkpoint):
            check_coco_detector_args(a.model, a.backbone, a.pretrained, a.detector_checkpoint,
                                     {k: getattr(a, k) for k in COCO_FIXED_FLAGS})
        if f.endswith(('_lt.yaml', '_multi.yaml')):
            assert _twins(f) == {'loss', 'experiment'}, f
        with open(f) as fh:
            assert 'unknown' not in fh.read().lower(), f  # the headers no longer say the values are unknown


@pytest.mark.parametrize('key', sorted(TABLE4))
def test_table4_recipes_are_the_papers(key):
    for loss, name in (('lt', 'losstransform'), ('multi', 'multi')):
        a = _parse(os.path.join(RECIPES, f'pennfudan_maskrcnn_{key}_{loss}.yaml'))
        lr, fpn = TABLE4_BACKBONES[TABLE4[key]]
        assert a.backbone == TABLE4[key] and a.lr == lr and not a.pretrained and a.detector_weights == 'none'
        assert tuple(a.anchor_sizes) == fpn.anchor_sizes and tuple(a.fpn_strides) == fpn.strides
        assert a.fpn_extra == fpn.extra and a.model == 'maskrcnn' and a.dataset == 'pennfudan' and a.loss == name
        assert a.batch_size == 4 and a.lt_epoch == 'original' and a.epochs == 18 and a.lr_steps == [12, 16]
        assert a.lr_gamma == 0.1 and a.hflip == 0.5 and a.crop_scale and a.copy_paste > 0
        assert a.scale == [1.0, 1.0] and a.translate == 0.0 and a.lt_match == 'resort'


def test_mask_rcnn_star_and_voc_recipes():
    for stem in ('pennfudan_maskrcnn_star', 'voc_maskrcnn_frozen'):
        a = _parse(os.path.join(RECIPES, f'{stem}_lt.yaml'))
        assert a.detector_weights == 'coco' and a.backbone == 'tv_resnet50' and a.reset_predictors
        assert a.freeze == ['backbone', 'rpn'] and a.lr == 0.005 and a.lt_match == 'area-greedy'
        assert a.lt_epoch == 'original' and a.batch_size == 4
    assert _parse(os.path.join(RECIPES, 'pennfudan_maskrcnn_star_lt.yaml')).dataset == 'pennfudan'
    voc = _parse(os.path.join(RECIPES, 'voc_maskrcnn_frozen_lt.yaml'))
    assert voc.dataset == 'voc' and voc.voc_instances == 'components' and (voc.train_split, voc.val_split) == (
        'train', 'val')
    assert not os.path.exists(os.path.join(RECIPES, 'table6_maskrcnn_frozen_lt.yaml'))  # moved to Table 4


def _write_pennfudan(root, n=4, size=72):
    from PIL import Image
    os.makedirs(os.path.join(root, 'PNGImages'))
    os.makedirs(os.path.join(root, 'PedMasks'))
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        for j, x in enumerate((4 + 2 * i, 40)):
            mask[10:64, x:x + 20] = j + 1
            img[10:64, x:x + 20] += 120
        Image.fromarray(img).save(os.path.join(root, 'PNGImages', f'P{i:03d}.png'))
        Image.fromarray(mask).save(os.path.join(root, 'PedMasks', f'P{i:03d}_mask.png'))
    return root


SMALL = ['--img-size', '72', '--box-head-dim', '32', '--mask-head-channels', '8', '--fpn-channels', '16',
         '--rpn-pre-nms', '30', '--rpn-post-nms', '30', '--box-batch-per-image', '16', '--threads', '1',
         '--no-plot', '--workers', '0']


def test_table4_recipe_trains_through_the_cli(tmp_path, caplog):
    """The ShuffleNetV2 recipe as written (original batching, crop, copy-paste, Resort, two-level FPN), shortened:
    -b 2 images x 2 replicas per step, so 3 training images give one step per epoch (the last image is dropped)."""
    import csv
    import torch as _torch
    from lt_timm.cli.detection import main
    data = _write_pennfudan(str(tmp_path / 'pf'))
    argv = ['-c', os.path.join(RECIPES, 'pennfudan_maskrcnn_shufflenet_v2_lt.yaml'), '--data-dir', data,
            '--val-size', '1', '-b', '2', '--epochs', '1', '--output', str(tmp_path / 'out'), '--experiment', 'r',
            *SMALL]
    with caplog.at_level('INFO'):
        assert main(argv) == 0
    assert 'mode original, 1 batches/epoch of 4 rows' in caplog.text  # -b counts images there, m rows each
    rows = list(csv.DictReader(open(tmp_path / 'out' / 'r' / 'summary.csv')))
    assert len(rows) == 1 and float(rows[0]['train_loss']) == float(rows[0]['train_loss'])
    ck = _torch.load(tmp_path / 'out' / 'r' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert ck['args'].anchor_sizes == [(32, 64, 128, 256, 512)] * 2 and ck['args'].fpn_extra == 'none'


def test_voc_and_eval_only_through_the_cli(tmp_path):
    import json
    from lt_timm.cli.detection import main
    root = _write_voc(str(tmp_path / 'VOC2012'))
    base = ['--dataset', 'voc', '--data-dir', root, '--train-split', 'train', '--val-split', 'train',
            '--model', 'maskrcnn', '--backbone', 'mobilenetv3_small_050', '-b', '2', '--epochs', '1',
            '--lt-match', 'resort', '--output', str(tmp_path / 'out'), *SMALL]
    assert main(base + ['--experiment', 'voc']) == 0
    assert os.path.exists(tmp_path / 'out' / 'voc' / 'last.pth.tar')
    assert main(base + ['--experiment', 'ev', '--eval-only']) == 0
    ev = json.load(open(tmp_path / 'out' / 'ev' / 'eval.json'))
    assert ev['num_val'] == 2 and 'box_AP50' in ev and 'mask_AP' in ev
    assert not os.path.exists(tmp_path / 'out' / 'ev' / 'last.pth.tar')


@pytest.mark.parametrize('extra,expected', [
    (['--crop-scale', '0.5', '1'], 'add --scale 1 1 --translate 0'),
    (['--crop-scale', '0', '1', '--scale', '1', '1', '--translate', '0'], '0 < MIN <= MAX <= 1'),
    (['--copy-paste', '1.5'], 'is a probability'),
    (['--dataset', 'coco', '--model', 'fasterrcnn', '--copy-paste', '0.5'], 'pastes instance masks'),
    (['--lt-area-ratio', '0'], 'not an area ratio'),
    (['--detector-weights', 'coco', '--backbone', 'tv_mobilenet_v3_large', '--model', 'maskrcnn'],
     'no torchvision COCO detector for --model maskrcnn --backbone tv_mobilenet_v3_large'),
])
def test_detection_flag_errors(tmp_path, capsys, extra, expected):
    from lt_timm.cli.detection import main
    with pytest.raises(SystemExit) as e:
        main(['--data-dir', str(tmp_path), '--output', str(tmp_path / 'out'), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and err.startswith('error: ') and len(err.splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_anchor_sizes_flag_and_yaml(tmp_path, capsys):
    from lt_timm.cli.detection import parse_args
    a = parse_args(['--data-dir', 'x', '--anchor-sizes', '32,64', '128'])
    assert a.anchor_sizes == [(32, 64), 128]
    bad = tmp_path / 'bad.yaml'
    bad.write_text('anchor_sizes: [[32, "a"]]\n')
    with pytest.raises(SystemExit):
        parse_args(['-c', str(bad), '--data-dir', 'x'])
    assert 'anchor_sizes entries are sizes' in capsys.readouterr().err
