"""The hooks of ``python -m lt_timm.launch``, one function per hook, in the order :mod:`lt_timm.launch` installs
them (:data:`HOOKS`): flags, loader, criterion, epoch, guard. Each records what it sees in the
:class:`~lt_timm.launch_state.LaunchState` and acts only while that state is the active one; every replacement goes
through ``state.patches`` (undone by :meth:`~lt_timm.launch_state.LaunchState.close`).
"""
import functools
import importlib
import inspect
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Tuple

import timm
import timm.data
import timm.data.loader
import torch.optim.optimizer as torch_optimizer
import torch.utils.data.dataloader as torch_dataloader

from .cli.checks import check_launch_args
from .cli.flags import add_launch_args
from .launch_state import (LaunchError, LaunchState, TrainingTask, active, base_name, grouped_class, is_primary,
                           script_name, timm_version)
from .loader import create_loader as lt_create_loader
from .sampler import RepeatedAugBatchSampler

__all__ = ['hook_flags', 'hook_loader', 'hook_criterion', 'hook_epoch', 'hook_guard', 'HOOKS']

_logger = logging.getLogger('lt_timm.launch')


def _patch_script_globals(state: LaunchState, replacements: Dict[int, Callable]) -> None:
    """Every global of the script bound to a hooked timm function (under any name) gets the hook too."""
    for name, obj in list(vars(state.module).items()):
        if callable(obj) and id(obj) in replacements:
            state.patches.set(state.module, name, replacements[id(obj)])


# ---------------------------------------------------------------- flags

def hook_flags(state: LaunchState) -> None:
    """The script's module-level ``parser`` gains LossTransform's flags (YAML ``-c`` recipes may set them too); its
    ``parse_known_args`` (which ``parse_args`` calls) is wrapped to capture and check the parsed ``args``."""
    parser = state.module.parser
    add_launch_args(parser)
    orig_parse_known = parser.parse_known_args

    @functools.wraps(orig_parse_known)
    def parse_known_args(args=None, namespace=None):
        ns, rest = orig_parse_known(args, namespace)
        check_launch_args(ns, parser.error)
        first = state.args is None
        state.args = ns
        if first and is_primary():
            _logger.info(
                f'lt_timm.launch: patched {os.path.basename(script_name(state.module))} (timm {timm_version()}): '
                f'--loss {ns.loss}, aug_repeats={state.aug_repeats}, lt_epoch={ns.lt_epoch}, lt_rho={ns.lt_rho}; '
                f'loader: timm.data.create_loader -> lt_timm.create_loader; criterion hook: {state.loss_hooks()}; '
                f'guard: optimizer step pre-hook')
        return ns, rest

    state.patches.set(parser, 'parse_known_args', parse_known_args)


# ---------------------------------------------------------------- loader

def _loader_kwargs(state: LaunchState, signature: inspect.Signature, args, kwargs) -> dict:
    """A timm ``create_loader`` call's arguments, all named (lt_timm's positional order differs), with the grouped
    sampler's epoch mode and seed from the flags."""
    a = state.args
    if a is None:
        raise LaunchError('create_loader was called before the script parsed its arguments; '
                          'lt_timm.launch cannot know --aug-repeats/--lt-epoch.')
    kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
    extra = kwargs.pop('kwargs', None)
    if isinstance(extra, dict):
        kwargs.update(extra)
    if kwargs.get('is_training', False) and (kwargs.get('num_aug_repeats', 0) or 0):
        for k in ('batch_size_choices', 'num_batches'):
            if kwargs.get(k) is not None:
                raise LaunchError(f'create_loader({k}=...) is not supported with --aug-repeats by lt_timm.launch.')
    kwargs.setdefault('aug_repeat_mode', a.lt_epoch)
    kwargs.setdefault('seed', int(getattr(a, 'seed', 0) or 0))
    return kwargs


