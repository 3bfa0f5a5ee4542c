"""Run timm's own, unmodified ``train.py`` with LossTransform — no fork of the script.

Usage::

    python -m lt_timm.launch PATH/TO/train.py DATA [timm flags] --loss losstransform --aug-repeats 3 [--lt-rho 1.0]
    torchrun --nproc_per_node 2 -m lt_timm.launch PATH/TO/train.py DATA --device cpu ... --loss losstransform ...

The script is loaded as a module (its ``if __name__ == '__main__'`` block does not run), patched by
:func:`patch_timm_train`, and its ``main()`` is called with ``sys.argv`` set to the user's flags.

Where the patches sit (so that renaming or restructuring the script does not route around them):

* flags: the module-level argparse ``parser`` gains ``--loss {ce,losstransform}``, ``--lt-rho``, ``--lt-detach``,
  ``--lt-reverse-kl``, ``--lt-epoch`` (YAML ``-c`` recipes may set them too); its ``parse_known_args`` is wrapped to
  capture and check the parsed ``args``.
* loader: ``timm.data.create_loader`` and ``timm.data.loader.create_loader`` themselves (and any script global bound
  to them, under any name) are replaced by a wrapper around :func:`lt_timm.create_loader`, so every training loader
  with ``num_aug_repeats`` groups the replicas of an image in one batch on one rank — one process or DDP, however
  the script reaches the function.
* criterion: ``timm.task.TrainingTask.__setattr__`` wraps whatever is assigned to a task's ``criterion`` in
  :class:`~lt_timm.loss.LossTransform` — every task class (``ClassificationTask``, distillation tasks, subclasses),
  however the script names it, whether the criterion was passed in or built from ``criterion_kwargs`` by
  ``timm.loss.create_classification_loss``; for scripts predating the task API, the ``loss_fn`` argument of every
  function of the script that takes ``optimizer`` and ``loss_fn`` (``train_one_epoch``, under any name) is wrapped.
  The validation loss is untouched.
* epoch: the grouped sampler picks its epoch when each pass starts: the ``set_epoch`` the script called, else the
  ``epoch`` argument of the script's training function, else one more than its previous pass; the first pass starts
  at ``--start-epoch`` or the epoch ``timm.models.resume_checkpoint`` / ``timm.task.resume_task_checkpoint``
  returned (scripts up to timm 1.0.28 never call ``set_epoch`` on it in one process).
* guard: a global ``torch.optim`` step pre-hook checks, before every optimizer step, that the batch came from the
  launcher's grouped sampler (the most recent ``DataLoader`` batch), that a :class:`LossTransform` built by the
  launcher ran on it with gradients and that the backward pass went through it; before the first step also that its
  base loss is the one the script's flags select, that ``m`` and ``rho`` are the flags' and that the batch has the
  layout the loss assumes. Otherwise it raises :class:`LaunchError` (exit code 2) naming what it could not hook.
  A run that ends without a verified step, or after a refused one, is an error too: no path exits 0 having trained
  without LossTransform.

Every patch is undone when the run ends (:meth:`LaunchState.close`).
"""
import argparse
import functools
import importlib.util
import inspect
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.optim.optimizer as _torch_optimizer
import torch.utils.data.dataloader as _torch_dataloader
import timm
import timm.data
import timm.data.loader

from .cli.checks import check_args
from .cli.flags import add_losstransform_args, LT_ARG_DEFAULTS
from .registry import describe_criterion
from .layout import block_sizes
from .loader import create_loader as lt_create_loader
from .loss import LossTransform
from .sampler import EPOCH_MODES, RepeatedAugBatchSampler

try:  # the task API (timm >= 1.0.2x); older timm has only train_one_epoch(loss_fn) scripts
    import timm.task
    import timm.task.task as _timm_task_mod
    TrainingTask = _timm_task_mod.TrainingTask
except Exception:  # pragma: no cover - depends on the installed timm
    TrainingTask = None

__all__ = ['patch_timm_train', 'load_script', 'run_script', 'LaunchError', 'LaunchState', 'main']

_logger = logging.getLogger(__name__)

LAUNCH_LOSSES = ('ce', 'losstransform')
_LT_OPTIONS = ('--loss', '--lt-rho', '--lt-detach', '--lt-reverse-kl', '--lt-epoch')
_SCRIPT_MODULE_NAME = '_lt_timm_launched_script'

_ACTIVE: Optional['LaunchState'] = None  # the state whose hooks are installed (one launched script per process)


