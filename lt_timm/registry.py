"""Loss registry: ``--loss NAME`` -> a factory that builds the training criterion.

Factories receive timm's loss options (the same flags timm's ``train.py`` reads) and return an
``nn.Module``. ``'losstransform'`` wraps the criterion timm's own flags would pick, so
``--smoothing``, ``--mixup``/``--cutmix`` and ``--bce-loss`` keep working underneath T(L).
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch.nn as nn
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .loss import LossTransform

__all__ = ['LossOptions', 'register_loss', 'create_loss', 'list_losses', 'is_registered', 'timm_criterion',
           'describe_criterion']


@dataclass
class LossOptions:
    """The options timm's train.py uses to pick a criterion, plus LossTransform's own."""
    smoothing: float = 0.
    mixup_active: bool = False
    bce_loss: bool = False
    bce_target_thresh: Optional[float] = None
    bce_sum: bool = False
    bce_pos_weight: Optional[float] = None
    jsd_splits: int = 0
    aug_repeats: int = 0
    rho: float = 1.0
    detach_consensus: bool = False
    reverse_kl: bool = False


_loss_factories: Dict[str, Callable[[LossOptions], nn.Module]] = {}


def register_loss(name: str):
    """Decorator: register ``fn(options: LossOptions) -> nn.Module`` under ``name``."""
    def _register(fn):
        if name in _loss_factories:
            raise ValueError(f'loss {name!r} is already registered.')
        _loss_factories[name] = fn
        return fn
    return _register


def list_losses() -> List[str]:
    return sorted(_loss_factories)


def is_registered(name: str) -> bool:
    return name in _loss_factories


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build the criterion registered as ``name``; kwargs are :class:`LossOptions` fields."""
    if name not in _loss_factories:
        raise ValueError(f'unknown --loss {name!r}; choose one of: {", ".join(list_losses())}.')
    unknown = set(kwargs) - set(LossOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f'unknown loss option(s) {sorted(unknown)}; valid: {sorted(LossOptions.__dataclass_fields__)}.')
    return _loss_factories[name](LossOptions(**kwargs))


def _bce(o: LossOptions, smoothing: float) -> nn.Module:
    return BinaryCrossEntropy(
        smoothing=smoothing, target_threshold=o.bce_target_thresh, sum_classes=o.bce_sum, pos_weight=o.bce_pos_weight)


def timm_criterion(o: LossOptions) -> nn.Module:
    """The criterion timm's train.py picks from its flags (mixup targets carry the smoothing)."""
    if o.mixup_active:
        return _bce(o, 0.) if o.bce_loss else SoftTargetCrossEntropy()
    if o.smoothing:
        return _bce(o, o.smoothing) if o.bce_loss else LabelSmoothingCrossEntropy(smoothing=o.smoothing)
    return _bce(o, 0.) if o.bce_loss else nn.CrossEntropyLoss()


def describe_criterion(criterion: nn.Module) -> str:
    """One line saying what the criterion is, e.g. for the start-of-run log."""
    if isinstance(criterion, LossTransform):
        return f'LossTransform(base={type(criterion.base_loss).__name__}, {criterion.extra_repr()})'
    return type(criterion).__name__


@register_loss('ce')
def _create_ce(o: LossOptions) -> nn.Module:
    """timm's default: CE, label-smoothing CE, soft-target CE under mixup, or BCE with --bce-loss."""
    return timm_criterion(o)


@register_loss('bce')
def _create_bce(o: LossOptions) -> nn.Module:
    """timm's BinaryCrossEntropy (as --bce-loss)."""
    return _bce(o, 0. if o.mixup_active else o.smoothing)


@register_loss('jsd')
def _create_jsd(o: LossOptions) -> nn.Module:
    """AugMix's JSD + CE over --aug-splits splits (timm JsdCrossEntropy)."""
    if o.jsd_splits < 2:
        raise ValueError('--loss jsd needs --aug-splits >= 2 (e.g. --aug-splits 3).')
    if o.mixup_active:
        raise ValueError('--loss jsd cannot be combined with mixup/cutmix (timm JsdCrossEntropy takes class indices).')
    return JsdCrossEntropy(num_splits=o.jsd_splits, smoothing=o.smoothing)


@register_loss('losstransform')
def _create_losstransform(o: LossOptions) -> nn.Module:
    """T(L) over timm's criterion; needs --aug-repeats >= 2 so each image has replicas to compare."""
    if o.aug_repeats < 2:
        raise ValueError(
            f'--loss losstransform needs --aug-repeats >= 2 (replicas of each image in the batch), '
            f'got {o.aug_repeats}; e.g. --aug-repeats 3.')
    return LossTransform(
        timm_criterion(o), num_repeats=int(o.aug_repeats), rho=o.rho,
        detach_consensus=o.detach_consensus, reverse_kl=o.reverse_kl)