def _adopt_grouped_sampler(state: LaunchState, loader) -> None:
    """The training loader's grouped sampler picks its epoch at each pass (:func:`grouped_class`); noted in
    ``state``."""
    inner = getattr(loader, 'loader', loader)
    bs = getattr(inner, 'batch_sampler', None)
    if not isinstance(bs, RepeatedAugBatchSampler):
        return
    bs.__class__ = grouped_class(type(bs))
    bs._lt_state = state
    bs._lt_set_epoch = bs._lt_fn_epoch = bs._lt_last_epoch = None
    state.samplers.append(bs)
    state.train_loaders.append(loader)
    state.sampler_desc = (f'grouped repeats m={bs.num_repeats}, mode={bs.epoch_mode}, seed={bs.seed}, '
                          f'batch={bs.batch_size}, world_size={bs.num_replicas}')
    if is_primary():
        _logger.info(f'lt_timm.launch: training sampler: {state.sampler_desc}')


def hook_loader(state: LaunchState) -> None:
    """``timm.data.create_loader`` and ``timm.data.loader.create_loader`` themselves (and any script global bound to
    them, under any name) become :func:`lt_timm.create_loader`: every training loader with ``num_aug_repeats``
    groups the replicas of an image in one batch on one rank, one process or DDP."""
    orig_create_loader = timm.data.loader.create_loader
    signature = inspect.signature(orig_create_loader)

    def create_loader(*args, **kwargs):
        if state.in_lt_loader or active() is not state:
            return orig_create_loader(*args, **kwargs)  # lt_timm.create_loader building on timm's
        kwargs = _loader_kwargs(state, signature, args, kwargs)
        state.in_lt_loader += 1
        try:
            loader = lt_create_loader(**kwargs)
        except ValueError as e:  # lt-timm's grouped sampler / loader checks: one line, not a traceback
            raise LaunchError(str(e)) from None
        finally:
            state.in_lt_loader -= 1
        if kwargs.get('is_training', False) and (kwargs.get('num_aug_repeats', 0) or 0):
            _adopt_grouped_sampler(state, loader)
        return loader

    create_loader.__wrapped__ = orig_create_loader
    for mod in (timm.data.loader, timm.data):
        if getattr(mod, 'create_loader', None) is orig_create_loader:
            state.patches.set(mod, 'create_loader', create_loader)
    _patch_script_globals(state, {id(orig_create_loader): create_loader})


# ---------------------------------------------------------------- criterion

def _wrap_loss_fn(fn: Callable, name: str, state: LaunchState) -> Callable:
    """A script training function whose ``loss_fn`` argument becomes ``LossTransform(loss_fn)``."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def train_function(*args, **kwargs):
        if active() is not state:
            return fn(*args, **kwargs)
        bound = sig.bind_partial(*args, **kwargs)
        if bound.arguments.get('loss_fn') is not None:
            seen = f'{name}(loss_fn) = {base_name(bound.arguments["loss_fn"])}'
            if not state.seen_criteria or state.seen_criteria[-1] != seen:
                state.seen_criteria.append(seen)
            bound.arguments['loss_fn'] = state.wrap_criterion(bound.arguments['loss_fn'], via=f'{name}(loss_fn)')
        return fn(*bound.args, **bound.kwargs)

    return train_function


def hook_criterion(state: LaunchState) -> None:
    """``timm.task.TrainingTask.__setattr__`` wraps whatever is assigned to a task's ``criterion`` (every task
    class, ``criterion=`` or ``criterion_kwargs=``); for scripts predating the task API, the ``loss_fn`` argument of
    the script's training functions is wrapped. The validation loss is untouched."""
    if TrainingTask is not None:
        orig_setattr = TrainingTask.__setattr__

        def __setattr__(task, name, value):
            if name == 'criterion' and active() is state and value is not None:
                via = f'{type(task).__name__}.criterion'
                state.seen_criteria.append(f'{via} = {base_name(value)}')
                value = state.wrap_criterion(value, via=via)
            orig_setattr(task, name, value)

        state.patches.set(TrainingTask, '__setattr__', __setattr__)
    for name in state.loss_fn_functions:
        state.patches.set(state.module, name, _wrap_loss_fn(getattr(state.module, name), name, state))


