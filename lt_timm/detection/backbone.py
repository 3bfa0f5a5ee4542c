"""Backbones for torchvision's detectors: any timm model (``features_only=True``) + torchvision's FPN.

``build_backbone('resnet50')`` (a timm name) returns a :class:`TimmFPNBackbone`: the timm feature extractor
at strides 4/8/16/32 (whatever of those it has), a ``torchvision.ops.FeaturePyramidNetwork`` on top and a
max-pool ``'pool'`` level, exposing ``out_channels`` as torchvision's ``FasterRCNN``/``MaskRCNN`` require.
Names prefixed ``tv_`` use torchvision's own ImageNet architectures, as the paper's Table 4 does (its footnote 2:
"As of v0.14, TorchVision offers the model architectures for ImageNet. We extract their backbone with feature pyramid
network (FPN) on top of Mask R-CNN."): :func:`torchvision_fpn_backbone` builds torchvision's ``BackboneWithFPN`` on
``tv_convnext_tiny``, ``tv_densenet121``, ``tv_efficientnet_b4``, ``tv_googlenet``, ``tv_inception_v3``,
``tv_mnasnet1_0``, ``tv_resnet50``, ``tv_shufflenet_v2_x1_0``, ``tv_wide_resnet50_2`` (and the other sizes of those
families), taking the output of the last layer at each stride (:data:`TV_FEATURE_LAYERS`; ``strides`` picks which
feed the FPN). ``tv_mobilenet_v3_large`` / ``_small`` use torchvision's own MobileNetV3 FPN extractor.

``extra='none'`` builds an FPN without extra levels: the paper's second anchor setting for Table 4,
``((32, 64, 128, 256, 512), (32, 64, 128, 256, 512))`` (ConvNeXt-tiny, EfficientNetB4, InceptionV3, MNASNet1_0,
ShuffleNetV2), has two entries, and torchvision's ``AnchorGenerator`` takes one entry per feature map, so that FPN
has exactly two outputs: we take strides 16 and 32 (C4, C5) without the max-pool level (:data:`TABLE4_FPN`).

``extra='p6p7'`` builds the RetinaNet variant (as torchvision's ``retinanet_resnet50_fpn_v2``): strides 8/16/32
(timm; ResNet layers 2-4) and two extra stride-2 convolutions P6, P7 on the FPN's last output
(``torchvision.ops.feature_pyramid_network.LastLevelP6P7``). ``build_detector('retinanet', ...)`` uses it.

Weights are loaded only with ``pretrained=True`` (never in tests). With pretrained weights BatchNorm is
frozen (detection batches are tiny); from scratch it stays trainable.

torchvision's COCO detectors (the paper's Table 6 protocol: fine-tune torchvision's COCO Faster R-CNN, RetinaNet and
Mask R-CNN): :func:`build_coco_detector` builds exactly ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` /
``retinanet_resnet50_fpn`` (v1) as torchvision's builder makes them for ``weights=COCO_V1`` (ResNet-50 with
``FrozenBatchNorm2d``, conv1 + layer1 frozen, 91 classes = COCO category ids, torchvision's anchors and transform),
without weights; :func:`load_coco_weights` loads ``*_Weights.COCO_V1`` through torchvision's weights API (download
into the torch hub cache), :func:`reset_class_predictors` replaces the class-specific predictors for another label
set (torchvision's fine-tuning tutorial).
"""
import math
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ['TimmFPNBackbone', 'torchvision_fpn_backbone', 'build_backbone', 'build_detector', 'build_retinanet',
           'extra_fpn_block', 'anchor_generator_sizes', 'scaled_anchor_sizes', 'tv_feature_layers',
           'build_coco_detector', 'coco_detector_name', 'coco_detector_weights', 'coco_category_names',
           'load_coco_weights', 'set_frozen_bn_eps', 'reset_class_predictors', 'COCO_DETECTORS', 'COCO_BACKBONE',
           'COCO_DETECTOR_BUILDERS', 'DETECTOR_MODELS', 'EXTRA_LEVELS', 'TV_FEATURE_LAYERS', 'TABLE4_BACKBONES',
           'TABLE4_FPN', 'FPNSetting']

