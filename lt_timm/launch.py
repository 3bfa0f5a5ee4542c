"""Run timm's own, unmodified ``train.py`` with LossTransform — no fork of the script.

Usage::

    python -m lt_timm.launch PATH/TO/train.py DATA [timm flags] --loss losstransform --aug-repeats 3 [--lt-rho 1.0]
    torchrun --nproc_per_node 2 -m lt_timm.launch PATH/TO/train.py DATA --device cpu ... --loss losstransform ...

The script is loaded as a module (its ``if __name__ == '__main__'`` block does not run), patched by
:func:`patch_timm_train`, and its ``main()`` is called with ``sys.argv`` set to the user's flags.

Where the patches sit (so that renaming or restructuring the script does not route around them), in the order
:func:`install_hooks` installs them (one function each in :mod:`lt_timm.launch_hooks`; what they record and the
guard's checks: :class:`lt_timm.launch_state.LaunchState`):

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

An evaluation script (timm's ``validate.py``: no ``--aug-repeats``, no function taking an ``optimizer``) runs as it
is, with lt_timm's models and checkpoint loaders registered, so ``python -m lt_timm.launch validate.py --checkpoint
FILE`` reads the files lt_timm reads (e.g. EfficientNet-PyTorch's layout).

The launcher's own errors are one line (``lt_timm.launch: error: ...``) and exit 2: a hook it cannot install, a
refused step, the flags it checks, lt-timm's sampler and loader, a ``-c`` YAML the script cannot read, a DDP process
that stops; Ctrl-C exits 130 and SIGTERM 143, with the command that resumes the run when it saved a checkpoint.
"""
import argparse
import glob
import importlib.util
import inspect
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .cli.flags import LT_ARG_DEFAULTS, LT_OPTIONS
from .errors import STOP_EXIT_CODES, Terminated, UserError, sigterm_raises
from .launch_hooks import HOOKS
from .launch_state import LaunchError, LaunchState, TrainingTask, script_name, timm_version
from .run_dir import lost_a_process, lost_process_reason, resume_command

__all__ = ['patch_timm_train', 'install_hooks', 'load_script', 'run_script', 'is_evaluation_script', 'LaunchError',
           'LaunchState', 'main']

_SCRIPT_MODULE_NAME = '_lt_timm_launched_script'


def _missing(module, hook: str, why: str) -> LaunchError:
    return LaunchError(
        f'{script_name(module)} has no {hook} ({why}); lt_timm.launch cannot patch it, so nothing was trained '
        f'(installed timm {timm_version()}). Use a timm train.py matching the installed timm, or lt_timm\'s own '
        f'train.py.')


def _params(fn: Callable) -> List[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return []


def _train_functions(module) -> Dict[str, Callable]:
    """Module-level functions defined by the script that take an ``optimizer``: its training loop(s)."""
    return {name: obj for name, obj in vars(module).items()
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and 'optimizer' in _params(obj)}


def _check_hook_points(module) -> Tuple[List[str], List[str]]:
    """Every hook point, before anything is patched (a failure leaves the module untouched): the parser with
    ``--aug-repeats`` and none of the launcher's flags, ``main()``, a criterion hook. Returns the names of the
    script's training functions and of those taking ``loss_fn``."""
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
    clashes = [o for o in LT_OPTIONS if o in parser._option_string_actions]
    clashes += [f'dest {d!r}' for d in LT_ARG_DEFAULTS
                if any(a.dest == d for a in parser._actions) and f'--{d.replace("_", "-")}' not in clashes]
    if clashes:
        raise LaunchError(
            f'{script_name(module)} already defines {", ".join(clashes)}; lt_timm.launch adds its own option(s) of '
            f'that name and cannot tell which one you mean. Rename the script\'s option or use lt_timm\'s train.py '
            f'(timm {timm_version()}).')
    return sorted(train_fns), sorted(loss_fn_fns)


def install_hooks(state: LaunchState) -> None:
    """Make ``state`` the active run and install its hooks, in the order of this module's docstring: flags, loader,
    criterion, epoch, guard (:data:`lt_timm.launch_hooks.HOOKS`)."""
    state.activate()
    for hook in HOOKS:
        hook(state)


def patch_timm_train(module) -> LaunchState:
    """Patch a loaded timm training script module (and timm, for this process) so it trains with LossTransform.

    Raises :class:`LaunchError` (before anything is trained) if a hook is missing or a flag would clash.
    Returns the :class:`LaunchState` (also stored as ``module._lt_timm_state``); :meth:`LaunchState.close` undoes
    the patches, :meth:`LaunchState.finish` checks after ``main()`` that training was verified.
    """
    if getattr(module, '_lt_timm_state', None) is not None:
        raise LaunchError(f'{script_name(module)} is already patched by lt_timm.launch.')
    train_functions, loss_fn_functions = _check_hook_points(module)
    state = LaunchState(module)
    state.train_functions, state.loss_fn_functions = train_functions, loss_fn_functions
    module._lt_timm_state = state
    install_hooks(state)
    return state


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
        raise LaunchError(f'could not import {path} with the installed timm {timm_version()}: '
                          f'{type(e).__name__}: {e}') from e
    return module


def is_evaluation_script(module) -> bool:
    """timm's ``validate.py`` and scripts like it: a ``main()``, no ``--aug-repeats`` on a module-level parser and no
    function that takes an ``optimizer``. Nothing of it trains, so nothing is patched (:func:`run_evaluation_script`
    refuses an optimizer step)."""
    parser = getattr(module, 'parser', None)
    repeats = isinstance(parser, argparse.ArgumentParser) and '--aug-repeats' in parser._option_string_actions
    return callable(getattr(module, 'main', None)) and not repeats and not _train_functions(module)


def run_evaluation_script(module, argv: List[str]):
    """Run an evaluation script as it is. lt_timm's models and checkpoint loaders are registered with timm
    (importing this module imports ``lt_timm``): e.g. timm's ``validate.py --checkpoint FILE`` reads a file in
    EfficientNet-PyTorch's layout."""
    given = [o for o in LT_OPTIONS if any(a == o or a.startswith(o + '=') for a in argv)]
    if given:
        raise LaunchError(f'{script_name(module)} evaluates and trains nothing; LossTransform\'s flags '
                          f'({", ".join(given)}) only apply to a training script: drop them.')

    def refuse_training(*_):
        raise LaunchError(f'{script_name(module)} steps an optimizer, but has no `--aug-repeats` option and no '
                          f'function taking an `optimizer`, so lt_timm.launch cannot hook its training; nothing was '
                          f'trained. '
                          f'Use a timm train.py matching the installed timm {timm_version()}, or lt_timm\'s train.py.')
    guard = register_optimizer_step_pre_hook(refuse_training)
    try:
        return module.main()
    finally:
        guard.remove()


def run_script(path: str, argv: List[str]):
    """Load, patch and run ``path`` with command-line flags ``argv``; returns whatever its ``main()`` returns.
    An evaluation script (:func:`is_evaluation_script`) runs unpatched, with lt_timm's models registered.

    Raises :class:`LaunchError` if a hook is missing, a training step is refused, or the run ends without a verified
    step under ``--loss losstransform``. The patches are undone before returning.
    """
    module = load_script(path, argv)
    if is_evaluation_script(module):
        return run_evaluation_script(module, argv)
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


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, 'problem_mark', None)
    where = f'{mark.name} line {mark.line + 1}' if mark is not None else 'the -c config'
    return (f'{where} is not valid YAML ({getattr(e, "problem", None) or e}); fix the file (YAML tags such as '
            f'!!python are refused: a recipe never runs code).')


