"""The vectorised instance consistency term equals the original per-row algorithm (values and gradients).

``_reference_consistency`` below is a copy of the slow implementation that lt_timm/detection/consistency.py had
before it was vectorised (grouping on the host, one Python iteration and one host copy per row), kept here as an
independent reference. Random batches cover empty replicas, single replicas, batches not divisible by m, instances
seen by one replica only, partly visible (cropped) instances and flipped / scaled / translated replicas.
"""
import pytest
import torch
import torch.nn.functional as F

from lt_timm.detection.consistency import InstanceLossTransform
from lt_timm.detection.transforms import ReplicaParams, invert_boxes
from lt_timm.layout import replica_groups
from lt_timm.loss import grouped_kl, log_distribution

SIZE = 64  # padded model-input size of the synthetic batches


pytestmark = pytest.mark.usefixtures('one_thread')


# --------------------------------------------------------------------------------- the old algorithm
def _compact(keys):
    if keys.numel() == 0:
        return keys.new_zeros((0,), dtype=torch.long), 0
    uniq, inv = torch.unique(keys, return_inverse=True)
    return inv, int(uniq.numel())


def _multi(groups, g):
    if groups.numel() == 0:
        return torch.zeros((0,), dtype=torch.bool)
    return torch.bincount(groups, minlength=g)[groups] >= 2


def _mean_over_groups(per_row, groups, g):
    counts = torch.bincount(groups, minlength=g).to(per_row.dtype).clamp_min(1)
    return per_row.new_zeros((g,) + per_row.shape[1:]).index_add(0, groups, per_row) / counts.view(-1, 1)


def _reference_consistency(heads, m, features, image_sizes, original_sizes, targets, replica_params,
                           min_visible=0.5, box_weight=1.0, mask_weight=1.0, box_beta=0.02, detach=False):
    """Returns (total, parts) of the pre-vectorisation implementation (CPU)."""
    b = len(targets)
    zero = sum(f.sum() for f in features.values()) * 0.0
    img_idx = replica_groups(b, m).tolist()
    ids = [t.get('instance_ids', torch.arange(t['boxes'].shape[0])) for t in targets]
    vis = [t.get('visible', torch.ones(t['boxes'].shape[0])) for t in targets]
    keys, keeps = [], []
    for r in range(b):
        keeps.append(vis[r].reshape(-1) >= min_visible)
        keys.append(int(img_idx[r]) * (1 << 20) + ids[r].long().reshape(-1))
    keep = torch.cat(keeps)
    groups, g = _compact(torch.cat(keys)[keep])
    parts = {'cls': 0.0, 'box': 0.0, 'mask': 0.0, 'groups': 0}
    if g == 0:
        return zero, parts
    rows = torch.cat([torch.full((t['boxes'].shape[0],), r, dtype=torch.long) for r, t in enumerate(targets)])
    all_boxes = torch.cat([t['boxes'] for t in targets]).float()
    all_labels = torch.cat([t['labels'] for t in targets]).long()
    all_vis = torch.cat([v.float() for v in vis])
    multi = torch.zeros_like(keep)
    multi[keep] = _multi(groups, g)
    if not bool(multi.any()):
        return zero, parts
    groups, g = _compact(torch.zeros(keep.shape[0], dtype=torch.long).masked_scatter(keep, groups)[multi])
    rows, boxes, labels, full = rows[multi], all_boxes[multi], all_labels[multi], all_vis[multi] >= 1.0 - 1e-6
    rois = [boxes[rows == r] for r in range(b)]
    x = heads.box_head(heads.box_roi_pool(features, rois, image_sizes))
    class_logits, box_regression = heads.box_predictor(x)
    kl = grouped_kl(log_distribution(class_logits, 'softmax'), groups, detach, num_groups=g)
    total = kl.mean()
    parts.update(cls=float(total.detach()), groups=g)
    fgroups, fg = _compact(groups[full])
    fsel = full.clone()
    fsel[full] = _multi(fgroups, fg)
    if not bool(fsel.any()):
        return total + zero, parts
    fgroups, fg = _compact(groups[fsel])
    k = int(fsel.sum())
    if box_weight > 0:
        pred = heads.box_coder.decode(box_regression[fsel], [boxes[fsel]]).reshape(k, -1, 4)
        pred = pred[torch.arange(k), labels[fsel]]
        src = []
        for i, r in enumerate(rows[fsel].tolist()):
            (h0, w0), (h1, w1) = original_sizes[r], image_sizes[r]
            p = replica_params[r]
            bx = pred[i:i + 1] / pred.new_tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0])
            bx = invert_boxes(bx, p)
            sh, sw = p.src_size
            src.append(bx / bx.new_tensor([sw, sh, sw, sh]))
        src = torch.cat(src)
        mean = _mean_over_groups(src, fgroups, fg)
        if detach:
            mean = mean.detach()
        box_term = F.smooth_l1_loss(src, mean[fgroups], beta=box_beta, reduction='none').sum(dim=1).mean()
        total = total + box_weight * box_term
        parts['box'] = float(box_term.detach())
    if mask_weight > 0 and getattr(heads, 'mask_roi_pool', None) is not None:
        mrois = [boxes[fsel & (rows == r)] for r in range(b)]
        mlogits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, mrois, image_sizes)))
        mlogits = mlogits[torch.arange(k), labels[fsel]]
        flips = torch.tensor([bool(replica_params[r].flip) for r in rows[fsel].tolist()])
        mlogits = torch.where(flips.view(-1, 1, 1), mlogits.flip(-1), mlogits)
        mkl = grouped_kl(log_distribution(mlogits, 'bernoulli'), fgroups, detach, num_groups=fg)
        mask_term = mkl.mean() / float(mlogits.shape[-1] * mlogits.shape[-2])
        total = total + mask_weight * mask_term
        parts['mask'] = float(mask_term.detach())
    return total + zero, parts