DETECTOR_MODELS = ('maskrcnn', 'fasterrcnn', 'retinanet')
# R-CNN: a max-pool level; RetinaNet: P6 and P7 convolutions; none: the backbone's levels only
EXTRA_LEVELS = ('pool', 'p6p7', 'none')
_NUM_EXTRA = {'pool': 1, 'p6p7': 2, 'none': 0}  # FPN levels each adds after the backbone's
# --model -> torchvision's builder of the COCO detector on ResNet-50 (v1: the architectures the COCO_V1 weights fit)
COCO_DETECTORS = {'fasterrcnn': 'fasterrcnn_resnet50_fpn', 'maskrcnn': 'maskrcnn_resnet50_fpn',
                  'retinanet': 'retinanet_resnet50_fpn'}
COCO_BACKBONE = 'tv_resnet50'  # the default --backbone of the COCO detectors
# (--model, --backbone) -> torchvision's COCO detector: the three R50-FPN ones and Table 6's MobileNetV3-L FPN
COCO_DETECTOR_BUILDERS = {**{(m, COCO_BACKBONE): b for m, b in COCO_DETECTORS.items()},
                          ('fasterrcnn', 'tv_mobilenet_v3_large'): 'fasterrcnn_mobilenet_v3_large_fpn'}

# torchvision ImageNet architectures as FPN backbones: family prefix -> (builder kwargs from scratch, the attribute
# whose children are the stages ('' = the model itself), {stride: the child whose output is the last at that
# stride}). Inception-v3 pads nothing, so its strides are nominal (its maps are a few pixels smaller).
TV_FEATURE_LAYERS: Dict[str, Tuple[Dict, str, Dict[int, str]]] = {
    'resnet': ({}, '', {4: 'layer1', 8: 'layer2', 16: 'layer3', 32: 'layer4'}),
    'resnext': ({}, '', {4: 'layer1', 8: 'layer2', 16: 'layer3', 32: 'layer4'}),
    'wide_resnet': ({}, '', {4: 'layer1', 8: 'layer2', 16: 'layer3', 32: 'layer4'}),
    'densenet': ({}, 'features', {4: 'denseblock1', 8: 'denseblock2', 16: 'denseblock3', 32: 'norm5'}),
    'googlenet': ({'aux_logits': False, 'init_weights': True}, '',
                  {4: 'conv3', 8: 'inception3b', 16: 'inception4e', 32: 'inception5b'}),
    'inception_v3': ({'aux_logits': False, 'init_weights': True}, '',
                     {4: 'Conv2d_4a_3x3', 8: 'Mixed_5d', 16: 'Mixed_6e', 32: 'Mixed_7c'}),
    'convnext_': ({}, 'features', {4: '1', 8: '3', 16: '5', 32: '7'}),
    'efficientnet_b': ({}, 'features', {4: '2', 8: '3', 16: '5', 32: '8'}),
    'mnasnet': ({}, 'layers', {4: '8', 8: '9', 16: '11', 32: '16'}),
    'shufflenet_v2': ({}, '', {4: 'maxpool', 8: 'stage2', 16: 'stage3', 32: 'conv5'}),
}
# The paper's Table 4 (section 4.1.6): backbone -> (initial lr, FPN strides, extra level, anchor sizes per level).
# "For DenseNet121, GoogLeNet, ResNet-50 and WideResNet50-based FPNs, we set anchors as ((32,), (64,), (128,), (256,),
# (512,)) ... For ConvNeXt-tiny, EfficientNetB4, InceptionV3, MNASNet1_0, and ShuffleNetV2-based FPNs, we set anchors
# as ((32, 64, 128, 256, 512), (32, 64, 128, 256, 512))." "For DensNet121, EfficientNetB4, GoogLeNet, ResNet50,
# ShuffleNetV2, and WideResNet50, we start training with an initial learning rate of 0.01. Other models start with
# 0.0025."
class FPNSetting(NamedTuple):
    """An FPN layout: the backbone strides that feed it, its extra level, and the anchor sizes of each level."""
    strides: Tuple[int, ...]
    extra: str
    anchor_sizes: Tuple[Tuple[int, ...], ...]