# ---------------------------------------------------------------- epoch

def _resume_functions() -> List[Tuple[Any, str, Callable, str]]:
    """(module, attribute, function, label) of timm's resume helpers that return the epoch to start at."""
    found = []
    for modname, attr, label in (('timm.models', 'resume_checkpoint', 'resume_checkpoint'),
                                 ('timm.models._helpers', 'resume_checkpoint', 'resume_checkpoint'),
                                 ('timm.task', 'resume_task_checkpoint', 'resume_task_checkpoint'),
                                 ('timm.task._helpers', 'resume_task_checkpoint', 'resume_task_checkpoint')):
        mod = sys.modules.get(modname)
        if mod is None:
            try:
                mod = importlib.import_module(modname)
            except Exception:  # pragma: no cover
                continue
        fn = getattr(mod, attr, None)
        if callable(fn):
            found.append((mod, attr, fn, label))
    return found


def _note_resume(fn: Callable, label: str, state: LaunchState) -> Callable:
    """A timm resume helper that records the epoch it returns (the first call's)."""
    @functools.wraps(fn)
    def resume(*args, **kwargs):
        epoch = fn(*args, **kwargs)
        if active() is state and not state.resume_calls:
            state.resume_calls += 1
            state.resume_epoch = epoch
            state.resume_fn = label
        return epoch
    return resume


def _note_epoch(fn: Callable, name: str, state: LaunchState) -> Callable:
    """A script training function whose ``epoch`` argument goes to the grouped sampler(s)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def train_function(*args, **kwargs):
        if active() is not state:
            return fn(*args, **kwargs)
        bound = sig.bind_partial(*args, **kwargs)
        epoch = bound.arguments.get('epoch')
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            for s in state.samplers:
                s._lt_fn_epoch = (epoch, f'{name}(epoch=)')
        return fn(*bound.args, **bound.kwargs)

    return train_function


def hook_epoch(state: LaunchState) -> None:
    """The grouped sampler picks its epoch when each pass starts (:meth:`LaunchState.pass_epoch`): the
    ``set_epoch`` the script called, else the ``epoch`` argument of the script's training function, else one more
    than its previous pass; the first pass starts at ``--start-epoch`` or the epoch
    ``timm.models.resume_checkpoint`` / ``timm.task.resume_task_checkpoint`` returned."""
    replacements: Dict[int, Callable] = {}
    for mod, attr, fn, label in _resume_functions():
        if id(fn) not in replacements:
            replacements[id(fn)] = _note_resume(fn, label, state)
        state.patches.set(mod, attr, replacements[id(fn)])
    _patch_script_globals(state, replacements)
    for name in state.train_functions:
        state.patches.set(state.module, name, _note_epoch(getattr(state.module, name), name, state))


# ---------------------------------------------------------------- guard

def hook_guard(state: LaunchState) -> None:
    """A global ``torch.optim`` step pre-hook (and post-hook) runs :meth:`LaunchState.on_step_pre` before every
    optimizer step; ``DataLoader`` iterators' ``__next__`` notes which sampler the latest batch came from."""
    state.handles.append(torch_optimizer.register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: state.on_step_pre(opt)))
    state.handles.append(torch_optimizer.register_optimizer_step_post_hook(
        lambda opt, args, kwargs: state.on_step_post(opt)))
    base_iter = torch_dataloader._BaseDataLoaderIter
    orig_next = base_iter.__next__

    def __next__(it):
        if active() is state:
            state.note_fetch(it)
        return orig_next(it)

    state.patches.set(base_iter, '__next__', __next__)


HOOKS = (hook_flags, hook_loader, hook_criterion, hook_epoch, hook_guard)
