"""Run timm's own, unmodified ``train.py`` with LossTransform — no fork of the script.

Usage::

    python -m lt_timm.launch PATH/TO/train.py DATA [timm flags] --loss losstransform --aug-repeats 3 [--lt-rho 1.0]
    torchrun --nproc_per_node 2 -m lt_timm.launch PATH/TO/train.py DATA --device cpu ... --loss losstransform ...

The script is loaded as a module (its ``if __name__ == '__main__'`` block does not run), patched by
:func:`patch_timm_train`, and its ``main()`` is called with ``sys.argv`` set to the user's flags. The
patches use hook points timm's training scripts have had for years:

* ``parser`` (module-level argparse parser): gains ``--loss {ce,losstransform}``, ``--lt-rho``,
  ``--lt-detach``, ``--lt-reverse-kl``, ``--lt-epoch``; YAML ``-c`` recipes may set these keys too, as the
  script's ``_parse_args`` feeds the YAML to ``parser.set_defaults``. The parsed ``args`` are captured by
  wrapping the parser's ``parse_known_args`` (which ``parse_args`` calls).
* ``create_loader`` (module global, from ``timm.data``): replaced by :func:`lt_timm.create_loader` with
  ``aug_repeat_mode=args.lt_epoch`` and ``seed=args.seed``, so ``--aug-repeats`` works in one process too and
  all replicas of an image sit in one batch on one rank.
* the criterion: either the ``timm.task`` task classes the script uses (``ClassificationTask`` and the
  distillation tasks, all taking ``criterion=``): replaced by subclasses that wrap ``self.criterion`` in
  :class:`~lt_timm.loss.LossTransform`; or, for timm 1.0.x scripts predating the task API,
  ``train_one_epoch(..., loss_fn, ...)``: its ``loss_fn`` argument is wrapped. The validation loss is untouched.
* ``main``: called to run.

If a hook is missing the launcher stops before training with one message naming the hook and the installed
timm version (exit code 2); it never trains silently without LossTransform.
"""
import argparse
import functools
import importlib.util
import inspect
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn
import timm
import timm.data

from .args import add_losstransform_args, check_args, describe_criterion, LT_ARG_DEFAULTS
from .loader import create_loader as lt_create_loader
from .loss import LossTransform
from .sampler import EPOCH_MODES, RepeatedAugBatchSampler

__all__ = ['patch_timm_train', 'load_script', 'run_script', 'LaunchError', 'LaunchState', 'main']

_logger = logging.getLogger(__name__)

LAUNCH_LOSSES = ('ce', 'losstransform')
_LT_OPTIONS = ('--loss', '--lt-rho', '--lt-detach', '--lt-reverse-kl', '--lt-epoch')
_SCRIPT_MODULE_NAME = '_lt_timm_launched_script'


class LaunchError(RuntimeError):
    """The training script cannot be patched (a hook is missing or a flag conflicts); nothing was trained."""


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


def _task_classes(module) -> Dict[str, type]:
    """Module globals that are timm.task classes taking ``criterion`` (ClassificationTask, distillation tasks)."""
    found = {}
    for name, obj in vars(module).items():
        if not isinstance(obj, type) or not (getattr(obj, '__module__', '') or '').startswith('timm.task'):
            continue
        try:
            params = inspect.signature(obj.__init__).parameters
        except (TypeError, ValueError):  # pragma: no cover
            continue
        if 'criterion' in params:
            found[name] = obj
    return found