TABLE4_FPN = {  # 4 backbone levels + max-pool = the 5 levels of the first setting; 2 levels for the second
    'five_levels': FPNSetting((4, 8, 16, 32), 'pool', ((32,), (64,), (128,), (256,), (512,))),
    'two_levels': FPNSetting((16, 32), 'none', ((32, 64, 128, 256, 512), (32, 64, 128, 256, 512))),
}
TABLE4_BACKBONES = {  # --backbone -> (initial lr, FPN setting)
    'tv_convnext_tiny': (0.0025, TABLE4_FPN['two_levels']),
    'tv_densenet121': (0.01, TABLE4_FPN['five_levels']),
    'tv_efficientnet_b4': (0.01, TABLE4_FPN['two_levels']),
    'tv_googlenet': (0.01, TABLE4_FPN['five_levels']),
    'tv_inception_v3': (0.0025, TABLE4_FPN['two_levels']),
    'tv_mnasnet1_0': (0.0025, TABLE4_FPN['two_levels']),
    'tv_resnet50': (0.01, TABLE4_FPN['five_levels']),
    'tv_shufflenet_v2_x1_0': (0.01, TABLE4_FPN['two_levels']),
    'tv_wide_resnet50_2': (0.01, TABLE4_FPN['five_levels']),
}


def extra_fpn_block(extra: str, channels: int) -> Optional[nn.Module]:
    """The FPN's extra levels: ``'pool'`` (one max-pooled level, Faster/Mask R-CNN), ``'p6p7'`` (RetinaNet) or
    ``'none'`` (None: the backbone's levels only)."""
    if extra == 'pool':
        return LastLevelMaxPool()
    if extra == 'p6p7':
        return LastLevelP6P7(channels, channels)
    if extra == 'none':
        return None
    raise ValueError(f'extra FPN levels must be one of {EXTRA_LEVELS}, got {extra!r}.')


class TimmFPNBackbone(nn.Module):
    """timm ``features_only`` model -> FPN. Output: ``OrderedDict`` '0'..'k-1' + 'pool' (``extra='pool'``) or
    + 'p6', 'p7' (``extra='p6p7'``), ``out_channels`` each."""

    def __init__(self, model_name: str, out_channels: int = 256, pretrained: bool = False,
                 strides: Tuple[int, ...] = (4, 8, 16, 32), extra: str = 'pool', **kwargs):
        super().__init__()
        import timm
        probe = timm.create_model(model_name, features_only=True, pretrained=False, **kwargs)
        red = probe.feature_info.reduction()
        out_indices = tuple(i for i, r in enumerate(red) if r in strides)
        if not out_indices:
            raise ValueError(f'timm model {model_name!r} has no features at strides {strides} (has {red}).')
        del probe
        self.body = timm.create_model(
            model_name, features_only=True, pretrained=pretrained, out_indices=out_indices, **kwargs)
        if pretrained:
            from timm.utils.model import freeze_batch_norm_2d
            self.body = freeze_batch_norm_2d(self.body)
        in_channels = self.body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_fpn_block(extra, out_channels))
        self.out_channels = out_channels
        self.num_levels = len(in_channels)
        self.num_extra = _NUM_EXTRA[extra]

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def tv_feature_layers(name: str) -> Tuple[Dict, str, Dict[int, str]]:
    """:data:`TV_FEATURE_LAYERS` entry of torchvision architecture ``name`` (``resnet50``, ``densenet121``, ...):
    builder kwargs from scratch, the attribute holding the stages, ``{stride: child name}``."""
    for prefix, entry in TV_FEATURE_LAYERS.items():
        if name.startswith(prefix):
            return entry
    raise ValueError(f'unknown torchvision backbone tv_{name}; use one of the families '
                     f'{", ".join("tv_" + p.rstrip("_") + "*" for p in TV_FEATURE_LAYERS)}, tv_mobilenet_v3_large '
                     f'or a timm model name.')


def _strip_aux_heads(model: nn.Module) -> None:
    """GoogLeNet / Inception-v3 auxiliary classifiers are not features: drop them (torchvision's builders keep
    Inception-v3's with pretrained weights)."""
    for attr in ('aux1', 'aux2', 'AuxLogits'):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, 'aux_logits'):
        model.aux_logits = False


