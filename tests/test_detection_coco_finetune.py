"""The paper's Table 6 protocol: fine-tuning torchvision's COCO detectors (Faster R-CNN, RetinaNet, Mask R-CNN*).

Nothing is downloaded. "torchvision's COCO detector" is torchvision's own builder called with ``weights=COCO_V1``
while ``WeightsEnum.get_state_dict`` (the one place that would download) returns a synthetic state dict: a
randomly initialised torchvision model (``weights=None``) with every tensor perturbed, saved to a file. The same
file feeds ``--detector-checkpoint``. Images are 64 px and few RoIs are sampled, so the R50-FPN detectors stay cheap
on one CPU thread; builds whose every tensor is then loaded skip the random init (:func:`init_skipped`), and every
such test compares the loaded tensors with the file.
"""
import argparse
import contextlib
import copy
import json
import os

import numpy as np
import pytest
import torch
import torchvision.models.detection as tvdet
import yaml
from torchvision.models import WeightsEnum

from conftest import REPO
from lt_timm.cli.checks import check_match_args
from lt_timm.cli.detection import main, parse_args
from lt_timm.detection.backbone import (COCO_DETECTORS, build_detector, coco_category_names, coco_detector_weights,
                                        reset_class_predictors)
from lt_timm.detection.consistency import InstanceLossTransform
from lt_timm.detection.data import CocoDetectionDataset, ReplicaDataset, replica_collate
from lt_timm.detection.evaluate import coco_ap, coco_from_dataset, predictions_to_coco
from lt_timm.detection.finetune import (COCO_FIXED_FLAGS, build_model, check_coco_categories,
                                        check_coco_detector_args, dataset_label_space, freeze_submodules,
                                        hold_frozen_norms, load_detector_checkpoint, read_detector_state_dict)
from lt_timm.detection.transforms import ReplicaAugment
from lt_timm.errors import UserError

pytestmark = pytest.mark.usefixtures('one_thread')

MODELS = ('fasterrcnn', 'maskrcnn', 'retinanet')
SIZE = 64
RUNTIME = {'fasterrcnn': dict(min_size=SIZE, max_size=SIZE, rpn_pre_nms_top_n_train=50,
                              rpn_post_nms_top_n_train=50, box_batch_size_per_image=8),
           'retinanet': dict(min_size=SIZE, max_size=SIZE)}
RUNTIME['maskrcnn'] = RUNTIME['fasterrcnn']
# COCO category ids with gaps (12 is unused by COCO), with COCO's names
CATEGORIES = [{'id': 1, 'name': 'person'}, {'id': 3, 'name': 'car'}, {'id': 90, 'name': 'toothbrush'}]


