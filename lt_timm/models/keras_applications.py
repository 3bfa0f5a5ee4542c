"""Keras Applications weights (``.h5``) in timm models, and MobileNet-V2 with TensorFlow's padding for them.

The paper's Table 3 fine-tunes ImageNet models "downloaded from the TensorFlow platform" (Sec. 4.1.5), whose
published accuracies it quotes from "the TensorFlow webpage" (footnote 1: MobileNet-V2 71.3 %, NASNetMobile 74.4 %,
EfficientNet-B0 77.1 %, the figures of the Keras Applications table). Keras Applications ships those weights as
HDF5 files written by Keras's ``save_weights``:

* the root (or its ``model_weights`` group, in a whole-model file) has the attribute ``layer_names`` (split into
  ``layer_names0``, ``layer_names1``, ... when it exceeds HDF5's 64 KB header limit), one name per layer;
* each layer is a group holding the attribute ``weight_names`` (e.g. ``Conv1/kernel:0``) and one dataset per name
  at that path inside the group;
* tensors are channels-last: a ``Conv2D`` ``kernel`` is ``(kh, kw, in, out)``, a ``DepthwiseConv2D`` or
  ``SeparableConv2D`` ``depthwise_kernel`` is ``(kh, kw, in, 1)`` and a ``pointwise_kernel`` ``(1, 1, in, out)``, a
  ``Dense`` ``kernel`` is ``(in, out)``; ``BatchNormalization`` stores ``gamma``, ``beta``, ``moving_mean``,
  ``moving_variance``.

Keras 3's own ``.weights.h5`` layout (``layers/<name>/vars/<i>``) is another format and is refused by name.

A *plan* says which Keras layer fills which timm module: ``(module path, Keras layer name, kind)`` with kind one of
``conv``, ``depthwise``, ``separable``, ``bn``, ``dense``. :func:`load_keras_weights` reads a file (h5py, data
only: nothing in the file is executed), converts every tensor of the plan and loads them, refusing a file that
lacks a layer of the plan or whose shapes differ, by name. The classifier (``dense``) is loaded only when its shape
fits, i.e. with 1000 classes; otherwise it keeps timm's fresh initialisation, as timm's loaders do.

``tf_mobilenetv2_100`` is timm's MobileNet-V2 1.0 built as Keras's ``MobileNetV2`` computes: TensorFlow "same"
padding (Keras pads stride-2 depthwise convolutions with ``correct_pad``, which equals TensorFlow's "same" split,
more at the bottom/right) and BatchNorm eps 1e-3. Its tag ``keras_in1k`` loads Keras's
``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5`` (the TF-Slim checkpoint without its background
class): ``--pretrained`` downloads it, ``--pretrained-path FILE.h5`` reads a local copy. The layer names are those
of ``keras/src/applications/mobilenet_v2.py``: ``Conv1``/``bn_Conv1``, ``expanded_conv_{depthwise,project}[_BN]``,
``block_{1..16}_{expand,depthwise,project}[_BN]``, ``Conv_1``/``Conv_1_bn``, ``predictions``.
"""
import logging
import os
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import timm.models.efficientnet as timm_efficientnet
from timm.models import generate_default_cfgs, load_pretrained, register_model, resolve_pretrained_cfg

__all__ = ['KERAS_TAG', 'read_keras_weights', 'is_keras_file', 'keras_overlay', 'keras_state_dict',
           'load_keras_weights', 'mobilenetv2_plan']

_logger = logging.getLogger(__name__)

KERAS_TAG = 'keras_in1k'
KERAS_URL = 'https://storage.googleapis.com/tensorflow/keras-applications/'
BN_EPS_TF = 1e-3
Plan = List[Tuple[str, str, str]]


def _names(group, key: str) -> List[str]:
    """A Keras name-list attribute, whole or in chunks ``key0, key1, ...`` (Keras's large-attribute rule)."""
    if key in group.attrs:
        values = list(group.attrs[key])
    else:
        values, i = [], 0
        while f'{key}{i}' in group.attrs:
            values += list(group.attrs[f'{key}{i}'])
            i += 1
    return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def is_keras_file(path: str) -> bool:
    """True when ``path`` is an HDF5 file (Keras's weight format)."""
    import h5py
    return os.path.isfile(path) and h5py.is_hdf5(path)


