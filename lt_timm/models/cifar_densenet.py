"""DenseNet-40 (k = 12) for CIFAR: Huang et al., "Densely Connected Convolutional Networks" (CVPR 2017), Table 2,
registered in timm's registry as ``--model cifar_densenet40``.

A 3x3 stem conv of 16 channels, three dense blocks of (depth - 4) / 3 = 12 layers (BN-ReLU-Conv3x3 adding ``k``
channels each), 1x1-conv + 2x2 average-pool transitions without compression, BN-ReLU, global average pool, linear:
1.0 M parameters. Trained from scratch (no published weights).
"""
from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ['CifarDenseNet']


class DenseLayer(nn.Module):
    def __init__(self, in_chs: int, growth_rate: int, drop_rate: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs)
        self.conv = nn.Conv2d(in_chs, growth_rate, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.relu(self.norm(x)))
        if self.drop_rate:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return torch.cat([x, out], dim=1)


class Transition(nn.Sequential):
    def __init__(self, chs: int, drop_rate: float):
        super().__init__(nn.BatchNorm2d(chs), nn.ReLU(), nn.Conv2d(chs, chs, 1, bias=False),
                         nn.Dropout(drop_rate) if drop_rate else nn.Identity(), nn.AvgPool2d(2))


class CifarDenseNet(nn.Module):
    """DenseNet-(3L+4) for 32x32 inputs, growth rate ``k``, no bottleneck, no compression."""

    def __init__(self, depth: int = 40, growth_rate: int = 12, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0., global_pool: str = 'avg', **kwargs: Any):
        super().__init__()
        if (depth - 4) % 3 or depth < 7:
            raise ValueError(f'DenseNet depth must be 3L+4 (e.g. 40), got {depth}.')
        layers = (depth - 4) // 3
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        chs = 16
        stages = [nn.Conv2d(in_chans, chs, 3, 1, 1, bias=False)]
        for block in range(3):
            for _ in range(layers):
                stages.append(DenseLayer(chs, growth_rate, drop_rate))
                chs += growth_rate
            if block < 2:
                stages.append(Transition(chs, drop_rate))
        stages += [nn.BatchNorm2d(chs), nn.ReLU()]
        self.features = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = chs
        self.classifier = nn.Linear(chs, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg') -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> Dict[str, Any]:
    return dict(url='', num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, crop_mode='center',
                interpolation='bilinear', mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                first_conv='features.0', classifier='classifier', **kwargs)


default_cfgs = generate_default_cfgs({'cifar_densenet40.untrained': _cfg()})


@register_model
def cifar_densenet40(pretrained: bool = False, **kwargs) -> CifarDenseNet:
    """DenseNet-40, k = 12, for 32x32 inputs (1.0 M params); no published weights."""
    return build_model_with_cfg(CifarDenseNet, 'cifar_densenet40', pretrained, depth=40, growth_rate=12, **kwargs)