@contextlib.contextmanager
def init_skipped():
    """``torch.nn.init`` made a no-op: for builds whose every tensor is loaded right after (the random init of an
    R50-FPN detector costs about a second on one thread)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ('uniform_', 'normal_', 'constant_', 'zeros_', 'ones_', 'kaiming_uniform_', 'kaiming_normal_',
                     'xavier_uniform_', 'xavier_normal_', 'trunc_normal_'):
            mp.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield


def perturbed(state, seed):
    """Every floating tensor moved away from its init by its own offset (no tensor keeps the value a fresh build
    gives it, none is zero; running variances stay positive), integers kept."""
    out = {}
    for i, (k, v) in enumerate(state.items()):
        offset = 1e-4 * (1 + (seed + i) % 97)
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith('running_var'):  # > 1: each norm damps a little, activations stay finite through R50
            out[k] = 2 * v + offset
        else:
            out[k] = 1.01 * v + offset
    return out


def settings(model):
    """Every non-tensor setting of every submodule and of its helper objects (box coders, matchers, samplers, anchor
    generator cells, transform sizes, thresholds, eps), by module name."""
    base = set(vars(torch.nn.Module()))

    def describe(v):
        if isinstance(v, (int, float, str, bool, type(None))):
            return v
        if isinstance(v, (tuple, list)):
            return [describe(x) for x in v]
        if isinstance(v, dict):
            return {str(k): describe(x) for k, x in v.items()}
        if torch.is_tensor(v):
            return ['tensor', list(v.shape), v.tolist() if v.numel() <= 64 else None]
        if isinstance(v, torch.nn.Module):
            return type(v).__name__
        if hasattr(v, '__dict__'):
            return [type(v).__name__, {k: describe(x) for k, x in vars(v).items()}]
        return type(v).__name__

    return {f'{name}.{k}': describe(v) for name, m in model.named_modules() for k, v in vars(m).items()
            if k not in base}


class FakeWeightsAPI:
    """Stands in for ``WeightsEnum.get_state_dict`` (the download): records which weights were asked for."""

    def __init__(self, state):
        self.state, self.calls = state, []

    def method(self):
        def get_state_dict(weights, *args, **kwargs):
            self.calls.append((weights, kwargs))
            return dict(self.state)  # load_state_dict copies nothing but the tensors' values
        return get_state_dict


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    """Per model: the synthetic weights file, torchvision's COCO detector (its builder, ``weights=COCO_V1``) with
    them, ours from ``--detector-checkpoint`` and the key/shape list of the builder with ``weights=None``."""
    out = {}
    root = tmp_path_factory.mktemp('coco_weights')
    for i, model in enumerate(MODELS):
        builder = getattr(tvdet, COCO_DETECTORS[model])
        torch.manual_seed(i)
        plain = builder(weights=None, weights_backbone=None, **RUNTIME[model])
        plain_shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
        plain_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
        state = perturbed(plain.state_dict(), seed=i)
        del plain
        path = str(root / f'{model}.pth')
        torch.save(state, path)
        api = FakeWeightsAPI(state)
        with pytest.MonkeyPatch.context() as mp, init_skipped():
            mp.setattr(WeightsEnum, 'get_state_dict', api.method())
            reference = builder(weights=coco_detector_weights(model), **RUNTIME[model])
            ours = build_model(model, 'tv_resnet50', 91, coco_detector=True, detector_checkpoint=path,
                               runtime=RUNTIME[model])
        assert len(api.calls) == 1
        out[model] = dict(path=path, state=state, reference=reference, ours=ours, plain_shapes=plain_shapes,
                          plain_bn=plain_bn)
    return out


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- architecture, weights
@pytest.mark.parametrize('model', MODELS)
def test_coco_detector_is_torchvisions(coco, model):
    """The state dict of torchvision's builder (weights=None: same keys and shapes; BatchNorm there, so its
    num_batches_tracked counters are the only extra keys), and with the COCO weights exactly torchvision's COCO
    detector: same tensors, frozen layers, module types and settings (eps 0, anchors, transform, thresholds)."""
    ref, ours = coco[model]['reference'], coco[model]['ours']
    own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    plain = coco[model]['plain_shapes']
    extra = set(plain) - set(own)
    assert set(own) <= set(plain) and all(k.endswith('.num_batches_tracked') for k in extra)
    assert len(extra) == coco[model]['plain_bn'] > 0
    assert all(own[k] == plain[k] for k in own)
    # every tensor of the file, exactly
    file_state = {k: v for k, v in coco[model]['state'].items() if not k.endswith('num_batches_tracked')}
    assert same_tensors(ours.state_dict(), file_state)
    # exactly torchvision's COCO detector
    assert same_tensors(ours.state_dict(), ref.state_dict())
    assert ({n: p.requires_grad for n, p in ours.named_parameters()}
            == {n: p.requires_grad for n, p in ref.named_parameters()})
    assert ({n: type(m) for n, m in ours.named_modules()} == {n: type(m) for n, m in ref.named_modules()})
    assert settings(ours) == settings(ref)
    assert ours.backbone.body.conv1.weight.requires_grad is False  # torchvision's trainable_backbone_layers=3
    assert ours.backbone.body.layer2[0].conv1.weight.requires_grad is True


def test_coco_weights_come_from_torchvisions_weights_api(coco, monkeypatch):
    """``--detector-weights coco`` asks torchvision's weights API for the model's COCO_V1 (hash-checked) and loads
    what it returns."""
    api = FakeWeightsAPI(coco['retinanet']['state'])
    monkeypatch.setattr(WeightsEnum, 'get_state_dict', api.method())
    with init_skipped():
        det = build_model('retinanet', 'tv_resnet50', 91, coco_detector=True, runtime=RUNTIME['retinanet'])
    assert [w for w, _ in api.calls] == [tvdet.RetinaNet_ResNet50_FPN_Weights.COCO_V1]
    assert api.calls[0][1].get('check_hash') is True
    assert same_tensors(det.state_dict(), coco['retinanet']['ours'].state_dict())


def test_detector_checkpoint_formats(tmp_path):
    """A plain state dict, or one under 'model' (torchvision's reference scripts) or 'state_dict' (timm, this
    trainer, saved with an argparse Namespace)."""
    sd = {'a.weight': torch.randn(3, 2), 'b.bias': torch.randn(3)}
    for name, content in (('plain', sd), ('tv', {'model': sd, 'epoch': 3}),
                          ('timm', {'state_dict': sd, 'args': argparse.Namespace(lr=0.1), 'epoch': 1})):
        torch.save(content, tmp_path / f'{name}.pth')
        assert same_tensors(read_detector_state_dict(str(tmp_path / f'{name}.pth'), 'fasterrcnn'), sd)
    torch.save([1, 2], tmp_path / 'list.pth')
    with pytest.raises(UserError, match='holds no state dict'):
        read_detector_state_dict(str(tmp_path / 'list.pth'), 'fasterrcnn')


def test_detector_checkpoint_errors(coco, tmp_path):
    """Missing, empty, truncated and wrong-architecture files: one UserError naming the problem and the fix, and
    the model is left as it was."""
    det = coco['fasterrcnn']['ours']
    before = {k: v.clone() for k, v in det.state_dict().items()}
    url = tvdet.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url
    with pytest.raises(UserError, match='not found') as e:
        load_detector_checkpoint(det, str(tmp_path / 'nope.pth'), 'fasterrcnn')
    assert url in str(e.value) and '--detector-weights coco' in str(e.value)
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(UserError, match=r'empty \(0 bytes\)'):
        load_detector_checkpoint(det, str(tmp_path / 'empty.pth'), 'fasterrcnn')
    with open(coco['fasterrcnn']['path'], 'rb') as f:
        (tmp_path / 'cut.pth').write_bytes(f.read(100000))
    with pytest.raises(UserError, match='not a readable PyTorch file .truncated or corrupt') as e:
        load_detector_checkpoint(det, str(tmp_path / 'cut.pth'), 'fasterrcnn')
    assert 'download it again' in str(e.value) and url in str(e.value)
    with pytest.raises(UserError, match='missing keys.*unexpected keys') as e:  # a RetinaNet file
        load_detector_checkpoint(det, coco['retinanet']['path'], 'fasterrcnn')
    assert 'fasterrcnn_resnet50_fpn' in str(e.value) and '--model fasterrcnn' in str(e.value)
    two = dict(coco['fasterrcnn']['state'])
    two['roi_heads.box_predictor.cls_score.weight'] = torch.zeros(2, 1024)
    torch.save(two, tmp_path / 'two.pth')
    with pytest.raises(UserError, match=r'1 shape mismatches.*cls_score.weight \(2, 1024\) vs \(91, 1024\)'):
        load_detector_checkpoint(det, str(tmp_path / 'two.pth'), 'fasterrcnn')
    assert same_tensors(det.state_dict(), before)


# ------------------------------------------------------------------------------------------ label space
def write_coco(root, split, n_images, seed=0):
    """``n_images`` 64 px images with one box of each category (ids 1, 3, 90), boxes and polygons."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    img_dir = root / split
    img_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(n_images):
        img_id = 100 * seed + i + 1
        arr = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
        for j, cat in enumerate(CATEGORIES):
            x, y = 4 + 20 * j, 8 + int(rng.integers(0, 20))
            arr[y:y + 16, x:x + 14, j] = 220
            anns.append({'id': len(anns) + 1, 'image_id': img_id, 'category_id': cat['id'],
                         'bbox': [x, y, 14, 16], 'area': 224, 'iscrowd': 0,
                         'segmentation': [[x, y, x + 14, y, x + 14, y + 16, x, y + 16]]})
        Image.fromarray(arr).save(img_dir / f'{img_id}.png')
        images.append({'id': img_id, 'file_name': f'{img_id}.png', 'height': SIZE, 'width': SIZE})
    (root / 'annotations').mkdir(exist_ok=True)
    ann_file = root / 'annotations' / f'instances_{split}.json'
    ann_file.write_text(json.dumps({'images': images, 'annotations': anns, 'categories': CATEGORIES}))
    return str(img_dir), str(ann_file)