def _freeze_resnet_stem(model: nn.Module) -> None:
    """torchvision's ``trainable_layers=3`` for pretrained ResNets: conv1 and layer1 get no gradient."""
    for pname, p in model.named_parameters():
        if not pname.startswith(('layer2', 'layer3', 'layer4')):
            p.requires_grad_(False)


def _stage_channels(body: nn.Module, names: Sequence[str]) -> List[int]:
    """Output channels of the children ``names`` of ``body`` (run in order, as torchvision's
    ``IntermediateLayerGetter`` runs them), from one dry run at 96 px (Inception-v3 needs >= 75)."""
    was, out, x = body.training, {}, torch.zeros(1, 3, 96, 96)
    body.eval()
    with torch.no_grad():
        for child, m in body.named_children():
            x = m(x)
            out[child] = int(x.shape[1])
            if all(n in out for n in names):
                break
    body.train(was)
    return [out[n] for n in names]


def torchvision_fpn_backbone(name: str, strides: Sequence[int] = (4, 8, 16, 32), extra: str = 'pool',
                             out_channels: int = 256, pretrained: bool = False) -> nn.Module:
    """torchvision's ``BackboneWithFPN`` on ImageNet architecture ``name`` (``torchvision.models.get_model``,
    ``weights=None`` unless ``pretrained``): the outputs of the last layer at each of ``strides``
    (:data:`TV_FEATURE_LAYERS`) feed ``torchvision.ops.FeaturePyramidNetwork`` with ``extra`` levels. From scratch
    BatchNorm stays trainable (the paper's Table 4); ``pretrained`` loads the ``DEFAULT`` weights and freezes
    BatchNorm (and a ResNet's stem + layer1, as torchvision's ``trainable_layers=3``). Output: ``OrderedDict``
    '0'..'k-1' (+ 'pool' / 'p6', 'p7'), ``out_channels`` each; ``num_levels`` = ``len(strides)``."""
    import torchvision.models as tvm
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    kwargs, stages, layers = tv_feature_layers(name)
    if not strides or any(s not in layers for s in strides):
        raise ValueError(f'tv_{name} has feature levels at strides {sorted(layers)}; got strides {list(strides)}.')
    weights = tvm.get_model_weights(name).DEFAULT if pretrained else None
    model = tvm.get_model(name, weights=weights, **({} if pretrained else kwargs))
    _strip_aux_heads(model)
    if pretrained and name.startswith(('resnet', 'resnext', 'wide_resnet')):
        _freeze_resnet_stem(model)
    body = getattr(model, stages) if stages else model
    if pretrained:
        from timm.utils.model import freeze_batch_norm_2d
        body = freeze_batch_norm_2d(body)
    names = [layers[s] for s in strides]
    bb = BackboneWithFPN(body, {n: str(i) for i, n in enumerate(names)}, _stage_channels(body, names), out_channels,
                         extra_blocks=extra_fpn_block(extra, out_channels))
    if extra == 'none':
        bb.fpn.extra_blocks = None  # BackboneWithFPN puts a max-pool level where it is given None
    bb.num_levels = len(strides)
    bb.strides = tuple(strides)
    return bb


def _tv_mobilenet_backbone(name: str, pretrained: bool, extra: str) -> nn.Module:
    """torchvision's own MobileNetV3 FPN extractor (the last two stages, both at stride 32, + ``extra``)."""
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops import misc
    import torchvision.models as tvm
    weights = tvm.get_model_weights(name).DEFAULT if pretrained else None
    norm = misc.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    bb = mobilenet_backbone(backbone_name=name, weights=weights, fpn=True, norm_layer=norm,
                            trainable_layers=3 if pretrained else 6, extra_blocks=extra_fpn_block(extra, 256))
    if extra == 'none':
        bb.fpn.extra_blocks = None  # torchvision puts a max-pool level where it is given None
    bb.num_levels = 2
    return bb


