"""Backbones for torchvision's detectors: any timm model (``features_only=True``) + torchvision's FPN.

``build_backbone('resnet50')`` (a timm name) returns a :class:`TimmFPNBackbone`: the timm feature extractor
at strides 4/8/16/32 (whatever of those it has), a ``torchvision.ops.FeaturePyramidNetwork`` on top and a
max-pool ``'pool'`` level, exposing ``out_channels`` as torchvision's ``FasterRCNN``/``MaskRCNN`` require.
Names prefixed ``tv_`` use torchvision's own backbones: ``tv_resnet50`` / ``tv_resnet18`` (...),
``tv_mobilenet_v3_large``, ``tv_shufflenet_v2_x1_0`` (timm has no ShuffleNet).

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
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ['TimmFPNBackbone', 'build_backbone', 'build_detector', 'build_retinanet', 'extra_fpn_block',
           'scaled_anchor_sizes', 'build_coco_detector', 'coco_detector_weights', 'coco_category_names',
           'load_coco_weights', 'set_frozen_bn_eps', 'reset_class_predictors', 'COCO_DETECTORS', 'COCO_BACKBONE',
           'DETECTOR_MODELS', 'EXTRA_LEVELS']

DETECTOR_MODELS = ('maskrcnn', 'fasterrcnn', 'retinanet')
EXTRA_LEVELS = ('pool', 'p6p7')  # R-CNN: a max-pool level; RetinaNet: P6 and P7 convolutions
_NUM_EXTRA = {'pool': 1, 'p6p7': 2}  # FPN levels each adds after the backbone's
# --model -> torchvision's builder of the COCO detector (v1: the architectures the COCO_V1 weights fit)
COCO_DETECTORS = {'fasterrcnn': 'fasterrcnn_resnet50_fpn', 'maskrcnn': 'maskrcnn_resnet50_fpn',
                  'retinanet': 'retinanet_resnet50_fpn'}
COCO_BACKBONE = 'tv_resnet50'  # the --backbone of every COCO detector above


def extra_fpn_block(extra: str, channels: int) -> nn.Module:
    """The FPN's extra levels: ``'pool'`` (one max-pooled level, Faster/Mask R-CNN) or ``'p6p7'`` (RetinaNet)."""
    if extra == 'pool':
        return LastLevelMaxPool()
    if extra == 'p6p7':
        return LastLevelP6P7(channels, channels)
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


def _tv_backbone(name: str, pretrained: bool, extra: str = 'pool') -> nn.Module:
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone, mobilenet_backbone
    from torchvision.ops import misc
    norm = misc.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if name.startswith('resnet') or name.startswith('resnext') or name.startswith('wide_resnet'):
        import torchvision.models as tvm
        weights = tvm.get_model_weights(name).DEFAULT if pretrained else None
        layers = [1, 2, 3, 4] if extra == 'pool' else [2, 3, 4]
        bb = resnet_fpn_backbone(backbone_name=name, weights=weights, norm_layer=norm,
                                 trainable_layers=3 if pretrained else 5, returned_layers=layers,
                                 extra_blocks=extra_fpn_block(extra, 256))
        bb.num_levels = len(layers)
        return bb
    if name in ('mobilenet_v3_large', 'mobilenet_v3_small'):
        import torchvision.models as tvm
        weights = tvm.get_model_weights(name).DEFAULT if pretrained else None
        bb = mobilenet_backbone(backbone_name=name, weights=weights, fpn=True, norm_layer=norm,
                                trainable_layers=3 if pretrained else 6, extra_blocks=extra_fpn_block(extra, 256))
        bb.num_levels = 2  # torchvision returns the last two stages (+ the extra levels)
        return bb
    if name.startswith('shufflenet_v2'):
        import torchvision.models as tvm
        weights = tvm.get_model_weights(name).DEFAULT if pretrained else None
        body = getattr(tvm, name)(weights=weights)
        # channels of stage2/3/4 outputs from a dry run (robust to width multipliers)
        with torch.no_grad():
            body.eval()
            x = body.maxpool(body.conv1(torch.zeros(1, 3, 64, 64)))
            chans = []
            for s in (body.stage2, body.stage3, body.stage4):
                x = s(x)
                chans.append(x.shape[1])
            body.train()
        bb = BackboneWithFPN(body, {'stage2': '0', 'stage3': '1', 'stage4': '2'}, chans, 256,
                             extra_blocks=extra_fpn_block(extra, 256))
        bb.num_levels = 3
        return bb
    raise ValueError(f'unknown torchvision backbone tv_{name}; use tv_resnet50, tv_mobilenet_v3_large, '
                     f'tv_shufflenet_v2_x1_0 or a timm model name.')