def read_keras_weights(path: str) -> Dict[str, Dict[str, np.ndarray]]:
    """``{layer name: {weight name: array}}`` of a Keras ``.h5`` weights file; weight names lose their layer prefix
    and ``:0`` suffix (``Conv1/kernel:0`` -> ``kernel``). Layers without weights are left out."""
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is in requirements.txt
        raise ValueError('reading Keras .h5 weights needs h5py; pip install h5py.') from e
    if not is_keras_file(path):
        raise ValueError(f'{path} is not an HDF5 file; Keras Applications weights are .h5 files '
                         f'(e.g. NASNet-mobile.h5), pass one with --pretrained-path.')
    with h5py.File(path, 'r') as f:
        root = f['model_weights'] if 'model_weights' in f else f
        layer_names = _names(root, 'layer_names')
        if not layer_names:
            raise ValueError(f'{path} is an HDF5 file without Keras\'s layer_names attribute, not Keras weights '
                             f'saved by save_weights / model.save.')
        layers = {}
        for name in layer_names:
            group = root[name]
            weights = {w.split('/')[-1].split(':')[0]: np.asarray(group[w]) for w in _names(group, 'weight_names')}
            if weights:
                layers[name] = weights
    return layers


def _conv(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # (kh, kw, in, out) -> OIHW


def _depthwise(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(2, 3, 0, 1)))  # (kh, kw, C, 1) -> (C, 1, kh, kw)


_CONVERT = {
    'conv': lambda w: {'weight': _conv(w['kernel']), **({'bias': torch.from_numpy(w['bias'])} if 'bias' in w else {})},
    'depthwise': lambda w: {'weight': _depthwise(w['depthwise_kernel'])},
    'separable': lambda w: {'depthwise_conv2d.weight': _depthwise(w['depthwise_kernel']),
                            'pointwise_conv2d.weight': _conv(w['pointwise_kernel'])},
    'bn': lambda w: {'weight': torch.from_numpy(w['gamma']), 'bias': torch.from_numpy(w['beta']),
                     'running_mean': torch.from_numpy(w['moving_mean']),
                     'running_var': torch.from_numpy(w['moving_variance'])},
    'dense': lambda w: {'weight': torch.from_numpy(np.ascontiguousarray(w['kernel'].T)),
                        'bias': torch.from_numpy(w['bias'])},
}


def keras_state_dict(layers: Dict[str, Dict[str, np.ndarray]], plan: Plan, source: str = 'the file') -> Dict[str, Any]:
    """The timm state dict that ``plan`` makes of Keras ``layers``; a missing layer or weight is a ValueError."""
    out = {}
    for module, layer, kind in plan:
        if layer not in layers:
            raise ValueError(f'{source} has no Keras layer {layer!r} (for {module}); it is not the weights of this '
                             f'model (see lt_timm.models.keras_applications).')
        try:
            tensors = _CONVERT[kind](layers[layer])
        except KeyError as e:
            raise ValueError(f'Keras layer {layer!r} of {source} lacks the weight {e.args[0]!r} of a {kind} '
                             f'layer.') from e
        out.update({f'{module}.{k}': v for k, v in tensors.items()})
    return out