def _last_checkpoint(args, started: float) -> Optional[str]:
    """The ``last.pth.tar`` this run wrote (timm's script: in ``<output>/<experiment>``, or a new folder under
    ``--output``), or None."""
    output = getattr(args, 'output', '') or './output/train'
    folders = [os.path.join(output, args.experiment)] if getattr(args, 'experiment', '') else \
        [output] + glob.glob(os.path.join(output, '*'))
    lasts = [os.path.join(d, 'last.pth.tar') for d in folders]
    lasts = [p for p in lasts if os.path.isfile(p) and os.path.getmtime(p) >= started]
    return max(lasts, key=os.path.getmtime) if lasts else None


def _stopped(e: BaseException, argv: List[str], started: float) -> Tuple[str, int]:
    """The line for a run stopped by a signal or a lost DDP process, with the command that resumes it: from the
    ``last.pth.tar`` this run wrote, else from the ``--resume`` file it started from. Ctrl-C reaches every process
    of a DDP run: only process 0 says it ('' on the others)."""
    rank = os.environ.get('RANK', '0')
    if isinstance(e, (KeyboardInterrupt, Terminated)):
        what = 'stopped by Ctrl-C (SIGINT)' if isinstance(e, KeyboardInterrupt) else 'stopped by SIGTERM'
        code = STOP_EXIT_CODES[type(e).__name__]
        if isinstance(e, KeyboardInterrupt) and rank != '0':
            return '', code
    else:
        what, code = f'process {rank} of this DDP run lost another process ({lost_process_reason(e)})', 2
    state = getattr(sys.modules.get(_SCRIPT_MODULE_NAME), '_lt_timm_state', None)
    args = state.args if state is not None else None
    last = _last_checkpoint(args, started) if args is not None else None
    resumed = getattr(args, 'resume', '') or ''
    if last is None and resumed and os.path.isfile(resumed):
        last = resumed  # (resume_command replaces the --resume of argv)
    if last is None:
        return f'{what}; no checkpoint was saved yet: start again.', code
    return f'{what}; {last} holds the last saved epoch; to continue: ' \
           f'{resume_command(last, argv, module="lt_timm.launch")}', code


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_USAGE)
        return 0 if argv else 2
    started = time.time()
    try:
        with sigterm_raises():
            run_script(argv[0], argv[1:])
        return 0
    except (LaunchError, UserError, yaml.YAMLError, KeyboardInterrupt, Terminated, RuntimeError) as e:
        message, code = _problem(e, argv, started)
        if message is None or os.environ.get('LT_TIMM_DEBUG'):
            raise
    if message:
        print(f'lt_timm.launch: error: {message}', file=sys.stderr, flush=True)
    return code


def _problem(e: BaseException, argv: List[str], started: float) -> Tuple[Optional[str], int]:
    """The one line the launcher says about ``e`` and the exit status; ``(None, 1)`` for errors it leaves as they
    are (the script's own)."""
    if isinstance(e, yaml.YAMLError):
        return _yaml_problem(e), 2
    if isinstance(e, (LaunchError, UserError)):
        return str(e), 2
    if isinstance(e, (KeyboardInterrupt, Terminated)) or lost_a_process(e):
        return _stopped(e, argv, started)
    return None, 1


if __name__ == '__main__':
    sys.exit(main())