class LaunchError(RuntimeError):
    """The training script cannot be run with LossTransform as asked; nothing was trained (or the run stopped)."""


def _timm_version() -> str:
    return getattr(timm, '__version__', 'unknown')


def _script_name(module) -> str:
    return getattr(module, '__file__', None) or getattr(module, '__name__', 'the training script')


def _missing(module, hook: str, why: str) -> LaunchError:
    return LaunchError(
        f'{_script_name(module)} has no {hook} ({why}); lt_timm.launch cannot patch it, so nothing was trained '
        f'(installed timm {_timm_version()}). Use a timm train.py matching the installed timm, or lt_timm\'s own '
        f'train.py.')


def _is_primary() -> bool:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover
        pass
    return int(os.environ.get('RANK', '0')) == 0


def _params(fn: Callable) -> List[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return []


def _train_functions(module) -> Dict[str, Callable]:
    """Module-level functions defined by the script that take an ``optimizer``: its training loop(s)."""
    return {name: obj for name, obj in vars(module).items()
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and 'optimizer' in _params(obj)}


def _describe_sampler(sampler) -> str:
    if sampler is None:
        return 'no torch DataLoader batch at all (the training data did not come from a DataLoader)'
    name = type(sampler).__name__
    inner = getattr(sampler, 'sampler', None)
    if inner is not None:
        name += f'({type(inner).__name__})'
    if type(inner).__name__ == 'RepeatAugSampler':
        name += ' — timm\'s RepeatAugSampler, which deals the replicas of an image to different ranks'
    return f'a DataLoader with batch sampler {name}'


def _expected_base(args) -> Tuple[Optional[Tuple[str, ...]], str]:
    """The base-loss class name(s) timm's train.py builds for these flags, or None when the flags don't say."""
    if args is None or not hasattr(args, 'smoothing'):
        return None, 'the script has no --smoothing flag'
    loss_type = getattr(args, 'loss_type', None)
    if loss_type not in (None, '', 'ce', 'bce') or getattr(args, 'jsd_loss', False):
        return None, f'--loss-type {loss_type}'
    bce = bool(getattr(args, 'bce_loss', False)) or loss_type == 'bce'
    mixup = ((getattr(args, 'mixup', 0) or 0) > 0 or (getattr(args, 'cutmix', 0) or 0) > 0
             or getattr(args, 'cutmix_minmax', None) is not None)
    smoothing = getattr(args, 'smoothing', 0) or 0
    flags = f'--smoothing {smoothing}' + (', mixup/cutmix' if mixup else '') + (', --bce-loss' if bce else '')
    if mixup:
        return ('BinaryCrossEntropy',) if bce else ('SoftTargetCrossEntropy',), flags
    if smoothing:
        return ('BinaryCrossEntropy',) if bce else ('LabelSmoothingCrossEntropy',), flags
    # train.py keeps CE here even with --bce-loss; create_classification_loss(loss_type='bce') gives BCE
    return ('CrossEntropyLoss', 'BinaryCrossEntropy') if bce else ('CrossEntropyLoss',), flags


def _base_name(criterion) -> str:
    return getattr(criterion, '__name__', None) or type(criterion).__name__


class _Patches:
    """Attribute replacements, undone in reverse order."""

    def __init__(self):
        self._undo: List[Tuple[Any, str, bool, Any]] = []

    def set(self, obj, name: str, value) -> None:
        had = name in vars(obj)
        self._undo.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._undo:
            obj, name, had, old = self._undo.pop()
            if had:
                setattr(obj, name, old)
            else:
                try:
                    delattr(obj, name)
                except AttributeError:  # pragma: no cover
                    pass


_GROUPED_CLASSES: Dict[type, type] = {}


def _grouped_class(cls: type) -> type:
    """A subclass of the grouped sampler's class that picks its epoch at the start of each pass."""
    if cls not in _GROUPED_CLASSES:
        def set_epoch(self, epoch):
            cls.set_epoch(self, epoch)
            self._lt_set_epoch = int(epoch)

        def __iter__(self):
            state = getattr(self, '_lt_state', None)
            if state is not None:
                epoch, source = state.pass_epoch(self)
                cls.set_epoch(self, epoch)
                self._lt_epoch_source = source
            return cls.__iter__(self)

        _GROUPED_CLASSES[cls] = type(cls.__name__, (cls,), {
            'set_epoch': set_epoch, '__iter__': __iter__, '__module__': cls.__module__,
            '__qualname__': cls.__qualname__, '__doc__': cls.__doc__})
    return _GROUPED_CLASSES[cls]


class LaunchState:
    """What :func:`patch_timm_train` hooked, and what it saw at run time (for logs, checks and tests)."""

    def __init__(self, module):
        self.module = module
        self.args: Optional[argparse.Namespace] = None
        self.criteria: List[LossTransform] = []  # the LossTransform(s) installed
        self.base_criteria: List[str] = []
        self.criterion_via: Dict[int, str] = {}
        self.seen_criteria: List[str] = []  # 'via = criterion class' of every criterion the hooks saw
        self.train_functions: List[str] = []  # script functions taking optimizer (train_one_epoch ...)
        self.loss_fn_functions: List[str] = []
        self.train_loaders: List[Any] = []
        self.samplers: List[RepeatedAugBatchSampler] = []
        self.sampler_desc: Optional[str] = None
        self.resume_calls = 0
        self.resume_epoch: Optional[int] = None
        self.resume_fn: Optional[str] = None
        self.steps = 0  # verified optimizer steps
        self.refusal: Optional[LaunchError] = None
        self.first_step_line: Optional[str] = None
        self.epoch_log: List[Tuple[int, str]] = []  # (epoch, source) of every grouped pass
        self._wrapped: Dict[int, nn.Module] = {}
        self._patches = _Patches()
        self._handles: List[Any] = []
        self._in_lt_loader = 0
        self._step_depth = 0
        self._last_fetch_sampler = None
        self._fetches = 0
        self._lt_forwards = 0
        self._lt_backwards = 0
        self._last_lt: Optional[LossTransform] = None
        self._last_lt_rows = 0
        self._target_problem: Optional[str] = None
        self._target_note = 'not checked'
        self._closed = False

    # ---- args ----
    @property
    def use_lt(self) -> bool:
        return self.args is not None and getattr(self.args, 'loss', 'ce') == 'losstransform'

    @property
    def aug_repeats(self) -> int:
        return int(getattr(self.args, 'aug_repeats', 0) or 0) if self.args is not None else 0

    def loss_hooks(self) -> str:
        hooks = []
        if TrainingTask is not None:
            hooks.append('timm.task TrainingTask.criterion (every task class, criterion= or criterion_kwargs=)')
        hooks += [f'{n}(loss_fn)' for n in self.loss_fn_functions]
        return ', '.join(hooks) or 'none'

    # ---- criterion ----
    def wrap_criterion(self, criterion, via: str):
        """The criterion to train with: ``LossTransform(criterion)`` under ``--loss losstransform``."""
        if not self.use_lt or criterion is None or isinstance(criterion, LossTransform):
            return criterion
        key = id(criterion)
        if key not in self._wrapped:
            a = self.args
            lt = LossTransform(
                criterion, num_repeats=self.aug_repeats, rho=a.lt_rho,
                detach_consensus=bool(a.lt_detach), reverse_kl=bool(a.lt_reverse_kl))
            self._handles.append(lt.register_forward_hook(self._on_lt_forward, with_kwargs=True))
            self._wrapped[key] = lt
            self.criteria.append(lt)
            self.base_criteria.append(_base_name(criterion))
            self.criterion_via[id(lt)] = via
            if _is_primary():
                _logger.info(
                    f'lt_timm.launch: loss wrapped: {describe_criterion(lt)} via {via}; '
                    f'sampler: {self.sampler_desc or "none yet"}')
        return self._wrapped[key]

    def _on_lt_forward(self, module, args, kwargs, output) -> None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return  # not a training forward (no_grad / eval)
        self._lt_forwards += 1
        self._last_lt = module
        logits = args[0] if args else kwargs.get('logits')
        target = args[1] if len(args) > 1 else kwargs.get('target')
        self._last_lt_rows = int(logits.shape[0]) if isinstance(logits, torch.Tensor) else -1
        if self.steps == 0 and isinstance(target, torch.Tensor):
            self._target_problem, self._target_note = self._check_targets(target, module.num_repeats)
        node = output.grad_fn
        if node is not None:
            node.register_prehook(self._on_lt_backward)
        else:  # pragma: no cover - a leaf loss
            output.register_hook(self._on_lt_backward)

    def _on_lt_backward(self, grad):
        self._lt_backwards += 1

    def _check_targets(self, target: torch.Tensor, m: int) -> Tuple[Optional[str], str]:
        """Replicas of one image carry one target (hard labels; soft ones under timm's batch-mode mixup)."""
        soft = target.dim() == 2 and target.is_floating_point()
        if soft and getattr(self.args, 'mixup_mode', 'batch') != 'batch':
            return None, f'soft targets, --mixup-mode {self.args.mixup_mode} (not checked)'
        if target.dim() not in (1, 2) or target.shape[0] < 1:
            return None, 'not checked'
        t = target.detach().cpu()
        start = 0
        for size in block_sizes(t.shape[0], m):
            block = t[start:start + size]
            same = torch.allclose(block.float(), block[:1].float().expand_as(block)) if soft \
                else bool((block == block[:1]).all())
            if not same:
                return (f'rows {start}..{start + size - 1} should be the {size} replicas of one image but carry '
                        f'different targets {block.tolist()}'), 'differ'
            start += size
        return None, ('soft, equal per image' if soft else 'equal per image')

    # ---- data ----
    def note_fetch(self, it) -> None:
        self._fetches += 1
        self._last_fetch_sampler = getattr(it, '_index_sampler', None)

    def is_grouped(self, sampler) -> bool:
        return sampler is not None and getattr(sampler, '_lt_state', None) is self

    def pass_epoch(self, sampler) -> Tuple[int, str]:
        """The epoch of the pass the grouped sampler is starting, and where it came from."""
        if getattr(sampler, '_lt_set_epoch', None) is not None:
            epoch, source = sampler._lt_set_epoch, 'set_epoch() by the script'
        elif getattr(sampler, '_lt_fn_epoch', None) is not None:
            epoch, source = sampler._lt_fn_epoch
        elif getattr(sampler, '_lt_last_epoch', None) is not None:
            epoch, source = sampler._lt_last_epoch + 1, 'previous pass + 1'
        else:
            epoch, source = self._start_epoch()
        sampler._lt_set_epoch = None
        sampler._lt_fn_epoch = None
        sampler._lt_last_epoch = epoch
        self.epoch_log.append((epoch, source))
        return epoch, source

    def _start_epoch(self) -> Tuple[int, str]:
        a = self.args
        start = getattr(a, 'start_epoch', None)
        if start is not None:
            return int(start), '--start-epoch'
        if self.resume_calls:
            return int(self.resume_epoch or 0), f'{self.resume_fn}() return value'
        if getattr(a, 'resume', None):
            raise LaunchError(
                f'--resume is set but lt_timm.launch could not tell which epoch the run resumes at: the script did '
                f'not call set_epoch on the training loader\'s sampler, passed no epoch= to a training function and '
                f'did not resume through timm.models.resume_checkpoint / timm.task.resume_task_checkpoint. Without it '
                f'the grouped sampler would replay epoch 0\'s order; pass --start-epoch EPOCH '
                f'(timm {_timm_version()}).')
        return 0, 'first epoch'

    # ---- the guard ----
    def on_step_pre(self, optimizer) -> None:
        self._step_depth += 1
        if self._step_depth > 1 or self.args is None:
            return  # a wrapped optimizer's inner step (Lookahead ...), or not a launched training step
        try:
            self._check_step()
        except LaunchError as e:
            self._step_depth = 0
            if self.refusal is None:
                self.refusal = e
            raise

    def on_step_post(self, optimizer) -> None:
        self._step_depth = max(0, self._step_depth - 1)
        if self._step_depth == 0 and self.args is not None:
            self._lt_forwards = self._lt_backwards = 0

    def _refuse(self, what: str, fix: str) -> LaunchError:
        when = 'before the first optimizer step, so nothing was trained' if self.steps == 0 else \
            f'before optimizer step {self.steps + 1}'
        return LaunchError(f'{what} lt_timm.launch stopped {when}. {fix} (script '
                           f'{os.path.basename(_script_name(self.module))}, timm {_timm_version()})')

    def _check_step(self) -> None:
        m = self.aug_repeats
        sampler = self._last_fetch_sampler
        if m and not self.is_grouped(sampler):
            raise self._refuse(
                f'--aug-repeats {m} is set, but the batch before this optimizer step came from '
                f'{_describe_sampler(sampler)}, not from lt_timm\'s grouped sampler, so the replicas of an image are '
                f'not in one batch.',
                'lt_timm.launch groups training loaders built by timm.data.create_loader / '
                'timm.data.loader.create_loader(..., is_training=True, num_aug_repeats=N) (however the script names '
                'them); build the training loader that way, or use lt_timm\'s train.py.')
        if not self.use_lt:
            if self.steps == 0:
                self._log_first_step(None, sampler)
            self.steps += 1
            return
        expected, flags = _expected_base(self.args)
        if self._lt_forwards == 0:
            seen = ', '.join(f'{self.criterion_via[id(c)]} = {describe_criterion(c)}' for c in self.criteria)
            selected = f' (its flags select {"/".join(expected)})' if expected else ''
            raise self._refuse(
                f'--loss losstransform is set, but no LossTransform ran on this batch: the script computed its '
                f'training loss{selected} through a path '
                f'lt_timm.launch does not hook (hooked: {self.loss_hooks()}; wrapped so far: {seen or "nothing"}).',
                'Pass the training criterion to a timm.task task (criterion= / criterion_kwargs=) or as the loss_fn '
                'argument of the script\'s training function, or use lt_timm\'s train.py.')
        if self._lt_backwards == 0:
            raise self._refuse(
                '--loss losstransform is set and LossTransform ran, but the loss back-propagated before this '
                'optimizer step did not go through it.',
                'Back-propagate the loss the task / loss_fn returns, or use lt_timm\'s train.py.')
        lt = self._last_lt
        if self._last_lt_rows != sampler.batch_size:
            raise self._refuse(
                f'LossTransform got {self._last_lt_rows} rows but the grouped sampler yields {sampler.batch_size} '
                f'rows per step, so the rows are not in the replica layout the loss assumes.',
                'Feed the whole training batch to the criterion.')
        if self.steps == 0:
            problems = []
            if lt.num_repeats != sampler.num_repeats or lt.num_repeats != m:
                problems.append(f'LossTransform m={lt.num_repeats}, sampler m={sampler.num_repeats}, '
                                f'--aug-repeats {m}')
            if lt.rho != float(self.args.lt_rho):
                problems.append(f'LossTransform rho={lt.rho} but --lt-rho {self.args.lt_rho}')
            if self._target_problem:
                problems.append(self._target_problem)
            base = _base_name(lt.base_loss)
            if expected is not None and base not in expected:
                problems.append(f'LossTransform wraps {base}, but the script\'s flags ({flags}) select '
                                f'{" or ".join(expected)} as its training loss: the criterion lt_timm.launch wrapped '
                                f'is not the one the script trains with')
            if problems:
                raise self._refuse('The first training step is not what --loss losstransform promises: '
                                   + '; '.join(problems) + '.',
                                   'Run timm\'s train.py unmodified, or use lt_timm\'s train.py.')
            self._log_first_step(lt, sampler, expected, flags)
        self.steps += 1

    def _log_first_step(self, lt, sampler, expected=None, flags='') -> None:
        if lt is not None:
            base = _base_name(lt.base_loss)
            exp = f'selected by {flags}' if expected else f'the script\'s choice; {flags}'
            crit = (f'criterion LossTransform via {self.criterion_via.get(id(lt), "?")}, base loss {base} ({exp}), '
                    f'm={lt.num_repeats}, rho={lt.rho}, targets {self._target_note}')
        else:
            seen = f' ({self.seen_criteria[-1]})' if self.seen_criteria else ''
            crit = f'criterion not wrapped{seen} (--loss {getattr(self.args, "loss", "ce")}), m={self.aug_repeats}'
        if sampler is not None and self.is_grouped(sampler):
            images = len(block_sizes(sampler.batch_size, sampler.num_repeats))
            epoch = getattr(sampler, '_lt_last_epoch', sampler.epoch)
            samp = (f'sampler {type(sampler).__name__} (grouped: {sampler.batch_size} rows = {images} images x '
                    f'{sampler.num_repeats}, world_size={sampler.num_replicas}, seed={sampler.seed}, epoch {epoch} '
                    f'from {getattr(sampler, "_lt_epoch_source", "?")})')
            mode = sampler.epoch_mode
        else:
            samp, mode = 'sampler: the script\'s own (no --aug-repeats)', getattr(self.args, 'lt_epoch', 'v1')
        self.first_step_line = f'lt_timm.launch: first optimizer step verified: {crit}, epoch mode {mode}, {samp}'
        if _is_primary():
            _logger.info(self.first_step_line)

    def finish(self) -> None:
        """After ``main()`` returned: a refused step, or a run with no verified step, is an error."""
        if self.refusal is not None:
            raise self.refusal
        if self.use_lt and self.steps == 0:
            raise LaunchError(
                f'{os.path.basename(_script_name(self.module))} finished without an optimizer step lt_timm.launch '
                f'could verify (no torch.optim step after a LossTransform forward on a grouped batch), so it cannot '
                f'confirm anything was trained with LossTransform (timm {_timm_version()}). If the run had nothing '
                f'left to train (e.g. --resume of a finished run) this is expected.')

    # ---- installation ----
    def install(self) -> None:
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE is not self:
            _ACTIVE.close()
        _ACTIVE = self
        self._handles.append(_torch_optimizer.register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: self.on_step_pre(opt)))
        self._handles.append(_torch_optimizer.register_optimizer_step_post_hook(
            lambda opt, args, kwargs: self.on_step_post(opt)))
        base_iter = _torch_dataloader._BaseDataLoaderIter
        orig_next = base_iter.__next__

        def __next__(it):
            if _ACTIVE is self:
                self.note_fetch(it)
            return orig_next(it)

        self._patches.set(base_iter, '__next__', __next__)

    def close(self) -> None:
        """Undo every patch and hook (idempotent)."""
        global _ACTIVE
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._patches.undo()
        if _ACTIVE is self:
            _ACTIVE = None