def build_backbone(name: str, pretrained: bool = False, out_channels: int = 256, extra: str = 'pool',
                   strides: Optional[Sequence[int]] = None) -> nn.Module:
    """``name``: a timm model name, or ``tv_<torchvision name>``. ``extra``: ``'pool'`` (Faster/Mask R-CNN),
    ``'p6p7'`` (RetinaNet: strides 8/16/32 + P6, P7) or ``'none'``. ``strides``: the backbone levels that feed the
    FPN (default 4/8/16/32; RetinaNet and ShuffleNetV2 8/16/32; the paper's two-level FPN: 16/32 with
    ``extra='none'``). The result
    has ``out_channels``, ``num_levels`` (backbone levels, the RoI pooling levels of the R-CNNs) and ``num_extra``
    (extra FPN levels after them)."""
    if extra not in EXTRA_LEVELS:
        raise ValueError(f'extra FPN levels must be one of {EXTRA_LEVELS}, got {extra!r}.')
    if strides is None:  # ShuffleNetV2's stride-4 level is its stem's max-pool (24 channels): not used by default
        strides = (4, 8, 16, 32) if extra != 'p6p7' and not name.startswith('tv_shufflenet') else (8, 16, 32)
    strides = tuple(int(s) for s in strides)
    if name.startswith('tv_mobilenet_v3'):
        bb = _tv_mobilenet_backbone(name[3:], pretrained, extra)
    elif name.startswith('tv_'):
        bb = torchvision_fpn_backbone(name[3:], strides, extra, out_channels, pretrained)
    else:
        bb = TimmFPNBackbone(name, out_channels=out_channels, pretrained=pretrained, strides=strides, extra=extra)
    bb.num_extra = _NUM_EXTRA[extra]
    return bb


def scaled_anchor_sizes(max_size: int, count: int) -> List[int]:
    """``count`` anchor sizes 32, 64, 128, ... (one per pyramid level, finest first) scaled by ``max_size / 1333``
    (torchvision's default image size) and floored at 8, so reduced-resolution training keeps sensible anchors."""
    f = max_size / 1333.0
    return [max(8, int(round(32 * (2 ** i) * f))) for i in range(count)]


def anchor_generator_sizes(anchor_sizes: Optional[Sequence[Union[int, Sequence[int]]]], num_levels: int,
                           max_size: int, backbone: str = '') -> Tuple[Tuple[int, ...], ...]:
    """The ``sizes`` of torchvision's ``AnchorGenerator``: one tuple per FPN level (finest first, extra levels
    included). ``anchor_sizes`` given: one entry per level, an int (one size) or a sequence (several sizes, e.g. the
    paper's ``((32, 64, 128, 256, 512), (32, 64, 128, 256, 512))``). Default: 32, 64, ..., 512 scaled by
    ``max_size / 1333`` (floored at 8), one per level with >= 5 levels, all five on every level with fewer (as
    torchvision's MobileNetV3 FPN)."""
    if anchor_sizes is None:
        sizes = scaled_anchor_sizes(max_size, max(num_levels, 5))
        return tuple((s,) for s in sizes[:num_levels]) if num_levels >= 5 else (tuple(sizes[:5]),) * num_levels
    if len(anchor_sizes) != num_levels:
        raise ValueError(f'need {num_levels} anchor size entries (one per FPN level of {backbone}), got '
                         f'{list(anchor_sizes)}.')
    per_level = tuple((int(a),) if isinstance(a, (int, float)) else tuple(int(s) for s in a) for a in anchor_sizes)
    if any(not level or min(level) <= 0 for level in per_level):
        raise ValueError(f'anchor sizes must be positive, at least one per level; got {list(anchor_sizes)}.')
    return per_level


def _rcnn_heads(out_channels: int, num_classes: int, mask: bool, mask_head_channels: int,
                box_head_dim: int) -> Dict:
    """Narrower RoI heads than torchvision's defaults (CPU runs), as ``FasterRCNN`` / ``MaskRCNN`` keyword args."""
    heads: Dict = {}
    if box_head_dim != 1024:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        heads['box_head'] = TwoMLPHead(out_channels * 7 * 7, box_head_dim)
        heads['box_predictor'] = FastRCNNPredictor(box_head_dim, num_classes)
        heads['num_classes'] = None  # torchvision requires None when box_predictor is given
    if mask and mask_head_channels != 256:
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        c = int(mask_head_channels)
        heads['mask_head'] = MaskRCNNHeads(out_channels, (c, c, c, c), 1)
        heads['mask_predictor'] = MaskRCNNPredictor(c, c, num_classes)
    return heads


