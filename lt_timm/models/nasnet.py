"""NASNet-A Mobile (4 @ 1056) in timm's registry, built from timm's NASNet cells, with Keras's ImageNet weights.

The paper's Table 3 fine-tunes "NASNetMobile" (Zoph et al. 2018) "downloaded from the TensorFlow platform"
(Sec. 4.1.5). timm has NASNet-A Large only (``timm.models.nasnet``, Cadene's port of TF-Slim); its cells
(``CellStem0``, ``CellStem1``, ``FirstCell``, ``NormalCell``, ``ReductionCell0/1``) are NASNet-A's and are reused
here as they are, stacked as NASNet-A Mobile: stem 32, ``N = 4`` normal cells per stage, 44 -> 88 -> 176 filters,
1056 features, 5.3 M parameters. Two things differ from the Large model:

* **No skip over the reduction cells.** Keras builds Mobile with ``skip_reduction=False``: the cell after a
  reduction cell takes the reduction cell's *input* as its previous input (timm's Large, like Keras's Large, skips
  it and takes the cell before). :meth:`NASNetAMobile.forward_features` follows Mobile's wiring.
* **Keras's stride-2 max pooling.** Keras pads the input of the reduction cells' 3x3 stride-2 pools with zeros
  (``ZeroPadding2D(correct_pad)``, the bottom/right side as TensorFlow's "same") and pools "valid", so a padded zero
  takes part in the max (timm's ``MaxPool2dSame`` pads with -inf). :class:`ZeroPadMaxPool` does what Keras does;
  the average pools (timm's ``AvgPool2dSame`` also counts the padded zeros) and all convolutions ("same") already
  agree with Keras.

``nasnetamobile.keras_in1k`` loads Keras Applications' ``NASNet-mobile.h5`` (``--pretrained`` downloads it,
``--pretrained-path FILE.h5`` reads a local copy) through :mod:`lt_timm.models.keras_applications`, with the layer
names of ``keras/src/applications/nasnet.py``: ``stem_conv1``/``stem_bn1``; per cell ``block_id`` (``stem_1``,
``stem_2``, ``0``-``3``, ``reduce_4``, ``5``-``8``, ``reduce_8``, ``9``-``12``) the layers
``adjust_conv_projection_<id>`` or ``adjust_conv_{1,2}_<id>``, ``adjust_bn_<id>``,
``{normal,reduction}_conv_1_<id>``, ``{normal,reduction}_bn_1_<id>`` and, per separable branch ``<branch>_<id>``,
``separable_conv_{1,2}[_bn]_<branch>_<id>``; ``predictions``. Preprocessing: Keras's ``x / 127.5 - 1``
(mean = std = 0.5), 224 x 224.
"""
from functools import partial
from typing import Any, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, create_classifier, pad_same
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.nasnet import CellStem0, CellStem1, FirstCell, NormalCell, ReductionCell0, ReductionCell1

from .keras_applications import KERAS_TAG, KERAS_URL, Plan, keras_overlay, load_keras_weights

__all__ = ['NASNetAMobile', 'ZeroPadMaxPool', 'keras_plan']

PAD = 'same'  # TensorFlow "same" padding, as the Keras model (and timm's nasnetalarge)


class ZeroPadMaxPool(nn.Module):
    """Max pooling of a zero-padded input, TensorFlow's "same" split (Keras: ``ZeroPadding2D`` + "valid" pool)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = [self.kernel_size] * 2, [self.stride] * 2
        return F.max_pool2d(pad_same(x, k, s, value=0.), k, s)


def _keras_pools(cell: nn.Module) -> nn.Module:
    """A timm stem/reduction cell with its stride-2 max pools replaced by Keras's zero-padded ones."""
    cell.comb_iter_1_left = ZeroPadMaxPool(3, 2)
    cell.comb_iter_4_right = ZeroPadMaxPool(3, 2)
    return cell