def _deactivate() -> None:
    """Close the active launch state, if any (tests)."""
    if _ACTIVE is not None:
        _ACTIVE.close()


def _check_args(args, parser: argparse.ArgumentParser) -> None:
    """Validate LossTransform flags (YAML defaults bypass argparse's choices) and incompatible options."""
    if args.loss not in LAUNCH_LOSSES:
        parser.error(f'--loss {args.loss!r} is not supported by lt_timm.launch; choose one of {", ".join(LAUNCH_LOSSES)} '
                     f'(use the script\'s own --bce-loss/--jsd-loss/--smoothing flags for the base loss).')
    if args.lt_epoch not in EPOCH_MODES:
        parser.error(f'--lt-epoch must be one of {", ".join(EPOCH_MODES)}, got {args.lt_epoch!r}.')
    try:
        check_args(args)
    except ValueError as e:
        parser.error(str(e))
    repeats = int(getattr(args, 'aug_repeats', 0) or 0)
    if repeats and getattr(args, 'naflex_loader', False):
        parser.error('--aug-repeats with --naflex-loader is not supported by lt_timm.launch (the NaFlex loader has '
                     'its own sampler); drop --naflex-loader.')
    if repeats and (getattr(args, 'aug_splits', 0) or 0) > 0:
        parser.error('--aug-splits (AugMix/JSD splits) cannot be combined with --aug-repeats; use one of them.')
    if repeats and getattr(args, 'use_multi_epochs_loader', False):
        parser.error('--use-multi-epochs-loader is not supported with --aug-repeats (it caches the batch order).')
    if args.loss == 'losstransform' and getattr(args, 'jsd_loss', False):
        parser.error('--jsd-loss cannot be combined with --loss losstransform (JSD is its own consistency loss).')
    for dest, flag in (('train_img_sizes', '--train-img-sizes'), ('train_batch_sizes', '--train-batch-sizes'),
                       ('train_batches_per_epoch', '--train-batches-per-epoch')):
        if repeats and getattr(args, dest, None) is not None:
            parser.error(f'{flag} is not supported with --aug-repeats under lt_timm.launch (the grouped sampler '
                         f'fixes the batch size and the epoch length).')


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


