"""lt-timm: LossTransform for PyTorch Image Models (timm), as a plugin.

Importing it registers lt-timm's models with timm (CIFAR ResNets, DenseNet-40, torchvision V1 models, and the
EfficientNet-PyTorch checkpoint layout for timm's ``tf_efficientnet_*``): see :mod:`lt_timm.models`.
"""
from . import models  # noqa: F401  (registers with timm)
from .layout import block_runs, block_sizes, num_blocks, replica_groups
from .loss import LossTransform, blockwise_kl, grouped_kl, consensus_log_prob, log_distribution
from .registry import LossOptions, create_loss, register_loss, list_losses, is_registered, timm_criterion
from .sampler import RepeatedAugBatchSampler
from .loader import create_loader

__version__ = '0.1.0'


def __getattr__(name):  # lazy, so `python -m lt_timm.launch` does not import lt_timm.launch twice (runpy warning)
    if name == 'patch_timm_train':
        from .launch import patch_timm_train
        return patch_timm_train
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