def build_backbone(name: str, pretrained: bool = False, out_channels: int = 256, extra: str = 'pool') -> nn.Module:
    """``name``: a timm model name, or ``tv_<torchvision name>``. ``extra``: ``'pool'`` (Faster/Mask R-CNN) or
    ``'p6p7'`` (RetinaNet: strides 8/16/32 + P6, P7). The result has ``out_channels``, ``num_levels`` (backbone
    levels, the RoI pooling levels of the R-CNNs) and ``num_extra`` (extra FPN levels after them)."""
    if extra not in EXTRA_LEVELS:
        raise ValueError(f'extra FPN levels must be one of {EXTRA_LEVELS}, got {extra!r}.')
    if name.startswith('tv_'):
        bb = _tv_backbone(name[3:], pretrained, extra)
        bb.num_extra = _NUM_EXTRA[extra]
        return bb
    strides = (4, 8, 16, 32) if extra == 'pool' else (8, 16, 32)
    return TimmFPNBackbone(name, out_channels=out_channels, pretrained=pretrained, strides=strides, extra=extra)


def scaled_anchor_sizes(max_size: int, count: int) -> List[int]:
    """``count`` anchor sizes 32, 64, 128, ... (one per pyramid level, finest first) scaled by ``max_size / 1333``
    (torchvision's default image size) and floored at 8, so reduced-resolution training keeps sensible anchors."""
    f = max_size / 1333.0
    return [max(8, int(round(32 * (2 ** i) * f))) for i in range(count)]


def build_detector(
        model: str = 'maskrcnn', backbone: str = 'resnet50', num_classes: int = 2, pretrained: bool = False,
        min_size: int = 800, max_size: int = 1333, anchor_sizes: Optional[List[int]] = None,
        fpn_channels: int = 256, mask_head_channels: int = 256, box_head_dim: int = 1024, **kwargs,
) -> nn.Module:
    """torchvision ``MaskRCNN``/``FasterRCNN``/``RetinaNet`` on :func:`build_backbone`, anchors matched to the FPN
    levels.

    ``anchor_sizes``: one size per pyramid level (finest first, incl. 'pool'); default 32, 64, ..., 512 scaled by
    ``max_size / 1333`` and floored at 8, so reduced-resolution training keeps sensible anchors (backbones with
    fewer than 5 levels get all five sizes on every level).
    ``fpn_channels``: FPN width for timm backbones (torchvision's own backbones are fixed at 256); the RoI
    heads scale with it, so 128 makes CPU training ~2-3x cheaper. Extra ``kwargs`` go to torchvision's model
    (e.g. ``rpn_post_nms_top_n_train``, ``box_batch_size_per_image``).
    ``mask_head_channels`` (4 convs + deconv, torchvision default 256) and ``box_head_dim`` (TwoMLPHead width,
    default 1024) shrink the RoI heads for CPU runs; the defaults build torchvision's standard heads.

    ``model='retinanet'``: torchvision's ``RetinaNet`` (P6 from P5 as in ``retinanet_resnet50_fpn_v2``, v1 head) on the
    ``extra='p6p7'`` backbone (P3-P7 for timm and ResNet backbones), three octave scales ``s, s 2^(1/3), s 2^(2/3)``
    x three aspect ratios per location with the base sizes above (or ``anchor_sizes``), the model's own score
    threshold / NMS / top-k; ``kwargs`` go to ``RetinaNet`` (e.g. ``detections_per_img``);
    ``mask_head_channels`` and ``box_head_dim`` do not apply.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    if model not in DETECTOR_MODELS:
        raise ValueError(f'--model must be one of {DETECTOR_MODELS}, got {model!r}.')
    if model == 'retinanet':
        return build_retinanet(backbone, num_classes, pretrained, min_size, max_size, anchor_sizes, fpn_channels,
                               **kwargs)
    bb = build_backbone(backbone, pretrained=pretrained, out_channels=fpn_channels)
    n = bb.num_levels + bb.num_extra  # + 'pool'
    if anchor_sizes is None:
        sizes = scaled_anchor_sizes(max_size, max(n, 5))
        # one size per level when there are >= 5 levels (FPN standard); with fewer levels every level gets the
        # five sizes, as torchvision does for its MobileNetV3 FPN
        per_level = [(s,) for s in sizes[:n]] if n >= 5 else [tuple(sizes[:5])] * n
    else:
        if len(anchor_sizes) != n:
            raise ValueError(f'need {n} anchor sizes (one per FPN level of {backbone}), got {anchor_sizes}.')
        per_level = [(int(s),) for s in anchor_sizes]
    anchors = AnchorGenerator(tuple(per_level), ((0.5, 1.0, 2.0),) * n)
    names = [str(i) for i in range(bb.num_levels)]
    box_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    common = dict(num_classes=num_classes, min_size=min_size, max_size=max_size,
                  rpn_anchor_generator=anchors, box_roi_pool=box_pool, **kwargs)
    if box_head_dim != 1024:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        common['box_head'] = TwoMLPHead(bb.out_channels * 7 * 7, box_head_dim)
        common['box_predictor'] = FastRCNNPredictor(box_head_dim, num_classes)
        common['num_classes'] = None  # torchvision requires None when box_predictor is given
    if model == 'maskrcnn':
        mask_pool = MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
        if mask_head_channels != 256:
            from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
            c = int(mask_head_channels)
            common['mask_head'] = MaskRCNNHeads(bb.out_channels, (c, c, c, c), 1)
            common['mask_predictor'] = MaskRCNNPredictor(c, c, num_classes)
        return MaskRCNN(bb, mask_roi_pool=mask_pool, **common)
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
def coco_detector_weights(model: str):
    """torchvision's ``*_ResNet50_FPN_Weights.COCO_V1`` for ``--model`` (an enum member: ``url``, ``meta``, ...;
    nothing is downloaded here)."""
    from torchvision.models import detection
    enums = {'fasterrcnn': detection.FasterRCNN_ResNet50_FPN_Weights,
             'maskrcnn': detection.MaskRCNN_ResNet50_FPN_Weights,
             'retinanet': detection.RetinaNet_ResNet50_FPN_Weights}
    if model not in enums:
        raise ValueError(f'no torchvision COCO detector for --model {model!r}; use one of {tuple(enums)}.')
    return enums[model].COCO_V1


def coco_category_names(model: str = 'fasterrcnn') -> List[str]:
    """The COCO detector's class names by output index = COCO category id (``'__background__'`` at 0, ``'N/A'``
    at the ids COCO leaves unused): torchvision's ``COCO_V1.meta['categories']``, 91 entries."""
    return list(coco_detector_weights(model).meta['categories'])