def patch_timm_train(module) -> LaunchState:
    """Patch a loaded timm training script module (and timm, for this process) so it trains with LossTransform.

    Raises :class:`LaunchError` (before anything is trained) if a hook is missing or a flag would clash.
    Returns the :class:`LaunchState` (also stored as ``module._lt_timm_state``); :meth:`LaunchState.close` undoes
    the patches, :meth:`LaunchState.finish` checks after ``main()`` that training was verified.
    """
    if getattr(module, '_lt_timm_state', None) is not None:
        raise LaunchError(f'{_script_name(module)} is already patched by lt_timm.launch.')

    # --- check every hook first, so a failure leaves the module untouched ---
    parser = getattr(module, 'parser', None)
    if not isinstance(parser, argparse.ArgumentParser):
        raise _missing(module, 'module-level `parser`', 'an argparse.ArgumentParser to add --loss/--lt-* to')
    if '--aug-repeats' not in parser._option_string_actions:
        raise _missing(module, '`--aug-repeats` option on its parser', 'LossTransform needs replicas per image')
    if not callable(getattr(module, 'main', None)):
        raise _missing(module, '`main()`', 'the function that trains')
    train_fns = _train_functions(module)
    loss_fn_fns = [n for n, f in train_fns.items() if 'loss_fn' in _params(f)]
    if TrainingTask is None and not loss_fn_fns:
        raise _missing(
            module, 'criterion hook',
            'the installed timm has no timm.task API and the script has no function taking optimizer and loss_fn')
    clashes = [o for o in _LT_OPTIONS if o in parser._option_string_actions]
    clashes += [f'dest {d!r}' for d in LT_ARG_DEFAULTS
                if any(a.dest == d for a in parser._actions) and f'--{d.replace("_", "-")}' not in clashes]
    if clashes:
        raise LaunchError(
            f'{_script_name(module)} already defines {", ".join(clashes)}; lt_timm.launch adds its own option(s) of '
            f'that name and cannot tell which one you mean. Rename the script\'s option or use lt_timm\'s train.py '
            f'(timm {_timm_version()}).')

    state = LaunchState(module)
    state.train_functions = sorted(train_fns)
    state.loss_fn_functions = sorted(loss_fn_fns)
    module._lt_timm_state = state
    state.install()
    patches = state._patches

    # --- flags ---
    group = add_losstransform_args(parser, with_loss=False)
    group.add_argument('--loss', default=LT_ARG_DEFAULTS['loss'], choices=LAUNCH_LOSSES,
                       help='"ce": the criterion the script picks from --smoothing/--mixup/--bce-loss (default); '
                            '"losstransform": that criterion wrapped in LossTransform (needs --aug-repeats >= 2)')

    orig_parse_known = parser.parse_known_args

    @functools.wraps(orig_parse_known)
    def parse_known_args(args=None, namespace=None):
        ns, rest = orig_parse_known(args, namespace)
        _check_args(ns, parser)
        first = state.args is None
        state.args = ns
        if first and _is_primary():
            _logger.info(
                f'lt_timm.launch: patched {os.path.basename(_script_name(module))} (timm {_timm_version()}): '
                f'--loss {ns.loss}, aug_repeats={state.aug_repeats}, lt_epoch={ns.lt_epoch}, lt_rho={ns.lt_rho}; '
                f'loader: timm.data.create_loader -> lt_timm.create_loader; criterion hook: {state.loss_hooks()}; '
                f'guard: optimizer step pre-hook')
        return ns, rest

    parser.parse_known_args = parse_known_args  # parse_args() calls self.parse_known_args()

    # --- loader: timm's function itself, and every script global bound to it ---
    orig_create_loader = timm.data.loader.create_loader
    timm_loader_sig = inspect.signature(orig_create_loader)

    def create_loader(*args, **kwargs):
        if state._in_lt_loader or _ACTIVE is not state:
            return orig_create_loader(*args, **kwargs)  # lt_timm.create_loader building on timm's
        a = state.args
        if a is None:
            raise LaunchError('create_loader was called before the script parsed its arguments; '
                              'lt_timm.launch cannot know --aug-repeats/--lt-epoch.')
        # the script calls with timm's signature: name every argument (lt_timm's positional order differs)
        kwargs = dict(timm_loader_sig.bind_partial(*args, **kwargs).arguments)
        extra = kwargs.pop('kwargs', None)
        if isinstance(extra, dict):
            kwargs.update(extra)
        is_training = kwargs.get('is_training', False)
        repeats = kwargs.get('num_aug_repeats', 0) or 0
        if is_training and repeats:
            for k in ('batch_size_choices', 'num_batches'):
                if kwargs.get(k) is not None:
                    raise LaunchError(f'create_loader({k}=...) is not supported with --aug-repeats by lt_timm.launch.')
        kwargs.setdefault('aug_repeat_mode', a.lt_epoch)
        kwargs.setdefault('seed', int(getattr(a, 'seed', 0) or 0))
        state._in_lt_loader += 1
        try:
            loader = lt_create_loader(**kwargs)
        finally:
            state._in_lt_loader -= 1
        if is_training and repeats:
            inner = getattr(loader, 'loader', loader)
            bs = getattr(inner, 'batch_sampler', None)
            if isinstance(bs, RepeatedAugBatchSampler):
                bs.__class__ = _grouped_class(type(bs))
                bs._lt_state = state
                bs._lt_set_epoch = bs._lt_fn_epoch = bs._lt_last_epoch = None
                state.samplers.append(bs)
                state.train_loaders.append(loader)
                state.sampler_desc = (f'grouped repeats m={bs.num_repeats}, mode={bs.epoch_mode}, seed={bs.seed}, '
                                      f'batch={bs.batch_size}, world_size={bs.num_replicas}')
                if _is_primary():
                    _logger.info(f'lt_timm.launch: training sampler: {state.sampler_desc}')
        return loader

    create_loader.__wrapped__ = orig_create_loader
    for mod in (timm.data.loader, timm.data):
        if getattr(mod, 'create_loader', None) is orig_create_loader:
            patches.set(mod, 'create_loader', create_loader)
    originals = {id(orig_create_loader): create_loader}

    # --- resume helpers: the epoch the run starts at ---
    for mod, attr, fn, label in _resume_functions():
        if id(fn) not in originals:
            def make(fn=fn, label=label):
                @functools.wraps(fn)
                def resume(*args, **kwargs):
                    epoch = fn(*args, **kwargs)
                    if _ACTIVE is state and not state.resume_calls:
                        state.resume_calls += 1
                        state.resume_epoch = epoch
                        state.resume_fn = label
                    return epoch
                return resume
            originals[id(fn)] = make()
        patches.set(mod, attr, originals[id(fn)])

    # --- criterion: every timm.task task's .criterion ---
    if TrainingTask is not None:
        orig_setattr = TrainingTask.__setattr__

        def __setattr__(task, name, value):
            if name == 'criterion' and _ACTIVE is state and value is not None:
                via = f'{type(task).__name__}.criterion'
                state.seen_criteria.append(f'{via} = {_base_name(value)}')
                value = state.wrap_criterion(value, via=via)
            orig_setattr(task, name, value)

        patches.set(TrainingTask, '__setattr__', __setattr__)

    # --- the script's own names: globals bound to hooked timm functions, training functions ---
    for name, obj in list(vars(module).items()):
        if callable(obj) and id(obj) in originals:
            patches.set(module, name, originals[id(obj)])
    for name, fn in train_fns.items():
        patches.set(module, name, _wrap_train_function(fn, name, state))
    return state


