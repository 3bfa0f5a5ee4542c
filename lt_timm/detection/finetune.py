"""Fine-tuning torchvision's COCO detectors, the paper's Table 6 protocol (Faster R-CNN, RetinaNet and Mask R-CNN*
with FPN and RPN frozen, fine-tuned with LT-v1 at the reference recipe's last lr, flips only).

* :func:`build_model` — the detector to train: :func:`~lt_timm.detection.backbone.build_detector`, or torchvision's
  COCO detector (:func:`~lt_timm.detection.backbone.build_coco_detector`) with its ``COCO_V1`` weights from
  torchvision's weights API or from a file (:func:`load_detector_checkpoint`), optionally with fresh class
  predictors;
* :func:`dataset_label_space` / :func:`check_coco_categories` — COCO category ids as labels when the COCO
  predictors are kept;
* :func:`freeze_submodules` / :func:`hold_frozen_norms` — ``--freeze NAME ...`` (Mask R-CNN*: ``backbone.fpn rpn``).

Every problem is one :class:`~lt_timm.errors.UserError` naming the fix (``train_detection.py`` exits 2).
"""
import os
from typing import Dict, List, Optional

import torch

from ..errors import UserError

__all__ = ['COCO_FIXED_FLAGS', 'uses_coco_detector', 'check_coco_detector_args', 'dataset_label_space',
           'check_coco_categories', 'read_detector_state_dict', 'load_detector_checkpoint', 'build_model',
           'freeze_submodules', 'hold_frozen_norms']

# architecture flags the COCO detectors fix (their defaults build torchvision's heads)
COCO_FIXED_FLAGS = {'anchor_sizes': None, 'fpn_channels': 256, 'mask_head_channels': 256, 'box_head_dim': 1024,
                    'fpn_strides': None, 'fpn_extra': 'pool'}


def uses_coco_detector(detector_weights: str, detector_checkpoint: str) -> bool:
    """``--detector-weights coco`` or ``--detector-checkpoint FILE``: torchvision's COCO detector is fine-tuned."""
    return detector_weights == 'coco' or bool(detector_checkpoint)


def check_coco_detector_args(model: str, backbone: str, pretrained: bool, checkpoint: str,
                             arch_flags: Optional[Dict] = None) -> None:
    """The flags that torchvision's COCO detectors fix (the paper's Table 6 fine-tunes them as they are): one-line
    UserErrors naming the fix. ``arch_flags``: the values of :data:`COCO_FIXED_FLAGS`' flags."""
    from .backbone import coco_detector_name
    try:
        coco_detector_name(model, backbone)
    except ValueError as e:  # names the (--model, --backbone) pairs torchvision has COCO weights for
        raise UserError(str(e)) from None
    if pretrained:
        raise UserError('--pretrained loads ImageNet backbone weights, which the COCO detector\'s weights replace; '
                        'drop --pretrained.')
    changed = {k: v for k, v in (arch_flags or {}).items() if k in COCO_FIXED_FLAGS and v != COCO_FIXED_FLAGS[k]}
    if changed:
        flags = ', '.join(f'--{k.replace("_", "-")} {v}' for k, v in changed.items())
        raise UserError(f'{flags} would change the COCO detector\'s architecture (its weights fit torchvision\'s '
                        f'anchors and heads); drop {"them" if len(changed) > 1 else "it"}.')
    if checkpoint and not os.path.isfile(checkpoint):
        raise _checkpoint_not_found(checkpoint, model, backbone)


def _coco_url(model: str, backbone: str = 'tv_resnet50') -> str:
    from .backbone import coco_detector_weights
    return coco_detector_weights(model, backbone).url


def _checkpoint_not_found(path: str, model: str, backbone: str = 'tv_resnet50') -> UserError:
    return UserError(f'--detector-checkpoint {path} not found; pass the path of torchvision\'s COCO weights for '
                     f'--model {model} ({_coco_url(model, backbone)}), or --detector-weights coco to download them.')


def dataset_label_space(dataset: str, coco_detector: bool, reset_predictors: bool) -> str:
    """``'coco_ids'`` when torchvision's COCO detector keeps its COCO predictors on a COCO dataset (it predicts
    category ids), else ``'contiguous'``. A dataset whose labels cannot be COCO category ids (PennFudanPed) with the
    COCO predictors is a UserError: ``--reset-predictors`` gives it fresh ones."""
    if not coco_detector or reset_predictors:
        return 'contiguous'
    if dataset == 'coco':
        return 'coco_ids'
    raise UserError(f'--dataset {dataset}: its labels are not COCO category ids, which the COCO detector\'s '
                    f'predictors output; pass --reset-predictors to fine-tune fresh class predictors for this '
                    f'dataset (torchvision\'s fine-tuning tutorial), or train without --detector-weights / '
                    f'--detector-checkpoint.')


def check_coco_categories(categories: List[Dict], coco_names: List[str], where: str) -> None:
    """Every category ``{'id', 'name'}`` of a ``coco_ids`` dataset must be the COCO detector's class of that id
    (``coco_names[id]``, torchvision's ``COCO_V1.meta['categories']``): otherwise its predictions mean something
    else."""
    for c in categories:
        cid, name = int(c['id']), str(c['name'])
        have = coco_names[cid] if 0 < cid < len(coco_names) else None
        if have != name or have == 'N/A':
            what = f'COCO\'s category {cid} is {have!r}' if have and have != 'N/A' else \
                f'the COCO detector has no category {cid}'
            raise UserError(f'category {cid} {name!r} of {where} is not a COCO category ({what}): the COCO '
                            f'detector predicts COCO category ids; pass --reset-predictors to fine-tune fresh class '
                            f'predictors for this dataset.')