def build_detector(
        model: str = 'maskrcnn', backbone: str = 'resnet50', num_classes: int = 2, pretrained: bool = False,
        min_size: int = 800, max_size: int = 1333, anchor_sizes: Optional[Sequence] = None,
        fpn_channels: int = 256, mask_head_channels: int = 256, box_head_dim: int = 1024,
        fpn_strides: Optional[Sequence[int]] = None, fpn_extra: Optional[str] = None, **kwargs,
) -> nn.Module:
    """torchvision ``MaskRCNN``/``FasterRCNN``/``RetinaNet`` on :func:`build_backbone`, anchors matched to the FPN
    levels.

    ``anchor_sizes``: one entry per pyramid level (finest first, extra levels included), an int or several sizes
    (:func:`anchor_generator_sizes`); default 32, 64, ..., 512 scaled by ``max_size / 1333`` and floored at 8, so
    reduced-resolution training keeps sensible anchors. Aspect ratios 0.5, 1, 2 on every level (torchvision's).
    ``fpn_strides`` / ``fpn_extra``: the backbone levels feeding the FPN and its extra level (default 4/8/16/32 +
    ``'pool'``; the paper's two-level FPN of Table 4: ``(16, 32)``, ``'none'``, see :data:`TABLE4_FPN`). The RoI
    heads pool from the backbone levels (not the extra ones), as torchvision's.
    ``fpn_channels``: FPN width (torchvision's MobileNetV3 FPN is fixed at 256); the RoI heads scale with it, so 128
    makes CPU training ~2-3x cheaper. Extra ``kwargs`` go to torchvision's model (e.g. ``rpn_post_nms_top_n_train``,
    ``box_batch_size_per_image``). ``mask_head_channels`` (4 convs + deconv, torchvision default 256) and
    ``box_head_dim`` (TwoMLPHead width, default 1024) shrink the RoI heads for CPU runs; the defaults build
    torchvision's standard heads.

    ``model='retinanet'``: torchvision's ``RetinaNet`` (P6 from P5 as in ``retinanet_resnet50_fpn_v2``, v1 head) on the
    ``extra='p6p7'`` backbone (P3-P7 for timm and ResNet backbones), three octave scales ``s, s 2^(1/3), s 2^(2/3)``
    x three aspect ratios per location with the base sizes above (or ``anchor_sizes``, one int per level), the
    model's own score threshold / NMS / top-k; ``kwargs`` go to ``RetinaNet`` (e.g. ``detections_per_img``);
    ``mask_head_channels``, ``box_head_dim``, ``fpn_strides`` and ``fpn_extra`` do not apply.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    if model not in DETECTOR_MODELS:
        raise ValueError(f'--model must be one of {DETECTOR_MODELS}, got {model!r}.')
    if model == 'retinanet':
        return build_retinanet(backbone, num_classes, pretrained, min_size, max_size, anchor_sizes, fpn_channels,
                               **kwargs)
    bb = build_backbone(backbone, pretrained=pretrained, out_channels=fpn_channels, extra=fpn_extra or 'pool',
                        strides=fpn_strides)
    n = bb.num_levels + bb.num_extra
    sizes = anchor_generator_sizes(anchor_sizes, n, max_size, backbone)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * n)
    names = [str(i) for i in range(bb.num_levels)]
    common = dict(num_classes=num_classes, min_size=min_size, max_size=max_size, rpn_anchor_generator=anchors,
                  box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2), **kwargs)
    common.update(_rcnn_heads(bb.out_channels, num_classes, model == 'maskrcnn', mask_head_channels, box_head_dim))
    if model == 'maskrcnn':
        return MaskRCNN(bb, mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2), **common)
    return FasterRCNN(bb, **common)


def build_retinanet(backbone: str, num_classes: int, pretrained: bool = False, min_size: int = 800,
                    max_size: int = 1333, anchor_sizes: Optional[List[int]] = None, fpn_channels: int = 256,
                    **kwargs) -> nn.Module:
    """torchvision ``RetinaNet`` on ``build_backbone(backbone, extra='p6p7')``; see :func:`build_detector`."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    bb = build_backbone(backbone, pretrained=pretrained, out_channels=fpn_channels, extra='p6p7')
    n = bb.num_levels + bb.num_extra
    if anchor_sizes is None:
        bases = scaled_anchor_sizes(max_size, n)
    else:
        if len(anchor_sizes) != n:
            raise ValueError(f'need {n} anchor sizes (one per RetinaNet FPN level of {backbone}), got {anchor_sizes}.')
        bases = [int(s) for s in anchor_sizes]
    sizes = tuple((s, int(s * 2 ** (1.0 / 3)), int(s * 2 ** (2.0 / 3))) for s in bases)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * n)
    return RetinaNet(bb, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors, **kwargs)