def _wrap_train_function(fn: Callable, name: str, state: LaunchState) -> Callable:
    """Wrap ``loss_fn`` in LossTransform and hand ``epoch`` to the grouped sampler(s)."""
    sig = inspect.signature(fn)
    params = sig.parameters

    @functools.wraps(fn)
    def train_function(*args, **kwargs):
        if _ACTIVE is not state:
            return fn(*args, **kwargs)
        bound = sig.bind_partial(*args, **kwargs)
        if 'loss_fn' in params and bound.arguments.get('loss_fn') is not None:
            seen = f'{name}(loss_fn) = {_base_name(bound.arguments["loss_fn"])}'
            if not state.seen_criteria or state.seen_criteria[-1] != seen:
                state.seen_criteria.append(seen)
            bound.arguments['loss_fn'] = state.wrap_criterion(bound.arguments['loss_fn'], via=f'{name}(loss_fn)')
        epoch = bound.arguments.get('epoch')
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            for s in state.samplers:
                s._lt_fn_epoch = (epoch, f'{name}(epoch=)')
        return fn(*bound.args, **bound.kwargs)

    return train_function


def load_script(path: str, argv: Optional[List[str]] = None):
    """Import a training script from ``path`` as a module (its ``__main__`` block does not run)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise LaunchError(f'training script {path} not found.')
    if argv is not None:
        sys.argv = [path] + list(argv)
    script_dir = os.path.dirname(path)
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)  # like `python train.py`: helpers next to the script import
    spec = importlib.util.spec_from_file_location(_SCRIPT_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_SCRIPT_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(_SCRIPT_MODULE_NAME, None)
        raise LaunchError(f'could not import {path} with the installed timm {_timm_version()}: '
                          f'{type(e).__name__}: {e}') from e
    return module


def run_script(path: str, argv: List[str]):
    """Load, patch and run ``path`` with command-line flags ``argv``; returns whatever its ``main()`` returns.

    Raises :class:`LaunchError` if a hook is missing, a training step is refused, or the run ends without a verified
    step under ``--loss losstransform``. The patches are undone before returning.
    """
    module = load_script(path, argv)
    state = patch_timm_train(module)
    try:
        result = module.main()
        state.finish()
    finally:
        state.close()
    return result


_USAGE = ('usage: python -m lt_timm.launch PATH/TO/train.py [timm flags] --loss losstransform --aug-repeats 3 '
          '[--lt-rho RHO] [--lt-detach] [--lt-reverse-kl] [--lt-epoch {v1,full,original}]\n'
          '       torchrun --nproc_per_node N -m lt_timm.launch PATH/TO/train.py ...\n'
          'Runs an unmodified timm training script with LossTransform; `PATH/TO/train.py --help` lists all flags.')


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_USAGE)
        return 0 if argv else 2
    try:
        run_script(argv[0], argv[1:])
    except LaunchError as e:
        print(f'lt_timm.launch: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