def test_coco_ids_label_space_and_evaluation(tmp_path):
    """label_space='coco_ids': targets carry the category ids (gaps kept), evaluation scores them as those
    categories: perfect predictions give AP 100, the right boxes with the contiguous labels do not."""
    img_dir, ann_file = write_coco(tmp_path, 'val2017', 2)
    ds = CocoDetectionDataset(img_dir, ann_file, label_space='coco_ids')
    img, t = ds[0]
    assert t['labels'].tolist() == [1, 3, 90] and ds.num_classes == 91
    assert [c['id'] for c in ds.categories] == [1, 3, 90]
    contiguous = CocoDetectionDataset(img_dir, ann_file)
    assert contiguous[0][1]['labels'].tolist() == [1, 2, 3] and contiguous.num_classes == 4
    assert [contiguous.label_to_cat[lab] for lab in (1, 2, 3)] == [1, 3, 90]
    gt = coco_from_dataset(ds)
    assert sorted(gt.getCatIds()) == [1, 3, 90]
    results, wrong = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        out = {'boxes': t['boxes'], 'scores': torch.tensor([0.9, 0.8, 0.7]), 'labels': t['labels'],
               'masks': t['masks'][:, None].float()}
        results += predictions_to_coco(t['image_id'], out)
        wrong += predictions_to_coco(t['image_id'], dict(out, labels=torch.tensor([1, 2, 3])))
    assert coco_ap(gt, results, 'bbox') == pytest.approx({'AP': 1.0, 'AP50': 1.0, 'AP75': 1.0})
    assert coco_ap(gt, results, 'segm')['AP'] == pytest.approx(1.0)
    assert coco_ap(gt, wrong, 'bbox')['AP'] == pytest.approx(1.0 / 3)  # only 'person' (id 1 = label 1) right
    with pytest.raises(ValueError, match='label_space'):
        CocoDetectionDataset(img_dir, ann_file, label_space='ids')