def read_detector_state_dict(path: str, model: str, backbone: str = 'tv_resnet50') -> Dict[str, torch.Tensor]:
    """The state dict in ``path``: a plain torchvision state dict (the COCO_V1 file), or a dict holding one as
    ``model`` (torchvision's reference scripts) or ``state_dict`` (timm / this trainer). Problems are UserErrors."""
    from ..modeling import read_checkpoint  # imports timm: not at module level (keeps --help light)
    if not os.path.isfile(path):
        raise _checkpoint_not_found(path, model, backbone)
    try:
        content = read_checkpoint(path)
    except Exception as e:
        lines = str(e).strip().splitlines()
        reason = 'it is empty (0 bytes)' if os.path.getsize(path) == 0 else \
            f'truncated or corrupt: {lines[0][:160] if lines else type(e).__name__}'
        raise UserError(f'--detector-checkpoint {path} is not a readable PyTorch file ({reason}); download it again '
                        f'({_coco_url(model, backbone)}) or pass another copy.') from e
    for key in ('model', 'state_dict'):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict) or not content or not all(torch.is_tensor(v) for v in content.values()):
        raise UserError(f'--detector-checkpoint {path} holds no state dict (a dict of tensors, or one under '
                        f'\'model\' / \'state_dict\'); pass torchvision\'s COCO weights file '
                        f'({_coco_url(model, backbone)}).')
    return content


def load_detector_checkpoint(detector: torch.nn.Module, path: str, model: str,
                             backbone: str = 'tv_resnet50') -> None:
    """Load a torchvision-format state dict (:func:`read_detector_state_dict`) into torchvision's COCO detector,
    every tensor exactly; a file of another architecture is one UserError listing what does not fit."""
    from .backbone import coco_detector_name
    state = read_detector_state_dict(path, model, backbone)
    own = detector.state_dict()
    given = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}  # FrozenBatchNorm2d drops them
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [f'{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}' for k in own
              if k in given and given[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f'{len(v)} {what} (e.g. {v[0]})' for what, v in (('missing keys', missing),
                                                                   ('unexpected keys', unexpected),
                                                                   ('shape mismatches, file vs model', shapes)) if v]
        raise UserError(f'--detector-checkpoint {path} is not a state dict of torchvision\'s '
                        f'{coco_detector_name(model, backbone)} '
                        f'with 91 COCO classes: {"; ".join(parts)}; pass that detector\'s COCO weights '
                        f'({_coco_url(model, backbone)}) or a checkpoint saved from it, matching --model {model} '
                        f'(a run of this trainer continues with --resume).')
    detector.load_state_dict(state)


def build_model(model: str, backbone: str, num_classes: int, coco_detector: bool = False,
                detector_checkpoint: str = '', reset_predictors: bool = False, options: Optional[Dict] = None,
                runtime: Optional[Dict] = None) -> torch.nn.Module:
    """The detector to train. Without ``coco_detector``: :func:`~lt_timm.detection.backbone.build_detector` with
    ``options``. With it (the paper's Table 6): torchvision's COCO detector with ``runtime`` settings, its weights
    from ``detector_checkpoint`` or else torchvision's weights API (``COCO_V1``), then, with ``reset_predictors``,
    fresh class predictors for ``num_classes``."""
    from .backbone import build_coco_detector, build_detector, load_coco_weights, reset_class_predictors
    if not coco_detector:
        return build_detector(model, backbone, num_classes, **(options or {}))
    detector = build_coco_detector(model, backbone=backbone, **(runtime or {}))
    if detector_checkpoint:
        load_detector_checkpoint(detector, detector_checkpoint, model, backbone)
    else:
        load_coco_weights(detector, model, backbone=backbone)
    if reset_predictors:
        reset_class_predictors(detector, num_classes)
    return detector


# ------------------------------------------------------------------------------------------------ freezing
def freeze_submodules(model: torch.nn.Module, names: List[str]) -> List[str]:
    """Freeze the submodules ``names`` (dotted, as in ``model.named_modules()``, e.g. ``backbone.fpn``, ``rpn``:
    the paper's Mask R-CNN* freezes FPN and RPN): their parameters get ``requires_grad = False``, so they get no
    gradient and stay out of the optimizer. Their losses still count, and gradients still pass through them to the
    layers below. Unknown names are a UserError listing the valid ones. Returns the frozen parameter names."""
    modules = dict(model.named_modules())
    for name in names:
        if not name or name not in modules:
            raise UserError(f'--freeze {name!r} is not a submodule of the detector; valid names: '
                            f'{_valid_names_near(model, modules, name)}.')
    frozen = []
    for name in names:
        for pname, p in modules[name].named_parameters(prefix=name):
            p.requires_grad_(False)
            frozen.append(pname)
    return sorted(set(frozen))


def _valid_names_near(model: torch.nn.Module, modules: Dict, name: str) -> str:
    """The top-level submodule names, and the children of the deepest existing parent of ``name``."""
    top = ', '.join(n for n, _ in model.named_children())
    parent = name.rsplit('.', 1)[0] if '.' in name else ''
    while parent and parent not in modules:
        parent = parent.rsplit('.', 1)[0] if '.' in parent else ''
    if not parent:
        return top
    children = ', '.join(f'{parent}.{n}' for n, _ in modules[parent].named_children())
    return f'{top} (top level); {children}'


def hold_frozen_norms(model: torch.nn.Module, names: List[str]) -> None:
    """Put the BatchNorm layers inside the frozen submodules in eval mode (call after ``model.train()``): a frozen
    module keeps its running statistics too (torchvision's COCO detectors use FrozenBatchNorm2d, which has none)."""
    modules = dict(model.named_modules())
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
    for name in names:
        for m in modules[name].modules():
            if isinstance(m, norms):
                m.eval()