def load_keras_weights(model: nn.Module, path: str, plan: Plan, classifier: str) -> None:
    """Load the Keras ``.h5`` file at ``path`` into ``model`` by ``plan`` (``classifier``: the timm module of the
    plan's ``dense`` layer, left as initialised when its shape does not fit ``model``'s number of classes)."""
    state = keras_state_dict(read_keras_weights(path), plan, path)
    own = model.state_dict()
    for key, value in list(state.items()):
        if key not in own:
            raise ValueError(f'{path}: {key} is not a tensor of {type(model).__name__} (a bug in the plan).')
        if tuple(value.shape) != tuple(own[key].shape):
            if key.startswith(classifier + '.'):
                state.pop(key)
                continue
            raise ValueError(f'{path}: {key} has shape {tuple(value.shape)} in the file and {tuple(own[key].shape)} '
                             f'in the model; the file holds another width or variant of the network.')
    if not any(k.startswith(classifier + '.') for k in state):
        _logger.info(f'{path}: classifier of another number of classes, left as initialised.')
    missing = [k for k in own if k not in state and not k.endswith('num_batches_tracked')
               and not k.startswith(classifier + '.')]
    if missing:
        raise ValueError(f'{path} leaves {len(missing)} tensors of the model unset (first: {missing[0]}); '
                         f'the plan does not cover the model.')
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def keras_overlay(overlay: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """timm's ``pretrained_cfg_overlay`` with ``custom_load`` set when its ``file`` is (or is named as) an HDF5
    file: timm resets ``custom_load`` for a local file, which would send a Keras file to ``torch.load``."""
    overlay = dict(overlay or {})
    path = str(overlay.get('file') or '')
    if path and 'custom_load' not in overlay and (path.lower().endswith(('.h5', '.hdf5')) or is_keras_file(path)):
        overlay['custom_load'] = True
    return overlay


def mobilenetv2_plan(model: nn.Module) -> Plan:
    """Keras ``MobileNetV2`` layer -> timm MobileNet-V2 module (``model``: timm's ``EfficientNet`` for it)."""
    plan: Plan = [('conv_stem', 'Conv1', 'conv'), ('bn1', 'bn_Conv1', 'bn')]
    blocks = [f'blocks.{s}.{j}' for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    first = blocks[0]  # Keras's block 0: no expansion, names 'expanded_conv_*'
    plan += [(f'{first}.conv_dw', 'expanded_conv_depthwise', 'depthwise'),
             (f'{first}.bn1', 'expanded_conv_depthwise_BN', 'bn'),
             (f'{first}.conv_pw', 'expanded_conv_project', 'conv'),
             (f'{first}.bn2', 'expanded_conv_project_BN', 'bn')]
    for i, block in enumerate(blocks[1:], start=1):
        k = f'block_{i}_'
        plan += [(f'{block}.conv_pw', k + 'expand', 'conv'), (f'{block}.bn1', k + 'expand_BN', 'bn'),
                 (f'{block}.conv_dw', k + 'depthwise', 'depthwise'), (f'{block}.bn2', k + 'depthwise_BN', 'bn'),
                 (f'{block}.conv_pwl', k + 'project', 'conv'), (f'{block}.bn3', k + 'project_BN', 'bn')]
    plan += [('conv_head', 'Conv_1', 'conv'), ('bn2', 'Conv_1_bn', 'bn'), ('classifier', 'predictions', 'dense')]
    return plan


def _load_mobilenetv2(model: nn.Module, path: str) -> None:
    load_keras_weights(model, path, mobilenetv2_plan(model), 'classifier')


default_cfgs = generate_default_cfgs({
    f'tf_mobilenetv2_100.{KERAS_TAG}': dict(
        url=KERAS_URL + 'mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5',
        custom_load=True, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation='bilinear', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv='conv_stem',
        classifier='classifier', license='apache-2.0',
        origin_url='https://keras.io/api/applications/mobilenet/',
        notes=('Keras Applications MobileNetV2 (alpha 1.0, 224), ImageNet-1k; preprocessing x / 127.5 - 1',)),
})


@register_model
def tf_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNet-V2 1.0 with TensorFlow "same" padding and BatchNorm eps 1e-3 (Keras Applications' MobileNetV2)."""
    cfg = resolve_pretrained_cfg('tf_mobilenetv2_100', kwargs.pop('pretrained_cfg', None),
                                 keras_overlay(kwargs.pop('pretrained_cfg_overlay', None)))
    kwargs.setdefault('pad_type', 'same')
    kwargs.setdefault('bn_eps', BN_EPS_TF)
    model = timm_efficientnet.mobilenetv2_100(pretrained=False, pretrained_cfg=cfg, **kwargs)
    model.load_pretrained = partial(_load_mobilenetv2, model)  # timm's custom_load door (a .h5 file)
    if pretrained:
        load_pretrained(model, cfg.to_dict(), num_classes=model.num_classes, in_chans=kwargs.get('in_chans', 3))
    return model