def test_label_space_choice_and_category_checks():
    """COCO detector + COCO dataset -> category ids; a dataset whose labels are no COCO ids is refused unless the
    predictors are reset; COCO-format categories that are not COCO's (name or unused id) are refused."""
    assert dataset_label_space('coco', True, False) == 'coco_ids'
    assert dataset_label_space('coco', False, False) == 'contiguous'
    assert dataset_label_space('pennfudan', True, True) == 'contiguous'
    with pytest.raises(UserError, match='--reset-predictors'):
        dataset_label_space('pennfudan', True, False)
    names = coco_category_names('maskrcnn')
    assert len(names) == 91 and names[90] == 'toothbrush' and names[12] == 'N/A'
    check_coco_categories(CATEGORIES, names, 'x.json')
    with pytest.raises(UserError, match="category 3 'dog' of x.json.*COCO's category 3 is 'car'.*--reset-pred"):
        check_coco_categories([{'id': 3, 'name': 'dog'}], names, 'x.json')
    with pytest.raises(UserError, match='no category 12'):
        check_coco_categories([{'id': 12, 'name': 'street sign'}], names, 'x.json')


def test_coco_detector_flag_checks():
    check_coco_detector_args('maskrcnn', 'tv_resnet50', False, '', dict(COCO_FIXED_FLAGS))
    with pytest.raises(UserError, match='--backbone tv_resnet50'):
        check_coco_detector_args('maskrcnn', 'resnet50', False, '', {})
    with pytest.raises(UserError, match='drop --pretrained'):
        check_coco_detector_args('maskrcnn', 'tv_resnet50', True, '', {})
    with pytest.raises(UserError, match='--fpn-channels 128 would change'):
        check_coco_detector_args('maskrcnn', 'tv_resnet50', False, '', dict(COCO_FIXED_FLAGS, fpn_channels=128))
    with pytest.raises(UserError, match='--detector-checkpoint /no/such.pth not found'):
        check_coco_detector_args('retinanet', 'tv_resnet50', False, '/no/such.pth', {})