def _has_param(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


class LaunchState:
    """What :func:`patch_timm_train` patched, and what it saw at run time (for logs and tests)."""

    def __init__(self, module):
        self.module = module
        self.args: Optional[argparse.Namespace] = None
        self.task_classes: List[str] = []
        self.train_one_epoch_loss_fn = False
        self.criteria: List[LossTransform] = []  # the LossTransform(s) installed
        self.base_criteria: List[str] = []
        self.train_loaders: List[Any] = []
        self.sampler_desc: Optional[str] = None
        self._wrapped: Dict[int, nn.Module] = {}
        self._logged_loss = False

    # ---- args ----
    @property
    def use_lt(self) -> bool:
        return self.args is not None and getattr(self.args, 'loss', 'ce') == 'losstransform'

    @property
    def aug_repeats(self) -> int:
        return int(getattr(self.args, 'aug_repeats', 0) or 0) if self.args is not None else 0

    def loss_hooks(self) -> str:
        hooks = [f'{n}(criterion=)' for n in self.task_classes]
        if self.train_one_epoch_loss_fn:
            hooks.append('train_one_epoch(loss_fn)')
        return ', '.join(hooks)

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
            self._wrapped[key] = lt
            self.criteria.append(lt)
            self.base_criteria.append(type(criterion).__name__)
            if _is_primary():
                _logger.info(
                    f'lt_timm.launch: loss wrapped: {describe_criterion(lt)} via {via}; '
                    f'sampler: {self.sampler_desc or "none yet"}')
        return self._wrapped[key]

    # ---- checks right before training ----
    def check_before_training(self, loader=None, criterion=None, task=None) -> None:
        if self.args is None:
            raise LaunchError('training started before the script parsed its arguments with its module-level parser; '
                              f'lt_timm.launch cannot apply --loss (timm {_timm_version()}).')
        if self.use_lt:
            crit = criterion if criterion is not None else getattr(task, 'criterion', None)
            wrapped = isinstance(crit, LossTransform) if crit is not None else bool(self.criteria)
            if not wrapped:
                raise LaunchError(
                    f'--loss losstransform is set but the training criterion is {type(crit).__name__}, not '
                    f'LossTransform: the script built it through a path lt_timm.launch does not patch '
                    f'(patched: {self.loss_hooks()}; timm {_timm_version()}). Refusing to train without LossTransform.')
        if self.aug_repeats and loader is not None:
            inner = getattr(loader, 'loader', loader)
            if not isinstance(getattr(inner, 'batch_sampler', None), RepeatedAugBatchSampler):
                raise LaunchError(
                    f'--aug-repeats {self.aug_repeats} is set but the training loader was not built by the patched '
                    f'create_loader (e.g. --naflex-loader), so replicas are not grouped; timm {_timm_version()}.')


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


def patch_timm_train(module) -> LaunchState:
    """Patch a loaded timm training script module in place so it trains with LossTransform.

    Raises :class:`LaunchError` (before anything is trained) if a hook is missing or a flag would clash.
    Returns the :class:`LaunchState` (also stored as ``module._lt_timm_state``).
    """
    if getattr(module, '_lt_timm_state', None) is not None:
        raise LaunchError(f'{_script_name(module)} is already patched by lt_timm.launch.')

    # --- check every hook first, so a failure leaves the module untouched ---
    parser = getattr(module, 'parser', None)
    if not isinstance(parser, argparse.ArgumentParser):
        raise _missing(module, 'module-level `parser`', 'an argparse.ArgumentParser to add --loss/--lt-* to')
    if '--aug-repeats' not in parser._option_string_actions:
        raise _missing(module, '`--aug-repeats` option on its parser', 'LossTransform needs replicas per image')
    if not callable(getattr(module, 'create_loader', None)):
        raise _missing(module, 'module-global `create_loader`', 'from timm.data; replaced to group the replicas')
    if not callable(getattr(module, 'main', None)):
        raise _missing(module, '`main()`', 'the function that trains')
    tasks = _task_classes(module)
    toe = getattr(module, 'train_one_epoch', None)
    toe_loss_fn = callable(toe) and _has_param(toe, 'loss_fn')
    if not tasks and not toe_loss_fn:
        raise _missing(
            module, 'criterion hook',
            'neither a timm.task class taking criterion= (ClassificationTask, ...) as a module global nor a '
            '`train_one_epoch(..., loss_fn, ...)`')
    clashes = [o for o in _LT_OPTIONS if o in parser._option_string_actions]
    clashes += [f'dest {d!r}' for d in LT_ARG_DEFAULTS
                if any(a.dest == d for a in parser._actions) and f'--{d.replace("_", "-")}' not in clashes]
    if clashes:
        raise LaunchError(
            f'{_script_name(module)} already defines {", ".join(clashes)}; lt_timm.launch adds its own option(s) of '
            f'that name and cannot tell which one you mean. Rename the script\'s option or use lt_timm\'s train.py '
            f'(timm {_timm_version()}).')

    state = LaunchState(module)
    module._lt_timm_state = state

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
                f'create_loader -> lt_timm.create_loader; criterion hook: {state.loss_hooks()}')
        return ns, rest

    parser.parse_known_args = parse_known_args  # parse_args() calls self.parse_known_args()

    # --- loader ---
    script_create_loader = module.create_loader
    if script_create_loader is not timm.data.create_loader:
        _logger.warning(f'lt_timm.launch: {_script_name(module)}\'s create_loader is not timm.data.create_loader; '
                        f'it is replaced by lt_timm.create_loader (timm\'s, with grouped repeats) all the same.')
    timm_loader_sig = inspect.signature(timm.data.create_loader)

    def create_loader(*args, **kwargs):
        a = state.args
        if a is None:
            raise LaunchError('create_loader was called before the script parsed its arguments; '
                              'lt_timm.launch cannot know --aug-repeats/--lt-epoch.')
        # the script calls with timm's signature: name every argument (lt_timm's positional order differs)
        kwargs = dict(timm_loader_sig.bind_partial(*args, **kwargs).arguments)
        is_training = kwargs.get('is_training', False)
        repeats = kwargs.get('num_aug_repeats', 0) or 0
        if is_training and repeats:
            for k in ('batch_size_choices', 'num_batches'):
                if kwargs.get(k) is not None:
                    raise LaunchError(f'create_loader({k}=...) is not supported with --aug-repeats by lt_timm.launch.')
        kwargs.setdefault('aug_repeat_mode', a.lt_epoch)
        kwargs.setdefault('seed', int(getattr(a, 'seed', 0) or 0))
        loader = lt_create_loader(**kwargs)
        if is_training and repeats:
            inner = getattr(loader, 'loader', loader)
            bs = inner.batch_sampler
            state.train_loaders.append(loader)
            state.sampler_desc = (f'grouped repeats m={bs.num_repeats}, mode={bs.epoch_mode}, seed={bs.seed}, '
                                  f'batch={bs.batch_size}, world_size={bs.num_replicas}')
            if _is_primary():
                _logger.info(f'lt_timm.launch: training sampler: {state.sampler_desc}')
        return loader

    create_loader.__wrapped__ = script_create_loader
    module.create_loader = create_loader

    # --- criterion ---
    for name, cls in tasks.items():
        module_dict = vars(module)
        module_dict[name] = _patched_task_class(cls, state)
        state.task_classes.append(name)

    if callable(toe):
        sig = inspect.signature(toe)
        state.train_one_epoch_loss_fn = toe_loss_fn

        @functools.wraps(toe)
        def train_one_epoch(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs)
            criterion = None
            if toe_loss_fn and 'loss_fn' in bound.arguments:
                criterion = bound.arguments['loss_fn'] = state.wrap_criterion(
                    bound.arguments['loss_fn'], via='train_one_epoch(loss_fn)')
            state.check_before_training(
                loader=bound.arguments.get('loader'), criterion=criterion, task=bound.arguments.get('task'))
            return toe(*bound.args, **bound.kwargs)

        module.train_one_epoch = train_one_epoch
    return state