# ------------------------------------------------------------------------------- torchvision's COCO detectors
def coco_detector_name(model: str, backbone: str = COCO_BACKBONE) -> str:
    """torchvision's builder name of the COCO detector for ``--model`` on ``--backbone``
    (:data:`COCO_DETECTOR_BUILDERS`); ValueError naming the choices otherwise."""
    key = (model, backbone)
    if key not in COCO_DETECTOR_BUILDERS:
        choices = ', '.join(f'--model {m} --backbone {b}' for m, b in COCO_DETECTOR_BUILDERS)
        raise ValueError(f'no torchvision COCO detector for --model {model} --backbone {backbone}; use one of: '
                         f'{choices}.')
    return COCO_DETECTOR_BUILDERS[key]


def coco_detector_weights(model: str, backbone: str = COCO_BACKBONE):
    """torchvision's ``COCO_V1`` weights enum member of the COCO detector for ``--model`` / ``--backbone`` (``url``,
    ``meta``, ...; nothing is downloaded here)."""
    from torchvision.models import get_model_weights
    return get_model_weights(coco_detector_name(model, backbone)).COCO_V1


def coco_category_names(model: str = 'fasterrcnn', backbone: str = COCO_BACKBONE) -> List[str]:
    """The COCO detector's class names by output index = COCO category id (``'__background__'`` at 0, ``'N/A'``
    at the ids COCO leaves unused): torchvision's ``COCO_V1.meta['categories']``, 91 entries."""
    return list(coco_detector_weights(model, backbone).meta['categories'])


def set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    """Set ``eps`` of every ``FrozenBatchNorm2d``: torchvision sets 0.0 for the R50-FPN COCO_V1 weights (they were
    trained with a FrozenBatchNorm2d that had no eps; its ``overwrite_eps``)."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps


def _coco_mobilenet_v3_detector(min_size: int, max_size: int, trainable_backbone_layers: int, **kwargs) -> nn.Module:
    """``fasterrcnn_mobilenet_v3_large_fpn(weights=COCO_V1)`` without the weights: MobileNetV3-Large with
    ``FrozenBatchNorm2d`` (torchvision's default eps, not overwritten for these weights), its FPN extractor (two
    stride-32 levels + max-pool), five anchor sizes on each of the three levels, ``rpn_score_thresh`` 0.05."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d
    bb = mobilenet_backbone(backbone_name='mobilenet_v3_large', weights=None, fpn=True, norm_layer=FrozenBatchNorm2d,
                            trainable_layers=trainable_backbone_layers)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    kwargs = {'rpn_score_thresh': 0.05, **kwargs}
    return FasterRCNN(bb, num_classes=len(coco_category_names('fasterrcnn', 'tv_mobilenet_v3_large')),
                      min_size=min_size, max_size=max_size, rpn_anchor_generator=anchors, **kwargs)