def test_cli_refuses_coco_weights_on_pennfudan(tmp_path, capsys):
    """Exit 2 with the fix, before any data is read or anything downloaded or written."""
    for extra, expect in ((['--dataset', 'pennfudan'], '--reset-predictors'),
                          (['--dataset', 'coco', '--backbone', 'resnet50'], '--backbone tv_resnet50'),
                          (['--dataset', 'coco', '--reset-predictors', '--detector-weights', 'none'],
                           '--reset-predictors replaces')):
        argv = ['--data-dir', str(tmp_path), '--model', 'maskrcnn', '--backbone', 'tv_resnet50',
                '--detector-weights', 'coco', '--output', str(tmp_path / 'out')] + extra
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and expect in err, err
    assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------------- reset, consistency
def replica_batch(tmp_path, base=None, m=2, n_images=2, label_space='coco_ids'):
    if base is None:
        base = CocoDetectionDataset(*write_coco(tmp_path, 'train2017', n_images), label_space=label_space)
    ds = ReplicaDataset(base, m, ReplicaAugment(0.5, (1.0, 1.0), 0.0), seed=0)
    return replica_collate([ds[i] for i in range(n_images)])


@pytest.mark.parametrize('model,match', [('maskrcnn', 'gt'), ('retinanet', 'predicted')])
def test_consistency_wrapper_trains_the_coco_detectors(coco, tmp_path, model, match):
    """InstanceLossTransform on torchvision's COCO detectors, unchanged, with COCO-id targets: torchvision's losses +
    the consistency term, finite, and gradients reach the trainable weights (and not the frozen stem). (R-CNN with
    predicted matching: the Mask R-CNN* training step below.)"""
    det = coco[model]['ours']
    images, targets, params = replica_batch(tmp_path, n_images=1)
    net = InstanceLossTransform(det, 2, rho=1.0, match=match)
    net.train()
    try:
        losses = net(images, targets, params)
        assert 'loss_consistency' in losses and all(bool(torch.isfinite(v)) for v in losses.values())
        sum(losses.values()).backward()
        assert det.backbone.body.layer4[0].conv1.weight.grad.abs().sum() > 0
        assert det.backbone.body.conv1.weight.grad is None
        if match == 'gt':  # annotated instances always give rows: the term is measured
            assert net.last_parts['groups'] > 0
    finally:
        det.zero_grad(set_to_none=True)


@pytest.mark.parametrize('model', ['maskrcnn', 'retinanet'])
def test_reset_predictors_keeps_everything_else(coco, tmp_path, model):
    """--reset-predictors: fresh class-specific predictors for K classes (torchvision's fine-tuning tutorial), every
    other tensor the COCO detector's; the detector then trains on contiguous labels."""
    det = copy.deepcopy(coco[model]['ours'])
    replaced = reset_class_predictors(det, 4)
    state, old = det.state_dict(), coco[model]['ours'].state_dict()
    changed = {k for k in old if k not in state or state[k].shape != old[k].shape or not torch.equal(state[k], old[k])}
    assert changed and all(any(k.startswith(r + '.') for r in replaced) for k in changed)
    if model == 'maskrcnn':
        assert replaced == ['roi_heads.box_predictor', 'roi_heads.mask_predictor']
        assert det.roi_heads.box_predictor.cls_score.out_features == 4
        assert det.roi_heads.box_predictor.bbox_pred.out_features == 16
        assert det.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    else:
        assert replaced == ['head.classification_head.cls_logits']
        assert det.head.classification_head.cls_logits.out_channels == 9 * 4
    images, targets, params = replica_batch(tmp_path, label_space='contiguous', n_images=1)
    assert max(int(t['labels'].max()) for t in targets) == 3
    net = InstanceLossTransform(det, 2, rho=1.0, match='predicted')
    losses = net(images, targets, params)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    det.eval()
    with torch.no_grad():
        out = det([images[0]])[0]
    assert out['labels'].numel() == 0 or int(out['labels'].max()) < 4


