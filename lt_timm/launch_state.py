"""The state of a launched run (``python -m lt_timm.launch``): what the hooks of :mod:`lt_timm.launch_hooks`
installed and saw, the criteria they wrapped, the grouped samplers and their epochs, and the guard's checks before
every optimizer step (:meth:`LaunchState.on_step_pre`). One run per process: :func:`active`.
"""
import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import timm

from .layout import block_sizes
from .loss import LossTransform
from .registry import LossOptions, describe_criterion, timm_criterion
from .sampler import RepeatedAugBatchSampler

try:  # the task API (timm >= 1.0.2x); older timm has only train_one_epoch(loss_fn) scripts
    import timm.task.task as _timm_task_mod
    TrainingTask = _timm_task_mod.TrainingTask
except Exception:  # pragma: no cover - depends on the installed timm
    TrainingTask = None

__all__ = ['LaunchError', 'LaunchState', 'Patches', 'TrainingTask', 'active', 'deactivate', 'grouped_class',
           'timm_version', 'script_name', 'is_primary', 'base_name']

_logger = logging.getLogger('lt_timm.launch')

_ACTIVE: Optional['LaunchState'] = None  # the state whose hooks are installed (one launched script per process)


class LaunchError(RuntimeError):
    """The training script cannot be run with LossTransform as asked; nothing was trained (or the run stopped)."""


def timm_version() -> str:
    return getattr(timm, '__version__', 'unknown')


def script_name(module) -> str:
    return getattr(module, '__file__', None) or getattr(module, '__name__', 'the training script')


def is_primary() -> bool:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover
        pass
    return int(os.environ.get('RANK', '0')) == 0


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
    """The base-loss class name(s) timm's train.py builds for these flags (the registry's encoding of timm's choice,
    :func:`lt_timm.registry.timm_criterion`), or None when the flags don't say."""
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
    picked = type(timm_criterion(LossOptions(smoothing=smoothing, mixup_active=mixup, bce_loss=bce))).__name__
    if bce and not mixup and not smoothing:
        # train.py keeps CE here even with --bce-loss; create_classification_loss(loss_type='bce') gives BCE
        return ('CrossEntropyLoss', picked), flags
    return (picked,), flags


def base_name(criterion) -> str:
    return getattr(criterion, '__name__', None) or type(criterion).__name__


class Patches:
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


def grouped_class(cls: type) -> type:
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
        self.patches = Patches()
        self.handles: List[Any] = []
        self.in_lt_loader = 0
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
            self.handles.append(lt.register_forward_hook(self._on_lt_forward, with_kwargs=True))
            self._wrapped[key] = lt
            self.criteria.append(lt)
            self.base_criteria.append(base_name(criterion))
            self.criterion_via[id(lt)] = via
            if is_primary():
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
                f'(timm {timm_version()}).')
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
                           f'{os.path.basename(script_name(self.module))}, timm {timm_version()})')

    def _check_step(self) -> None:
        """The guard: the batch is grouped; under ``--loss losstransform`` a launcher-built LossTransform ran on all
        of it and the backward pass went through it; the first step also matches the flags."""
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
        self._check_lt_ran(expected, sampler)
        if self.steps == 0:
            self._check_first_step(self._last_lt, sampler, expected, flags)
            self._log_first_step(self._last_lt, sampler, expected, flags)
        self.steps += 1

    def _check_lt_ran(self, expected, sampler) -> None:
        """A LossTransform ran on this step's whole batch, with its backward pass."""
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
        if self._last_lt_rows != sampler.batch_size:
            raise self._refuse(
                f'LossTransform got {self._last_lt_rows} rows but the grouped sampler yields {sampler.batch_size} '
                f'rows per step, so the rows are not in the replica layout the loss assumes.',
                'Feed the whole training batch to the criterion.')

    def _check_first_step(self, lt: LossTransform, sampler, expected, flags: str) -> None:
        """The first step's LossTransform has the flags' m and rho, equal targets per image, and wraps the base loss
        the script's flags select."""
        m = self.aug_repeats
        problems = []
        if lt.num_repeats != sampler.num_repeats or lt.num_repeats != m:
            problems.append(f'LossTransform m={lt.num_repeats}, sampler m={sampler.num_repeats}, '
                            f'--aug-repeats {m}')
        if lt.rho != float(self.args.lt_rho):
            problems.append(f'LossTransform rho={lt.rho} but --lt-rho {self.args.lt_rho}')
        if self._target_problem:
            problems.append(self._target_problem)
        base = base_name(lt.base_loss)
        if expected is not None and base not in expected:
            problems.append(f'LossTransform wraps {base}, but the script\'s flags ({flags}) select '
                            f'{" or ".join(expected)} as its training loss: the criterion lt_timm.launch wrapped '
                            f'is not the one the script trains with')
        if problems:
            raise self._refuse('The first training step is not what --loss losstransform promises: '
                               + '; '.join(problems) + '.',
                               'Run timm\'s train.py unmodified, or use lt_timm\'s train.py.')

    def _log_first_step(self, lt, sampler, expected=None, flags='') -> None:
        if lt is not None:
            base = base_name(lt.base_loss)
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
        if is_primary():
            _logger.info(self.first_step_line)

    def finish(self) -> None:
        """After ``main()`` returned: a refused step, or a run with no verified step, is an error."""
        if self.refusal is not None:
            raise self.refusal
        if self.use_lt and self.steps == 0:
            raise LaunchError(
                f'{os.path.basename(script_name(self.module))} finished without an optimizer step lt_timm.launch '
                f'could verify (no torch.optim step after a LossTransform forward on a grouped batch), so it cannot '
                f'confirm anything was trained with LossTransform (timm {timm_version()}). If the run had nothing '
                f'left to train (e.g. --resume of a finished run) this is expected.')

    # ---- activation ----
    def activate(self) -> None:
        """Make this the process's launched run (closing another one, if any): the hooks act for it only."""
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE is not self:
            _ACTIVE.close()
        _ACTIVE = self

    def close(self) -> None:
        """Undo every patch and hook (idempotent)."""
        global _ACTIVE
        if self._closed:
            return
        self._closed = True
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.patches.undo()
        if _ACTIVE is self:
            _ACTIVE = None


def active() -> Optional[LaunchState]:
    """The launched run whose hooks are installed in this process, if any."""
    return _ACTIVE


def deactivate() -> None:
    """Close the active launch state, if any (a script that was patched but not run)."""
    if _ACTIVE is not None:
        _ACTIVE.close()