def build_coco_detector(model: str, min_size: int = 800, max_size: int = 1333, trainable_backbone_layers: int = 3,
                        frozen_bn_eps: Optional[float] = None, backbone: str = COCO_BACKBONE, **kwargs) -> nn.Module:
    """torchvision's COCO detector for ``model`` (``'fasterrcnn'`` | ``'maskrcnn'`` | ``'retinanet'``) on ``backbone``
    (``tv_resnet50``; Faster R-CNN also ``tv_mobilenet_v3_large``), built as torchvision's builder
    (:data:`COCO_DETECTOR_BUILDERS`) builds it for ``weights=COCO_V1``, without loading weights.

    The paper's Table 6 fine-tunes these detectors. The R50-FPN architecture is the v1 one that the ``COCO_V1``
    weights fit: ResNet-50 with ``FrozenBatchNorm2d`` (``eps = frozen_bn_eps``, default 0.0 as torchvision sets for
    COCO_V1), the stem and layer1 frozen (``trainable_backbone_layers=3``, torchvision's default with weights), FPN
    on layers 1-4 + max-pool (R-CNN) or on layers 2-4 + P6, P7 from P5 (RetinaNet), 91 classes (output index = COCO
    category id), torchvision's default anchors, heads and transform (``min_size`` / ``max_size`` 800 / 1333 unless
    given). The MobileNetV3-L FPN one: see :func:`_coco_mobilenet_v3_detector` (its FrozenBatchNorm eps stays
    torchvision's 1e-5 unless ``frozen_bn_eps`` is given). ``kwargs`` go to ``FasterRCNN`` / ``MaskRCNN`` /
    ``RetinaNet`` (settings that do not change the state dict, e.g. ``rpn_post_nms_top_n_train``,
    ``box_detections_per_img``, ``detections_per_img``). Load the weights with :func:`load_coco_weights` or
    ``load_state_dict`` of a torchvision-format state dict.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d
    name = coco_detector_name(model, backbone)
    if name == 'fasterrcnn_mobilenet_v3_large_fpn':
        detector = _coco_mobilenet_v3_detector(min_size, max_size, trainable_backbone_layers, **kwargs)
        if frozen_bn_eps is not None:
            set_frozen_bn_eps(detector, frozen_bn_eps)
        return detector
    classes = {'fasterrcnn': FasterRCNN, 'maskrcnn': MaskRCNN, 'retinanet': RetinaNet}
    retina = model == 'retinanet'
    bb = resnet_fpn_backbone(backbone_name='resnet50', weights=None, norm_layer=FrozenBatchNorm2d,
                             trainable_layers=trainable_backbone_layers,
                             returned_layers=[2, 3, 4] if retina else None,
                             extra_blocks=LastLevelP6P7(256, 256) if retina else None)
    num_classes = len(coco_category_names(model, backbone))
    detector = classes[model](bb, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)
    set_frozen_bn_eps(detector, 0.0 if frozen_bn_eps is None else frozen_bn_eps)
    return detector


def load_coco_weights(detector: nn.Module, model: str, progress: bool = True, backbone: str = COCO_BACKBONE) -> None:
    """Load torchvision's ``COCO_V1`` weights of ``model`` on ``backbone`` into ``detector`` (from
    :func:`build_coco_detector`) through torchvision's own weights API: downloaded once into the torch hub cache,
    hash-checked, as the builder does."""
    weights = coco_detector_weights(model, backbone)
    detector.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))


def reset_class_predictors(detector: nn.Module, num_classes: int) -> List[str]:
    """Replace the class-specific predictors by freshly initialised ones for ``num_classes`` (incl. background), as
    torchvision's fine-tuning tutorial does; everything else keeps its weights. R-CNN: ``roi_heads.box_predictor``
    (class scores + class-specific boxes) and ``roi_heads.mask_predictor``; RetinaNet: the classification head's
    last convolution ``cls_logits`` (RetinaNet's prior-probability init; the box regression is class-agnostic).
    Returns the replaced module names."""
    from torchvision.models.detection import RetinaNet
    if isinstance(detector, RetinaNet):
        head = detector.head.classification_head
        old = head.cls_logits
        num_anchors = old.out_channels // head.num_classes
        new = nn.Conv2d(old.in_channels, num_anchors * num_classes, kernel_size=3, stride=1, padding=1)
        nn.init.normal_(new.weight, std=0.01)
        prior = 0.01  # torchvision's RetinaNetClassificationHead default
        nn.init.constant_(new.bias, -math.log((1 - prior) / prior))
        head.cls_logits = new
        head.num_classes = num_classes
        return ['head.classification_head.cls_logits']
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
    heads = detector.roi_heads
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    replaced = ['roi_heads.box_predictor']
    if getattr(heads, 'mask_predictor', None) is not None:
        deconv = heads.mask_predictor.conv5_mask
        heads.mask_predictor = MaskRCNNPredictor(deconv.in_channels, deconv.out_channels, num_classes)
        replaced.append('roi_heads.mask_predictor')
    return replaced
