"""Backbones for torchvision's detectors: any timm model (``features_only=True``) + torchvision's FPN.

``build_backbone('resnet50')`` (a timm name) returns a :class:`TimmFPNBackbone`: the timm feature extractor
at strides 4/8/16/32 (whatever of those it has), a ``torchvision.ops.FeaturePyramidNetwork`` on top and a
max-pool ``'pool'`` level, exposing ``out_channels`` as torchvision's ``FasterRCNN``/``MaskRCNN`` require.
Names prefixed ``tv_`` use torchvision's own backbones: ``tv_resnet50`` / ``tv_resnet18`` (...),
``tv_mobilenet_v3_large``, ``tv_shufflenet_v2_x1_0`` (timm has no ShuffleNet).

Weights are loaded only with ``pretrained=True`` (never in tests). With pretrained weights BatchNorm is
frozen (detection batches are tiny); from scratch it stays trainable.
"""
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = ['TimmFPNBackbone', 'build_backbone', 'build_detector', 'DETECTOR_MODELS']

DETECTOR_MODELS = ('maskrcnn', 'fasterrcnn')


class TimmFPNBackbone(nn.Module):
    """timm ``features_only`` model -> FPN. Output: ``OrderedDict`` '0'..'k-1' + 'pool', ``out_channels`` each."""

    def __init__(self, model_name: str, out_channels: int = 256, pretrained: bool = False,
                 strides: Tuple[int, ...] = (4, 8, 16, 32), **kwargs):
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
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.num_levels = len(in_channels)

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _tv_backbone(name: str, pretrained: bool) -> nn.Module:
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone, mobilenet_backbone
    from torchvision.ops import misc
    norm = misc.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if name.startswith('resnet') or name.startswith('resnext') or name.startswith('wide_resnet'):
        import torchvision.models as tvm
        weights = tvm.get_model_weights(name).DEFAULT if pretrained else None
        bb = resnet_fpn_backbone(backbone_name=name, weights=weights, norm_layer=norm,
                                 trainable_layers=3 if pretrained else 5)
        bb.num_levels = 4
        return bb
    if name in ('mobilenet_v3_large', 'mobilenet_v3_small'):
        import torchvision.models as tvm
        weights = tvm.get_model_weights(name).DEFAULT if pretrained else None
        bb = mobilenet_backbone(backbone_name=name, weights=weights, fpn=True, norm_layer=norm,
                                trainable_layers=3 if pretrained else 6)
        bb.num_levels = 2  # torchvision returns the last two stages (+ 'pool')
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
                             extra_blocks=LastLevelMaxPool())
        bb.num_levels = 3
        return bb
    raise ValueError(f'unknown torchvision backbone tv_{name}; use tv_resnet50, tv_mobilenet_v3_large, '
                     f'tv_shufflenet_v2_x1_0 or a timm model name.')


def build_backbone(name: str, pretrained: bool = False, out_channels: int = 256) -> nn.Module:
    """``name``: a timm model name, or ``tv_<torchvision name>``."""
    if name.startswith('tv_'):
        return _tv_backbone(name[3:], pretrained)
    return TimmFPNBackbone(name, out_channels=out_channels, pretrained=pretrained)


def build_detector(
        model: str = 'maskrcnn', backbone: str = 'resnet50', num_classes: int = 2, pretrained: bool = False,
        min_size: int = 800, max_size: int = 1333, anchor_sizes: Optional[List[int]] = None,
        fpn_channels: int = 256, mask_head_channels: int = 256, box_head_dim: int = 1024, **kwargs,
) -> nn.Module:
    """torchvision ``MaskRCNN``/``FasterRCNN`` on :func:`build_backbone`, anchors matched to the FPN levels.

    ``anchor_sizes``: one size per pyramid level (finest first, incl. 'pool'); default 32, 64, ..., 512 scaled by
    ``max_size / 1333`` and floored at 8, so reduced-resolution training keeps sensible anchors (backbones with
    fewer than 5 levels get all five sizes on every level).
    ``fpn_channels``: FPN width for timm backbones (torchvision's own backbones are fixed at 256); the RoI
    heads scale with it, so 128 makes CPU training ~2-3x cheaper. Extra ``kwargs`` go to torchvision's model
    (e.g. ``rpn_post_nms_top_n_train``, ``box_batch_size_per_image``).
    ``mask_head_channels`` (4 convs + deconv, torchvision default 256) and ``box_head_dim`` (TwoMLPHead width,
    default 1024) shrink the RoI heads for CPU runs; the defaults build torchvision's standard heads.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    if model not in DETECTOR_MODELS:
        raise ValueError(f'--model must be one of {DETECTOR_MODELS}, got {model!r}.')
    bb = build_backbone(backbone, pretrained=pretrained, out_channels=fpn_channels)
    n = bb.num_levels + 1  # + 'pool'
    if anchor_sizes is None:
        f = max_size / 1333.0
        sizes = [max(8, int(round(32 * (2 ** i) * f))) for i in range(max(n, 5))]
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
