"""CIFAR ResNet-20/56/110 (He et al., "Deep Residual Learning for Image Recognition", 2016, Sec. 4.2),
registered in timm's model registry so recipes can name them: ``--model cifar_resnet20``.

Three stages of ``n`` basic blocks (16/32/64 channels) on 32x32 inputs, 6n+2 layers; shortcut option B
(1x1 conv projection) when the shape changes.
"""
from typing import Any, Dict

import torch
import torch.nn as nn
from timm.models import register_model

__all__ = ['CifarResNet', 'cifar_resnet20', 'cifar_resnet56', 'cifar_resnet110']


class _BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.,
                 global_pool: str = 'avg', **kwargs: Any):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f'CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}.')
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 64
        self.drop_rate = drop_rate
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        layers, chs = [], 16
        for stage, out_chs in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(_BasicBlock(chs, out_chs, 2 if stage > 0 and i == 0 else 1))
                chs = out_chs
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg') -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> Dict[str, Any]:
    return dict(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, interpolation='bilinear',
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), first_conv='stem.0', classifier='fc',
                **kwargs)


def _create(depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    if pretrained:
        raise ValueError('no pretrained weights exist for the CIFAR ResNets; train from scratch (drop --pretrained).')
    kwargs.pop('pretrained_cfg', None)
    kwargs.pop('pretrained_cfg_overlay', None)
    model = CifarResNet(depth=depth, **{k: v for k, v in kwargs.items() if v is not None})
    model.pretrained_cfg = model.default_cfg = _cfg()
    return model


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for 32x32 inputs (0.27M params)."""
    return _create(20, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for 32x32 inputs (0.85M params)."""
    return _create(56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for 32x32 inputs (1.7M params)."""
    return _create(110, pretrained, **kwargs)
