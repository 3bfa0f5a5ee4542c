"""Model creation and checkpoint loading for train.py, validate.py and the launcher: timm's, with clear errors.

Every way a checkpoint can be wrong gets its own message: missing, empty (a save that was killed), not a PyTorch file
(truncated or garbage), not a state dict (e.g. a pickled list), or the weights of another model / number of classes.
"""
import argparse
import logging
import os
from typing import Optional

import torch
import torch.nn as nn
import timm

from . import models as _models  # noqa: F401  (registers lt-timm's models with timm)
from .errors import UserError

__all__ = ['create_model', 'load_weights', 'checkpoint_problem', 'read_checkpoint', 'read_checkpoint_meta',
           'read_checkpoint_args', 'all_finite']

_logger = logging.getLogger(__name__)


def create_model(
        name: str,
        num_classes: int,
        in_chans: int = 3,
        pretrained: bool = False,
        pretrained_path: Optional[str] = None,
        initial_checkpoint: str = '',
        **model_kwargs,
) -> nn.Module:
    """``timm.create_model`` as timm's train.py calls it (``pretrained_path`` adapts the head; ``model_kwargs``: drop
    rates, BatchNorm overrides, ``--model-kwargs``), then an optional ``initial_checkpoint`` loaded as is."""
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise UserError(f'--pretrained-path {pretrained_path} not found; check the path.')
        model_kwargs['pretrained_cfg_overlay'] = dict(file=pretrained_path, num_classes=-1)
    try:
        model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes,
                                  **model_kwargs)
    except TypeError as e:
        raise UserError(f'--model {name} does not take these arguments ({e}); check --model-kwargs and the '
                        f'BatchNorm/drop flags.') from e
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise UserError(f'unknown --model {name!r}; list names with python -c "import timm; '
                            f'print(timm.list_models(\'*{name[:6]}*\'))".') from e
        if pretrained_path:
            raise UserError(checkpoint_problem(pretrained_path, e, f'--model {name}')) from e
        raise
    if initial_checkpoint:
        load_weights(model, initial_checkpoint, f'--model {name} with {num_classes} classes')
    return model


def load_weights(model: nn.Module, path: str, description: str, use_ema: bool = False) -> None:
    """Load a checkpoint's weights (``use_ema``: its EMA weights) into ``model`` with timm's loader; a model's own
    ``checkpoint_filter_fn`` applies. Every failure is one UserError saying what is wrong with the file."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} not found; check the path.')
    try:
        # A model may carry a filter for checkpoints published in another format (e.g. the CIFAR ResNets').
        timm.models.load_checkpoint(model, path, use_ema=use_ema, filter_fn=_clear_filter_errors(model))
    except UserError:
        raise
    except Exception as e:  # torch.load on garbage raises anything, UnicodeDecodeError included
        raise UserError(checkpoint_problem(path, e, description)) from e


def _clear_filter_errors(model: nn.Module):
    """The model's ``checkpoint_filter_fn`` with its ValueErrors (already clear messages) raised as UserErrors."""
    filter_fn = getattr(model, 'checkpoint_filter_fn', None)
    if filter_fn is None:
        return None

    def apply(state_dict, model):
        try:
            return filter_fn(state_dict, model)
        except ValueError as e:
            raise UserError(str(e)) from e
    return apply


def read_checkpoint(path: str, mmap: bool = False):
    """The content of a checkpoint file, read safely (``weights_only``; the ``args`` Namespace that train.py and
    timm store allowed), on the CPU; ``mmap``: tensors mapped, not read (cheap for the non-tensor entries). Raises
    whatever ``torch.load`` raises on a bad file."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)


def read_checkpoint_meta(path: str) -> Optional[dict]:
    """A checkpoint's content with its tensors memory-mapped (epoch, args, metric, bookkeeping), or ``None`` when
    the file is missing or not a readable checkpoint dict."""
    for mmap in (True, False):  # files of the legacy (non-zip) format cannot be mapped
        try:
            content = read_checkpoint(path, mmap=mmap)
        except Exception:
            continue
        return content if isinstance(content, dict) else None
    return None


def checkpoint_problem(path: str, error: BaseException, description: str) -> str:
    """Why ``path`` could not be loaded, in one sentence with the fix (diagnosed from the file, not the exception)."""
    if os.path.getsize(path) == 0:
        return (f'checkpoint {path} is empty (0 bytes): it was not written completely; use another checkpoint '
                f'of the run (e.g. model_best.pth.tar or checkpoint-N.pth.tar).')
    try:
        content = read_checkpoint(path)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return (f'checkpoint {path} is not a readable PyTorch file (truncated or corrupt: {reason}); '
                f'use another checkpoint of the run.')
    if not isinstance(content, dict) or not any(isinstance(v, (dict, torch.Tensor)) for v in content.values()):
        return (f'checkpoint {path} holds a {type(content).__name__}, not model weights (a state dict); '
                f'pass a file saved by train.py or timm.')
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f'checkpoint {path} does not fit {description} ({first}); use a checkpoint of the same model and classes.'


def read_checkpoint_args(path: str) -> Optional[argparse.Namespace]:
    """The training arguments stored in a train.py checkpoint (``None`` for other files)."""
    content = read_checkpoint_meta(path)
    args = content.get('args') if content is not None else None
    return args if isinstance(args, argparse.Namespace) else None


@torch.no_grad()
def all_finite(module: nn.Module) -> bool:
    """True when every floating-point parameter and buffer is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True
