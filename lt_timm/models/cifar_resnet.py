"""CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Sec. 4.2,
registered in timm's model registry: ``--model cifar_resnet20`` (also 32, 44, 56, 110).

Three stages of ``n`` basic blocks (16/32/64 channels) on 32x32 inputs, 6n+2 weighted layers, and the paper's
shortcut **option A**: an identity that subsamples by 2 and zero-pads the new channels when the shape changes
(no parameters), so ResNet-20 has 0.27 M parameters.

Module names follow the published CIFAR-10 checkpoints of Y. Idelbayev (github.com/akamaster/pytorch_resnet_cifar10,
BSD licence: ``conv1``, ``bn1``, ``layer1..3``, ``linear``), so those files load as they are downloaded through every
door: ``--pretrained`` (or ``--pretrained --pretrained-path FILE``), ``--initial-checkpoint FILE``,
``validate.py --checkpoint FILE`` and ``timm.create_model(name, checkpoint_path=FILE)``.
:func:`checkpoint_filter_fn` unwraps them and names the depth a file holds when it does not fit.
"""
import re
from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ['CifarResNet', 'checkpoint_filter_fn', 'CIFAR_RESNET_DEPTHS']

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
_PUBLISHED = 'https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/'
_PUBLISHED_FILES = {20: 'resnet20-12fca82f.th', 32: 'resnet32-d509ac18.th', 44: 'resnet44-014dd654.th',
                    56: 'resnet56-4bfd9763.th', 110: 'resnet110-1d1ed7c2.th'}
# Published CIFAR-10 test error of those files (original PNG CIFAR-10), from the repository's README.
PUBLISHED_TOP1_ERR = {20: 8.27, 32: 7.37, 44: 6.90, 56: 6.61, 110: 6.32}


class ShortcutA(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the channels from ``in_chs`` to ``out_chs``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = ShortcutA(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet-(6n+2) with option-A shortcuts."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.,
                 global_pool: str = 'avg', **kwargs: Any):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f'CIFAR ResNet depth must be 6n+2 (e.g. {CIFAR_RESNET_DEPTHS}), got {depth}.')
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 64
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        chs = 16
        for stage, out_chs in enumerate((16, 32, 64), start=1):
            blocks = [BasicBlock(chs if i == 0 else out_chs, out_chs, 2 if stage > 1 and i == 0 else 1) for i in range(n)]
            self.add_module(f'layer{stage}', nn.Sequential(*blocks))
            chs = out_chs
        self.linear = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg') -> None:
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _blocks_per_stage(state_dict: Dict[str, torch.Tensor]) -> int:
    blocks = {int(m.group(1)) for k in state_dict for m in [re.match(r'layer1\.(\d+)\.', k)] if m}
    return len(blocks)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: CifarResNet) -> Dict[str, torch.Tensor]:
    """Accept a published (``{'state_dict': {'module.conv1.weight': ...}, 'best_prec1': ...}``) or timm checkpoint.

    Raises a ValueError naming the depth the file holds when it is not the model's, and one naming the format
    when the file is not a CIFAR ResNet at all.
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    if 'conv1.weight' not in state_dict or 'layer1.0.conv1.weight' not in state_dict:
        raise ValueError('the checkpoint is not a CIFAR ResNet (no conv1/layer1 weights); use a checkpoint of '
                         'cifar_resnet* or pick the --model it was trained with.')
    have, want = _blocks_per_stage(state_dict), len(model.layer1)
    if have != want:
        raise ValueError(f'the checkpoint holds a CIFAR ResNet-{6 * have + 2}, not ResNet-{6 * want + 2}; '
                         f'use --model cifar_resnet{6 * have + 2}.')
    return state_dict


CifarResNet.checkpoint_filter_fn = staticmethod(checkpoint_filter_fn)  # used by lt_timm's checkpoint loading


def _create(variant: str, depth: int, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, depth=depth, pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=True, **kwargs)


def _cfg(depth: int, **kwargs) -> Dict[str, Any]:
    # The published checkpoints were trained on ImageNet mean/std with pad-4 crop + flip at 32 px, no resize.
    return dict(url=_PUBLISHED + _PUBLISHED_FILES[depth], num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8),
                crop_pct=1.0, crop_mode='center', interpolation='bilinear', mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv='conv1', classifier='linear', license='bsd-2-clause',
                origin_url='https://github.com/akamaster/pytorch_resnet_cifar10',
                notes=(f'CIFAR-10 top-1 error {PUBLISHED_TOP1_ERR[depth]} % (published)',), **kwargs)


default_cfgs = generate_default_cfgs({f'cifar_resnet{d}.akamaster_cifar10': _cfg(d) for d in CIFAR_RESNET_DEPTHS})


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for 32x32 inputs, option A (0.27 M params)."""
    return _create('cifar_resnet20', 20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for 32x32 inputs, option A (0.46 M params)."""
    return _create('cifar_resnet32', 32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for 32x32 inputs, option A (0.66 M params)."""
    return _create('cifar_resnet44', 44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for 32x32 inputs, option A (0.85 M params)."""
    return _create('cifar_resnet56', 56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for 32x32 inputs, option A (1.7 M params)."""
    return _create('cifar_resnet110', 110, pretrained, **kwargs)