# --------------------------------------------------------------------------------------- random batches
def _tiny(mask):
    from lt_timm.detection.backbone import build_detector
    torch.manual_seed(0)
    return build_detector('maskrcnn' if mask else 'fasterrcnn', 'mobilenetv3_small_050', 3, min_size=64,
                          max_size=64, fpn_channels=8, mask_head_channels=8, box_head_dim=16)


@pytest.fixture(scope='module')
def models():
    return {True: _tiny(True), False: _tiny(False)}


def _random_batch(seed):
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (), generator=g))

    m = ri(1, 3)
    b = ri(1, 3) * m if ri(0, 3) else ri(1, 7)  # sometimes not a multiple of m
    n_src = [ri(0, 4) for _ in range(b)]  # instances per source image (by block)
    groups = replica_groups(b, m).tolist()
    targets, params, image_sizes, original_sizes = [], [], [], []
    for r in range(b):
        n = n_src[groups[r]]
        h0, w0 = ri(40, 80), ri(40, 80)  # replica (canvas) size = the un-resized model input
        h1, w1 = ri(40, SIZE), ri(40, SIZE)  # after torchvision's resize
        sh, sw = ri(30, 90), ri(30, 90)  # source image size
        p = ReplicaParams(src_size=(sh, sw), out_size=(h0, w0), flip=bool(ri(0, 1)),
                          scaled_size=None if ri(0, 2) == 0 else (ri(20, 120), ri(20, 120)),
                          tx=ri(-10, 10), ty=ri(-10, 10))
        keep = torch.rand(n, generator=g) < 0.8
        ids = torch.arange(n)[keep]
        k = ids.numel()
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w1 - 12., h1 - 12.])
        wh = torch.rand(k, 2, generator=g) * 20 + 2
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(w1), float(h1)]))], 1)
        vis = torch.tensor([1.0, 1.0, 0.999, 0.7, 0.4, 1.0])[torch.randint(0, 6, (k,), generator=g)]
        t = {'boxes': boxes, 'labels': torch.randint(1, 3, (k,), generator=g), 'instance_ids': ids, 'visible': vis}
        if ri(0, 9) == 0:  # defaults: all instances, fully visible
            t = {'boxes': boxes, 'labels': t['labels']}
        targets.append(t)
        params.append(p)
        image_sizes.append((h1, w1))
        original_sizes.append((h0, w0))
    feats = {}
    for i, s in enumerate((16, 8, 4, 2)):
        feats[str(i)] = torch.randn(b, 8, s, s, generator=g).requires_grad_(True)
    feats['pool'] = torch.randn(b, 8, 1, 1, generator=g).requires_grad_(True)
    return m, feats, image_sizes, original_sizes, targets, params


def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if gr is None else gr for t, gr in zip(tensors, gs)]


OPTIONS = [dict(), dict(box_weight=0.0, mask_weight=0.5), dict(detach=True, box_weight=2.0), dict(min_visible=0.8)]


@pytest.mark.parametrize('mask', [True, False])
def test_vectorised_matches_reference(models, mask):
    model = models[mask]
    heads = model.roi_heads
    params = [q for q in heads.parameters()]
    checked_nonzero = {'cls': 0, 'box': 0, 'mask': 0, 'empty': 0}
    for seed in range(40):
        m, feats, image_sizes, original_sizes, targets, rparams = _random_batch(seed)
        opt = OPTIONS[seed % len(OPTIONS)]
        ref, ref_parts = _reference_consistency(heads, m, feats, image_sizes, original_sizes, targets, rparams, **opt)
        w = InstanceLossTransform(model, m, min_visible=opt.get('min_visible', 0.5),
                                  box_weight=opt.get('box_weight', 1.0), mask_weight=opt.get('mask_weight', 1.0),
                                  detach_consensus=opt.get('detach', False))
        new = w.consistency(feats, image_sizes, original_sizes, targets, rparams)
        parts = w.last_parts
        assert torch.isfinite(new) and new.shape == ()
        torch.testing.assert_close(new, ref.to(new.dtype), rtol=1e-5, atol=1e-7, msg=f'seed {seed}')
        for k in ('cls', 'box', 'mask'):
            assert parts[k] == pytest.approx(ref_parts[k], rel=1e-5, abs=1e-7), (seed, k)
            checked_nonzero[k] += ref_parts[k] > 0
        assert parts['groups'] == ref_parts['groups'], seed
        checked_nonzero['empty'] += ref_parts['groups'] == 0
        tensors = list(feats.values()) + params
        for a, r in zip(_grads(new, tensors), _grads(ref, tensors)):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-7, msg=f'seed {seed}')
    # the random cases exercise every branch
    assert checked_nonzero['cls'] >= 10 and checked_nonzero['box'] >= 5 and checked_nonzero['empty'] >= 3
    assert checked_nonzero['mask'] >= (5 if mask else 0)


def test_vectorised_no_rows_and_no_grad(models):
    """All replicas empty -> exact 0 connected to the features; under no_grad the term is still measured."""
    model = models[True]
    m, feats, image_sizes, original_sizes, targets, rparams = _random_batch(3)
    empty = [{'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.long)} for _ in targets]
    w = InstanceLossTransform(model, m)
    out = w.consistency(feats, image_sizes, original_sizes, empty, rparams)
    assert float(out.detach()) == 0.0 and out.requires_grad and w.last_parts['groups'] == 0
    with torch.no_grad():
        out = w.consistency(feats, image_sizes, original_sizes, targets, rparams)
    ref, ref_parts = _reference_consistency(model.roi_heads, m, feats, image_sizes, original_sizes, targets, rparams)
    assert float(out) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-7)