# ------------------------------------------------------------------------------------------- freezing
def test_freeze_unknown_name_lists_valid_ones(coco):
    det = coco['fasterrcnn']['ours']
    with pytest.raises(UserError, match="'rpnn' is not a submodule.*transform, backbone, rpn, roi_heads"):
        freeze_submodules(det, ['rpn', 'rpnn'])
    with pytest.raises(UserError, match=r"'backbone.fpnx'.*backbone.body, backbone.fpn"):
        freeze_submodules(det, ['backbone.fpnx'])
    assert all(p.requires_grad for p in det.rpn.parameters())  # nothing frozen by a refused call


def test_frozen_batchnorm_keeps_its_statistics(tmp_path):
    """A frozen submodule with (trainable) BatchNorm keeps its running statistics through a training step."""
    torch.manual_seed(0)
    det = build_detector('fasterrcnn', 'mobilenetv3_small_050', 4, min_size=SIZE, max_size=SIZE, fpn_channels=16,
                         box_head_dim=32, rpn_post_nms_top_n_train=20, box_batch_size_per_image=16)
    frozen = freeze_submodules(det, ['backbone.body'])
    assert frozen and all(n.startswith('backbone.body.') for n in frozen)
    stats = {k: v.clone() for k, v in det.state_dict().items() if k.startswith('backbone.body.')}
    images, targets, _ = replica_batch(tmp_path, label_space='contiguous', m=1)
    det.train()
    hold_frozen_norms(det, ['backbone.body'])
    sum(det(images, targets).values()).backward()
    assert same_tensors({k: v for k, v in det.state_dict().items() if k.startswith('backbone.body.')}, stats)
    assert all(p.grad is None for p in det.backbone.body.parameters())
    assert det.backbone.fpn.training and det.rpn.training  # only the norms are held in eval mode


def write_pennfudan(root, n=3, size=64):
    """A PennFudanPed-layout folder: PNGImages/*.png and PedMasks/*_mask.png (one pixel value per pedestrian)."""
    from PIL import Image
    (root / 'PNGImages').mkdir(parents=True)
    (root / 'PedMasks').mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        for j, x in enumerate((6 + 3 * i, 34)):
            mask[8:56, x:x + 18] = j + 1
            img[8:56, x:x + 18] += 120
        Image.fromarray(img).save(root / 'PNGImages' / f'P{i:03d}.png')
        Image.fromarray(mask).save(root / 'PedMasks' / f'P{i:03d}_mask.png')


def test_mask_rcnn_star_step_freezes_backbone_and_rpn(coco, tmp_path, caplog):
    """Table 4's Mask R-CNN* recipe (PennFudanPed) through train_detection's main: torchvision's COCO Mask R-CNN from
    --detector-checkpoint, fresh predictors for the pedestrian class, --freeze backbone rpn, the original batching with
    crop and copy-paste, area-greedy matching. In the saved checkpoint the backbone (body + FPN) and the RPN are
    bit-identical to the file, the RoI heads changed, and the optimizer holds only the RoI heads' parameters."""
    data = tmp_path / 'PennFudanPed'
    write_pennfudan(data)  # 1 training image: one step of 1 image x 2 replicas (random R50 features are huge)
    argv = ['-c', os.path.join(REPO, 'configs', 'detection', 'pennfudan_maskrcnn_star_lt.yaml'),
            '--data-dir', str(data), '--detector-checkpoint', coco['maskrcnn']['path'], '--img-size', str(SIZE),
            '--val-size', '2', '-b', '1', '--epochs', '1', '--lr', '0.01', '--workers', '0', '--rpn-pre-nms', '50',
            '--rpn-post-nms', '50', '--box-batch-per-image', '8', '--threads', '1', '--no-plot',
            '--output', str(tmp_path / 'out'), '--experiment', 'star']
    with caplog.at_level('INFO'):  # not init_skipped: the fresh predictors need their initialisation
        assert main(argv) == 0
    assert 'fresh class predictors' in caplog.text
    ck = torch.load(tmp_path / 'out' / 'star' / 'last.pth.tar', map_location='cpu', weights_only=False)
    a = ck['args']
    assert a.freeze == ['backbone', 'rpn'] and a.lt_match == 'area-greedy' and a.lt_epoch == 'original'
    assert a.lr == 0.01 and a.copy_paste == 0.5 and a.crop_scale == [0.5, 1.0] and a.reset_predictors
    after, before = ck['state_dict'], coco['maskrcnn']['state']
    for name, v in after.items():
        if name.startswith(('backbone.', 'rpn.')):
            assert torch.equal(v, before[name]), f'{name} changed'
    changed = [n for n in after if n.startswith('roi_heads.box_head') and not torch.equal(after[n], before[n])]
    assert changed
    trainable = [n for n, _ in coco['maskrcnn']['ours'].named_parameters() if n.startswith('roi_heads.')]
    assert len(ck['optimizer']['param_groups'][0]['params']) == len(trainable)