class NASNetAMobile(nn.Module):
    """NASNet-A Mobile (4 @ 1056): timm's NASNet-A cells, Keras's Mobile wiring and pooling (module doc)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, stem_size: int = 32, num_features: int = 1056,
                 num_normal: int = 4, channel_multiplier: int = 2, drop_rate: float = 0., global_pool: str = 'avg',
                 output_stride: int = 32):
        super().__init__()
        if output_stride != 32:
            raise ValueError(f'NASNet-A Mobile has output stride 32 only, got {output_stride}.')
        self.num_classes, self.num_features, self.drop_rate = num_classes, num_features, drop_rate
        self.num_normal = num_normal
        c = num_features // 24  # filters of the first stage (44)
        self.conv0 = ConvNormAct(in_chans, stem_size, 3, stride=2, padding=0, apply_act=False,
                                 norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=0.1))
        self.cell_stem_0 = _keras_pools(CellStem0(stem_size, c // channel_multiplier ** 2, pad_type=PAD))
        self.cell_stem_1 = _keras_pools(CellStem1(stem_size, c // channel_multiplier, pad_type=PAD))
        self.cell_names: List[str] = []
        prev, cur = c, 2 * c  # channels of the outputs of cell_stem_0 and cell_stem_1
        for stage in range(3):
            f = c * channel_multiplier ** stage
            if stage:
                name = f'reduction_cell_{stage - 1}'
                reduction = (ReductionCell0 if stage == 1 else ReductionCell1)(prev, f, cur, f, pad_type=PAD)
                self.add_module(name, _keras_pools(reduction))
                self.cell_names.append(name)
                prev, cur = cur, 4 * f  # Mobile: the next cell's previous input is the reduction cell's input
            for i in range(num_normal):
                name = f'cell_{stage * num_normal + i}'
                cell = (FirstCell(prev, f // 2, cur, f, pad_type=PAD) if i == 0 else
                        NormalCell(prev, f, cur, f, pad_type=PAD))
                self.add_module(name, cell)
                self.cell_names.append(name)
                prev, cur = cur, 6 * f
        self.act = nn.ReLU(inplace=True)
        self.feature_info = [
            dict(num_chs=stem_size, reduction=2, module='conv0'),
            dict(num_chs=c, reduction=4, module='cell_stem_1.conv_1x1.act'),
            dict(num_chs=6 * c * channel_multiplier // 2, reduction=8, module='reduction_cell_0.conv_1x1.act'),
            dict(num_chs=6 * c * channel_multiplier, reduction=16, module='reduction_cell_1.conv_1x1.act'),
            dict(num_chs=num_features, reduction=32, module='act'),
        ]
        self.global_pool, self.head_drop, self.last_linear = create_classifier(
            num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.head_hidden_size = num_features

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^conv0|cell_stem_[01]', blocks=[(r'^cell_(\d+)', None), (r'^reduction_cell_(\d+)', None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        if enable:
            raise ValueError('NASNet-A Mobile does not support gradient checkpointing; drop --grad-checkpointing.')

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.last_linear

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.global_pool, self.last_linear = create_classifier(
            self.num_features, num_classes, pool_type=global_pool or self.global_pool.pool_type)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_conv0 = self.conv0(x)
        prev = self.cell_stem_0(x_conv0)
        x = self.cell_stem_1(x_conv0, prev)
        for name in self.cell_names:  # every cell, reduction cells included, takes (x, the input before x)
            prev, x = x, getattr(self, name)(x, prev)
        return self.act(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.last_linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, path: str) -> None:
        """timm's ``custom_load`` door: a Keras ``NASNet-mobile.h5`` file."""
        load_keras_weights(self, path, keras_plan(self), 'last_linear')


def _separable(module: str, branch: str) -> Plan:
    """timm ``BranchSeparables`` <- Keras ``_separable_conv_block(block_id=branch)``."""
    return [(f'{module}.separable_1', f'separable_conv_1_{branch}', 'separable'),
            (f'{module}.bn_sep_1', f'separable_conv_1_bn_{branch}', 'bn'),
            (f'{module}.separable_2', f'separable_conv_2_{branch}', 'separable'),
            (f'{module}.bn_sep_2', f'separable_conv_2_bn_{branch}', 'bn')]