def _patched_task_class(cls: type, state: LaunchState) -> type:
    """A subclass of a timm.task class whose criterion is wrapped in LossTransform after construction."""

    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        if getattr(self, 'criterion', None) is None:
            if state.use_lt:
                raise LaunchError(f'{cls.__name__} has no `criterion` attribute after construction; lt_timm.launch '
                                  f'cannot wrap it (timm {_timm_version()}).')
            return
        self.criterion = state.wrap_criterion(self.criterion, via=cls.__name__)

    return type(cls.__name__, (cls,), {
        '__init__': __init__, '__module__': cls.__module__, '__qualname__': cls.__qualname__,
        '__doc__': cls.__doc__, '_lt_timm_base_class': cls})


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
    """Load, patch and run ``path`` with command-line flags ``argv``; returns whatever its ``main()`` returns."""
    module = load_script(path, argv)
    patch_timm_train(module)
    return module.main()


_USAGE = ('usage: python -m lt_timm.launch PATH/TO/train.py [timm flags] --loss losstransform --aug-repeats 3 '
          '[--lt-rho RHO] [--lt-detach] [--lt-reverse-kl] [--lt-epoch {v1,full}]\n'
          '       torchrun --nproc_per_node N -m lt_timm.launch PATH/TO/train.py ...\n'
          'Runs an unmodified timm training script with LossTransform; `PATH/TO/train.py --help` lists all flags.')


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_USAGE)
        return 0 if argv else 2
    path, rest = argv[0], argv[1:]
    try:
        module = load_script(path, rest)
        patch_timm_train(module)
    except LaunchError as e:
        print(f'lt_timm.launch: error: {e}', file=sys.stderr)
        return 2
    try:
        module.main()
    except LaunchError as e:
        print(f'lt_timm.launch: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