# -------------------------------------------------------------------------------------------- recipes
TABLE6 = sorted(os.path.join(REPO, 'configs', 'detection', f'table6_{m}_{v}{loss}.yaml')
                for m in ('fasterrcnn', 'fasterrcnn_mbv3', 'retinanet') for v in ('', 'heads_scratch_')
                for loss in ('lt', 'multi'))


@pytest.mark.parametrize('path', TABLE6, ids=os.path.basename)
def test_table6_recipes(path):
    """Each Table 6 recipe parses through the real parser, passes train_detection's checks (no weights loaded) and
    states the paper's protocol: torchvision's COCO detector (R50-FPN Faster R-CNN and RetinaNet, MobileNetV3-L FPN
    Faster R-CNN), LT-v1, m = 2, flips only, the reference recipe's last lr held constant, at most 20 epochs, SGD
    0.9 / 1e-4; the published heads with area-ratio + greedy matching, or fresh predictors ("heads trained from
    scratch") with Resort. The *_multi twin differs only in the loss."""
    a = parse_args(['-c', path, '--data-dir', '/nonexistent'])
    check_match_args(a.model, a.lt_match, a.lt_match_iou, a.lt_area_ratio)
    check_coco_detector_args(a.model, a.backbone, a.pretrained, a.detector_checkpoint,
                             {k: getattr(a, k) for k in COCO_FIXED_FLAGS})
    scratch = '_heads_scratch_' in os.path.basename(path)
    mbv3 = '_mbv3_' in os.path.basename(path)
    assert a.detector_weights == 'coco' and a.dataset == 'coco'
    assert a.backbone == ('tv_mobilenet_v3_large' if mbv3 else 'tv_resnet50')
    assert a.reset_predictors == scratch and a.freeze == []
    assert dataset_label_space(a.dataset, True, a.reset_predictors) == ('contiguous' if scratch else 'coco_ids')
    assert a.lt_epoch == 'v1' and a.aug_repeats == 2 and a.lt_match == ('resort' if scratch else 'area-greedy')
    assert a.hflip == 0.5 and a.scale == [1.0, 1.0] and a.translate == 0.0 and a.crop_scale is None
    assert a.copy_paste == 0.0
    assert a.lr == pytest.approx({'retinanet': 0.01, 'fasterrcnn': 0.02}[a.model] * 0.1 * 0.1)
    assert a.lr_steps == [] and a.warmup_iters == 0 and a.momentum == 0.9 and a.weight_decay == 1e-4
    assert a.batch_size == 16 and a.epochs == 20
    expected_loss = 'losstransform' if path.endswith('_lt.yaml') else 'multi'
    assert a.loss == expected_loss
    with open(path) as f:
        mine = yaml.safe_load(f)
    with open(path.replace('_lt.yaml', '_multi.yaml') if expected_loss == 'losstransform'
              else path.replace('_multi.yaml', '_lt.yaml')) as f:
        twin = yaml.safe_load(f)
    assert {k for k in set(mine) | set(twin) if mine.get(k) != twin.get(k)} == {'loss', 'experiment'}