def set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    """Set ``eps`` of every ``FrozenBatchNorm2d``: torchvision sets 0.0 for the COCO_V1 weights (they were trained
    with a FrozenBatchNorm2d that had no eps; its ``overwrite_eps``)."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps


def build_coco_detector(model: str, min_size: int = 800, max_size: int = 1333, trainable_backbone_layers: int = 3,
                        frozen_bn_eps: float = 0.0, **kwargs) -> nn.Module:
    """torchvision's COCO detector for ``model`` (``'fasterrcnn'`` | ``'maskrcnn'`` | ``'retinanet'``), built as
    ``torchvision.models.detection.<model>_resnet50_fpn(weights=COCO_V1)`` builds it, without loading weights.

    The paper's Table 6 fine-tunes these detectors. The architecture is the v1 one that the ``COCO_V1`` weights fit:
    ResNet-50 with ``FrozenBatchNorm2d`` (``eps = frozen_bn_eps``, 0.0 as torchvision sets for COCO_V1), the stem and
    layer1 frozen (``trainable_backbone_layers=3``, torchvision's default with weights), FPN on layers 1-4 + max-pool
    (R-CNN) or on layers 2-4 + P6, P7 from P5 (RetinaNet), 91 classes (output index = COCO category id),
    torchvision's default anchors, heads and transform (``min_size`` / ``max_size`` 800 / 1333 unless given).
    ``kwargs`` go to ``FasterRCNN`` / ``MaskRCNN`` / ``RetinaNet`` (settings that do not change the state dict, e.g.
    ``rpn_post_nms_top_n_train``, ``box_detections_per_img``, ``detections_per_img``). Load the weights with
    :func:`load_coco_weights` or ``load_state_dict`` of a torchvision-format state dict.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d
    classes = {'fasterrcnn': FasterRCNN, 'maskrcnn': MaskRCNN, 'retinanet': RetinaNet}
    if model not in classes:
        raise ValueError(f'no torchvision COCO detector for --model {model!r}; use one of {tuple(classes)}.')
    retina = model == 'retinanet'
    bb = resnet_fpn_backbone(backbone_name='resnet50', weights=None, norm_layer=FrozenBatchNorm2d,
                             trainable_layers=trainable_backbone_layers,
                             returned_layers=[2, 3, 4] if retina else None,
                             extra_blocks=LastLevelP6P7(256, 256) if retina else None)
    num_classes = len(coco_category_names(model))
    detector = classes[model](bb, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)
    set_frozen_bn_eps(detector, frozen_bn_eps)
    return detector


def load_coco_weights(detector: nn.Module, model: str, progress: bool = True) -> None:
    """Load torchvision's ``COCO_V1`` weights of ``model`` into ``detector`` (from :func:`build_coco_detector`)
    through torchvision's own weights API: downloaded once into the torch hub cache, hash-checked, as the builder
    does."""
    weights = coco_detector_weights(model)
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
