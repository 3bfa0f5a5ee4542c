"""torchvision's own architectures with their ``IMAGENET1K_V1`` weights, in timm's registry.

The paper's Table 5 fine-tunes torchvision's V1 weights. timm ships them for the ResNets (``resnet50.tv_in1k``,
``resnext50_32x4d.tv_in1k``) but not for MobileNet-V2, EfficientNet-B0 or ViT-B/16, whose timm weights are other
trainings. These entries build torchvision's module (same parameter names, so torchvision's checkpoint files load
as they are) and give it timm's model interface, so ``--model tv_mobilenet_v2 --pretrained`` downloads torchvision's
V1 file through timm's loader (torch hub cache) and everything else — ``--num-classes`` head adaptation,
``--pretrained-path``, ``checkpoint_path=``, EMA, checkpoints — works as for any timm model.

==================  ==================================================  ===========================
``--model``         torchvision weights (ImageNet-1k top-1)              eval transform
==================  ==================================================  ===========================
tv_mobilenet_v2     ``MobileNet_V2_Weights.IMAGENET1K_V1`` (71.878)      resize 256, crop 224, bilinear
tv_efficientnet_b0  ``EfficientNet_B0_Weights.IMAGENET1K_V1`` (77.692)   resize 256, crop 224, bicubic
tv_vit_b_16         ``ViT_B_16_Weights.IMAGENET1K_V1`` (81.072)          resize 256, crop 224, bilinear
==================  ==================================================  ===========================
"""
from typing import Any, Dict

import torch
import torch.nn as nn
from torchvision import models as tvm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ['TvMobileNetV2', 'TvEfficientNetB0', 'TvViTB16']


def _check_in_chans(in_chans: int) -> None:
    if in_chans != 3:
        raise ValueError(f'torchvision\'s V1 models take 3 input channels, got --in-chans {in_chans}.')


class _PooledHead:
    """timm's interface for torchvision CNNs of the shape features -> avgpool -> classifier(Dropout, Linear)."""

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg') -> None:
        self.num_classes = num_classes
        self.classifier[-1] = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class TvMobileNetV2(_PooledHead, tvm.MobileNetV2):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2, **kwargs: Any):
        _check_in_chans(in_chans)
        super().__init__(num_classes=max(num_classes, 1), dropout=drop_rate)
        self.num_features = self.head_hidden_size = self.last_channel
        self.reset_classifier(num_classes)


class TvEfficientNetB0(_PooledHead, tvm.EfficientNet):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2,
                 drop_path_rate: float = 0.2, **kwargs: Any):
        _check_in_chans(in_chans)
        settings, last_channel = tvm.efficientnet._efficientnet_conf('efficientnet_b0', width_mult=1.0, depth_mult=1.0)
        super().__init__(settings, dropout=drop_rate, stochastic_depth_prob=drop_path_rate,
                         num_classes=max(num_classes, 1), last_channel=last_channel)
        self.num_features = self.head_hidden_size = self.classifier[-1].in_features
        self.reset_classifier(num_classes)


class TvViTB16(tvm.VisionTransformer):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, drop_rate: float = 0.,
                 **kwargs: Any):
        _check_in_chans(in_chans)
        super().__init__(image_size=img_size, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                         mlp_dim=3072, dropout=drop_rate, num_classes=max(num_classes, 1))
        self.num_features = self.head_hidden_size = self.hidden_dim
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.heads.head

    def reset_classifier(self, num_classes: int, global_pool: str = 'token') -> None:
        self.num_classes = num_classes
        self.heads.head = nn.Linear(self.hidden_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.heads(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(url: str, classifier: str, interpolation: str, top1: float, **kwargs) -> Dict[str, Any]:
    return dict(url=url, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=224 / 256,
                crop_mode='center', interpolation=interpolation, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                classifier=classifier, license='bsd-3-clause', origin_url='https://github.com/pytorch/vision',
                notes=(f'torchvision IMAGENET1K_V1, ImageNet-1k top-1 {top1} %',), **kwargs)


_TV = 'https://download.pytorch.org/models/'
default_cfgs = generate_default_cfgs({
    'tv_mobilenet_v2.tv_in1k': _cfg(_TV + 'mobilenet_v2-b0353104.pth', 'classifier.1', 'bilinear', 71.878,
                                    first_conv='features.0.0'),
    'tv_efficientnet_b0.tv_in1k': _cfg(_TV + 'efficientnet_b0_rwightman-7f5810bc.pth', 'classifier.1', 'bicubic',
                                       77.692, first_conv='features.0.0'),
    'tv_vit_b_16.tv_in1k': _cfg(_TV + 'vit_b_16-c867db91.pth', 'heads.head', 'bilinear', 81.072,
                                first_conv='conv_proj'),
})


def _create(cls, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    kwargs.pop('global_pool', None)  # fixed by the torchvision architecture
    return build_model_with_cfg(cls, variant, pretrained, pretrained_strict=True, **kwargs)


@register_model
def tv_mobilenet_v2(pretrained: bool = False, **kwargs) -> TvMobileNetV2:
    """torchvision MobileNet-V2 (IMAGENET1K_V1 weights with --pretrained)."""
    return _create(TvMobileNetV2, 'tv_mobilenet_v2', pretrained, **kwargs)


@register_model
def tv_efficientnet_b0(pretrained: bool = False, **kwargs) -> TvEfficientNetB0:
    """torchvision EfficientNet-B0 (IMAGENET1K_V1 weights with --pretrained)."""
    return _create(TvEfficientNetB0, 'tv_efficientnet_b0', pretrained, **kwargs)


@register_model
def tv_vit_b_16(pretrained: bool = False, **kwargs) -> TvViTB16:
    """torchvision ViT-B/16 (IMAGENET1K_V1 weights with --pretrained)."""
    return _create(TvViTB16, 'tv_vit_b_16', pretrained, **kwargs)