def _cell_plan(name: str, cell: nn.Module, block_id: str) -> Plan:
    """One cell: its previous-input adjustment, its 1x1 input convolution and its separable branches."""
    if hasattr(cell, 'path_1'):  # Keras's _adjust_block, factorized reduction of the previous input
        plan = [(f'{name}.path_1.conv', f'adjust_conv_1_{block_id}', 'conv'),
                (f'{name}.path_2.conv', f'adjust_conv_2_{block_id}', 'conv'),
                (f'{name}.final_path_bn', f'adjust_bn_{block_id}', 'bn')]
    elif hasattr(cell, 'conv_prev_1x1'):  # Keras's _adjust_block, projection of the previous input
        plan = [(f'{name}.conv_prev_1x1.conv', f'adjust_conv_projection_{block_id}', 'conv'),
                (f'{name}.conv_prev_1x1.bn', f'adjust_bn_{block_id}', 'bn')]
    else:  # the first stem cell has no previous input
        plan = []
    kind = 'normal' if isinstance(cell, (FirstCell, NormalCell)) else 'reduction'
    plan += [(f'{name}.conv_1x1.conv', f'{kind}_conv_1_{block_id}', 'conv'),
             (f'{name}.conv_1x1.bn', f'{kind}_bn_1_{block_id}', 'bn')]
    if kind == 'normal':  # timm branch <- Keras branch: x1 = (left1, right1), x2 = (left2, right2), x5 = left5
        branches = dict(comb_iter_0_left='normal_left1', comb_iter_0_right='normal_right1',
                        comb_iter_1_left='normal_left2', comb_iter_1_right='normal_right2',
                        comb_iter_4_left='normal_left5')
    else:  # x1 = (left1, right1), x2/x3's separable halves right2/right3, x5's separable half 'left4'
        branches = dict(comb_iter_0_left='reduction_left1', comb_iter_0_right='reduction_right1',
                        comb_iter_1_right='reduction_right2', comb_iter_2_right='reduction_right3',
                        comb_iter_4_left='reduction_left4')
    for module, branch in branches.items():
        plan += _separable(f'{name}.{module}', f'{branch}_{block_id}')
    return plan


def keras_plan(model: NASNetAMobile) -> Plan:
    """Keras ``NASNetMobile`` layer -> module of ``model``, cell by cell in Keras's ``block_id`` numbering."""
    plan: Plan = [('conv0.conv', 'stem_conv1', 'conv'), ('conv0.bn', 'stem_bn1', 'bn')]
    plan += _cell_plan('cell_stem_0', model.cell_stem_0, 'stem_1')
    plan += _cell_plan('cell_stem_1', model.cell_stem_1, 'stem_2')
    n, stage, i = model.num_normal, 0, 0
    for name in model.cell_names:  # Keras: normal cells 0..N-1, reduce_N, N+1..2N, reduce_2N, 2N+1..3N
        if name.startswith('reduction'):
            stage, i = stage + 1, 0
            block_id = f'reduce_{stage * n}'
        else:
            block_id, i = str(stage * n + i + (stage > 0)), i + 1
        plan += _cell_plan(name, getattr(model, name), block_id)
    return plan + [('last_linear', 'predictions', 'dense')]


default_cfgs = generate_default_cfgs({
    f'nasnetamobile.{KERAS_TAG}': dict(
        url=KERAS_URL + 'nasnet/NASNet-mobile.h5', custom_load=True, num_classes=1000, input_size=(3, 224, 224),
        pool_size=(7, 7), crop_pct=0.875, interpolation='bilinear', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        first_conv='conv0.conv', classifier='last_linear', license='apache-2.0',
        origin_url='https://keras.io/api/applications/nasnet/',
        notes=('Keras Applications NASNetMobile, ImageNet-1k; preprocessing x / 127.5 - 1',)),
})


@register_model
def nasnetamobile(pretrained: bool = False, **kwargs: Any) -> NASNetAMobile:
    """NASNet-A Mobile (4 @ 1056), Zoph et al. 2018; ``.keras_in1k``: Keras Applications' ImageNet weights."""
    kwargs['pretrained_cfg_overlay'] = keras_overlay(kwargs.get('pretrained_cfg_overlay'))
    return build_model_with_cfg(NASNetAMobile, 'nasnetamobile', pretrained,
                                feature_cfg=dict(feature_cls='hook', no_rewrite=True), **kwargs)
