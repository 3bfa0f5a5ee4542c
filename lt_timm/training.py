"""``train.py``'s run: from a :class:`~lt_timm.config.TrainConfig` to a trained run folder.

:func:`train` builds the run (:func:`build_run`: datasets, model, loaders, criterion, task, optimizer, resume, EMA /
compile / DDP, schedule, the :class:`~lt_timm.trainer.Trainer`), claims the run folder (:func:`open_run`) and fits.
Built from timm's pieces — ``create_model``, ``create_dataset``, ``lt_timm.create_loader``, ``Mixup`` /
``FastCollateMixup``, ``create_optimizer_v2``, ``create_scheduler_v2``, ``timm.task.ClassificationTask`` (with its
``ModelEmaV3``), timm's checkpoint format and history (:mod:`lt_timm.checkpoints`), ``update_summary`` — so flags,
YAML recipes (``-c``, keys are the flags' dest names) and checkpoints carry over from timm.

A resumed run (``--resume``, its flags compared by the command line) checks that its data is the run's, continues in
the checkpoint's run folder (later epochs moved aside, what a kill left half-done removed, the checkpoint history
completed, ``summary.csv`` rewritten from the checkpoint's rows) and keeps the run's ``args.yaml``. A run stopped by
Ctrl-C, SIGTERM or a lost DDP process releases its folder and says how to resume (:class:`~lt_timm.errors.RunStopped`).
"""
import argparse
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import AugMixDataset, FastCollateMixup, Mixup, resolve_data_config
from timm.layers import set_fast_norm
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint

from .builders import (autocast_and_scaler, create_loaders, create_model_from, open_datasets, prepare_model,
                       resolve_num_classes, setup_training_process)
from .checkpoints import EpochSaver
from .config import MixupOptions, OptimOptions, ResumePoint, TrainConfig
from .data import write_class_map
from .errors import RunStopped, Terminated, UserError
from .loss import LossTransform
from .modeling import checkpoint_problem, read_checkpoint_meta
from .recorder import SUMMARY_KEY, Recorder, checkpoint_state_fn
from .registry import LossOptions, create_loss, describe_criterion
from .run_dir import (DEFAULT_OUTPUT, RunLock, claim_run_dir, lost_a_process, read_summary_rows, remove_stale_tmp,
                      stopped_run, supersede_later_epochs, write_summary)
from .task import LossTransformTask
from .trainer import Trainer

__all__ = ['train', 'close_process_group', 'build_run', 'open_run', 'TrainingRun', 'create_criterion', 'create_mixup',
           'wrap_aug_splits', 'create_optimizer', 'create_scheduler', 'checkpoint_args', 'check_resumed_data']

_logger = logging.getLogger('train')


@dataclass
class TrainingRun:
    """A built run, ready to fit: its :class:`Trainer`, what the start-of-run log and the run folder name need, and
    the epochs to train."""
    trainer: Trainer
    model: nn.Module
    criterion: nn.Module
    num_classes: int
    class_to_idx: Dict[str, int]
    num_train: int
    num_eval: int
    input_size: Tuple[int, ...]
    start_epoch: int
    num_epochs: int
    updates_per_epoch: int


def train(config: TrainConfig) -> 'OrderedDict[str, Any]':
    """Run a full training job; returns the final epoch's eval metrics (and best) for scripting. Ctrl-C, SIGTERM
    (:func:`lt_timm.errors.sigterm_raises`) or a DDP process that stops end it with :class:`RunStopped` (the run
    folder unlocked, the resume command in the message)."""
    run = build_run(config)
    lock = None
    try:
        if config.ranks.is_primary:
            lock = open_run(config, run)
        return run.trainer.fit(run.start_epoch, run.num_epochs)
    except (KeyboardInterrupt, Terminated) as e:
        raise _stopped(config, run.trainer, e) from None
    except RuntimeError as e:
        if config.ranks.distributed and lost_a_process(e):
            raise _stopped(config, run.trainer, e) from None
        raise
    finally:
        if lock is not None:
            lock.release()


def close_process_group() -> None:
    """The end of a script's DDP run: every process waits for the others, then the process group is destroyed before
    the interpreter exits (a gloo group left to interpreter shutdown can abort one process with 'terminate called
    without an active exception'). A no-op without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _stopped(config: TrainConfig, trainer: Trainer, e: BaseException) -> RunStopped:
    """What stopped the run, in which epoch, and the command that resumes it (:func:`stopped_run`)."""
    last = os.path.join(trainer.output_dir, 'last.pth.tar') if trainer.output_dir else ''
    if not (last and os.path.exists(last)) and config.resumed is not None:
        last = config.resumed.path
    return stopped_run(e, trainer.epoch, last, config.ranks.rank, config.ranks.distributed)


def build_run(config: TrainConfig) -> TrainingRun:
    """Everything before the run folder, in timm's order: datasets, model, AMP, mixup, criterion, loaders, task,
    optimizer, ``--resume``, EMA / compile / DDP, the schedule."""
    setup_training_process(config.seed, config.ranks.rank)
    if config.fast_norm:
        set_fast_norm()
    device = torch.device(config.precision.device)
    dataset_train, dataset_eval, class_to_idx = open_datasets(config.data, config.ranks)
    check_resumed_data(config.resumed, class_to_idx, len(dataset_train), len(dataset_eval))
    num_classes = resolve_num_classes(config.model.num_classes, dataset_train)
    model = create_model_from(config.model, num_classes)
    data_config = resolve_data_config(dict(config.data_config_args), model=model, verbose=config.ranks.is_primary)
    model = prepare_model(config.model, model, device, config.precision.model_dtype, config.ranks)
    autocast, loss_scaler = autocast_and_scaler(config.precision, device)
    collate_fn, mixup_fn = create_mixup(config.mixup, num_classes, config.loader.prefetcher)
    criterion = create_criterion(config.loss, config.loss_options)
    dataset_train = wrap_aug_splits(dataset_train, config.loader.aug_splits,
                                    config.mixup.active and config.loader.prefetcher)
    loader_train, loader_eval = create_loaders(config.loader, dataset_train, dataset_eval, data_config, collate_fn,
                                               device, config.precision.model_dtype, config.ranks)
    _warn_mixup_mode(config)
    task, optimizer, start_epoch = _task_and_optimizer(config, model, criterion, device, loss_scaler, num_classes)
    updates_per_epoch = (len(loader_train) + config.optim.grad_accum_steps - 1) // config.optim.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler(optimizer, config.optim, updates_per_epoch, start_epoch)
    trainer = Trainer(task, optimizer, loader_train, device, config.loop, loader_eval=loader_eval,
                      lr_scheduler=lr_scheduler, autocast=autocast, loss_scaler=loss_scaler, mixup_fn=mixup_fn,
                      model_dtype=config.precision.model_dtype)
    return TrainingRun(trainer=trainer, model=model, criterion=criterion, num_classes=num_classes,
                       class_to_idx=class_to_idx, num_train=len(dataset_train), num_eval=len(dataset_eval),
                       input_size=tuple(data_config['input_size']), start_epoch=start_epoch, num_epochs=num_epochs,
                       updates_per_epoch=updates_per_epoch)


# ---------------------------------------------------------------- pieces of the run

def check_resumed_data(resumed: Optional[ResumePoint], class_to_idx: Dict[str, int], train_images: int,
                       eval_images: int) -> None:
    """``--resume``: the data must be the run's (its classes and labels, its image counts); one error names each
    difference and the way forward."""
    if resumed is None:
        return
    diffs = []
    if resumed.class_to_idx and class_to_idx and dict(resumed.class_to_idx) != class_to_idx:
        new, gone = sorted(set(class_to_idx) - set(resumed.class_to_idx)), \
            sorted(set(resumed.class_to_idx) - set(class_to_idx))
        diffs.append(f'classes {new[:5]} are new and {gone[:5]} are missing' if new or gone
                     else 'the classes have other labels')
    for what, now, then in (('training images', train_images, resumed.train_images),
                            ('validation images', eval_images, resumed.eval_images)):
        if then is not None and now != then:
            diffs.append(f'{now} {what} (the run: {then})')
    if diffs:
        where = f' (its class map: {os.path.join(resumed.folder, "class_map.txt")})' if resumed.folder else ''
        raise UserError(f'--resume {resumed.path}: this data is not the run\'s: {"; ".join(diffs)}. Resume on the '
                        f'run\'s data{where}, or start a new run from these weights with --initial-checkpoint '
                        f'{resumed.path}.')


def create_mixup(mixup: MixupOptions, num_classes: int, prefetcher: bool):
    """(collate_fn, mixup_fn) as timm's train.py builds them: the mixup collate under the prefetcher, else Mixup."""
    if not mixup.active:
        return None, None
    mixup_args = dict(mixup_alpha=mixup.mixup, cutmix_alpha=mixup.cutmix, cutmix_minmax=mixup.cutmix_minmax,
                      prob=mixup.mixup_prob, switch_prob=mixup.mixup_switch_prob, mode=mixup.mixup_mode,
                      label_smoothing=mixup.smoothing, num_classes=num_classes)
    if prefetcher:
        return FastCollateMixup(**mixup_args), None
    return None, Mixup(**mixup_args)


def create_criterion(loss: str, options: LossOptions) -> nn.Module:
    """The criterion ``--loss`` names; repeats without T(L) still measure the replicas' consistency (``rho = 0``
    returns the base loss exactly)."""
    criterion = create_loss(loss, **vars(options))
    if options.aug_repeats >= 2 and not isinstance(criterion, LossTransform) and loss != 'jsd':
        criterion = LossTransform(criterion, num_repeats=options.aug_repeats, rho=0.)
    return criterion


def wrap_aug_splits(dataset, aug_splits: int, mixup_under_prefetcher: bool):
    """As timm's train.py: AugMix/JSD splits need the wrapper that returns the clean + augmented splits."""
    if aug_splits <= 1:
        return dataset
    if mixup_under_prefetcher:
        raise UserError('--aug-splits cannot be combined with mixup/cutmix under the prefetcher; add --no-prefetcher.')
    return AugMixDataset(dataset, num_splits=aug_splits)


def _warn_mixup_mode(config: TrainConfig) -> None:
    mixup = config.mixup
    if mixup.active and config.loader.aug_repeats and mixup.mixup_mode != 'batch' and config.ranks.is_primary:
        _logger.warning(f'--mixup-mode {mixup.mixup_mode} mixes each replica with its own lambda; use --mixup-mode '
                        f'batch to keep replicas of an image consistently mixed.')


def create_optimizer(model: nn.Module, optim: OptimOptions) -> torch.optim.Optimizer:
    """timm's optimizer factory with its flags, ``--opt-kwargs`` included."""
    try:
        return create_optimizer_v2(model, **optim.optimizer_kwargs, **optim.opt_kwargs)
    except TypeError as e:
        raise UserError(f'--opt {optim.opt} does not take these arguments ({e}); check --opt-kwargs.') from e


def create_scheduler(optimizer: torch.optim.Optimizer, optim: OptimOptions, updates_per_epoch: int,
                     start_epoch: int):
    """timm's scheduler from the flags, advanced to ``start_epoch`` (a resumed run); returns it and the epochs."""
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **optim.scheduler_kwargs,
                                                   updates_per_epoch=updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        if optim.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    return lr_scheduler, num_epochs


def _task_and_optimizer(config: TrainConfig, model: nn.Module, criterion: nn.Module, device: torch.device,
                        loss_scaler, num_classes: int):
    """The task and its optimizer, restored with ``--resume``, then EMA, compile and DDP; returns them and the
    epoch to start at."""
    task = LossTransformTask(model=model, criterion=criterion, device=device, dtype=config.precision.model_dtype,
                             verbose=False)
    optimizer = create_optimizer(model, config.optim)
    resume_epoch = _resume(config, task, optimizer, loss_scaler, num_classes)
    _setup_ema_compile_ddp(config, task, device)
    start_epoch = config.optim.start_epoch if config.optim.start_epoch is not None else (resume_epoch or 0)
    return task, optimizer, start_epoch


def _resume(config: TrainConfig, task, optimizer, loss_scaler, num_classes: int) -> Optional[int]:
    """``--resume``: model, optimizer, scaler (timm's task checkpoint); a new ``--lr`` applies from here on."""
    path = config.run.resume
    if not path:
        return None
    if not os.path.isfile(path):
        raise UserError(f'--resume checkpoint {path} not found; pass the last.pth.tar of the run to continue.')
    keep = not config.run.no_resume_opt
    try:
        epoch = resume_task_checkpoint(task, path, optimizer=optimizer if keep else None,
                                       loss_scaler=loss_scaler if keep else None, log_info=config.ranks.is_primary)
    except Exception as e:
        raise UserError(checkpoint_problem(path, e, f'--model {config.model.model} with {num_classes} classes')) from e
    if keep:
        _apply_new_lr(config, optimizer)
    return epoch


def _apply_new_lr(config: TrainConfig, optimizer: torch.optim.Optimizer) -> None:
    """A resumed run given another ``--lr``: the restored optimizer's base lr (``initial_lr``, which timm's scheduler
    reads) scaled to it, so the schedule continues at the new lr (timm's resume would keep the old one)."""
    resumed, lr = config.resumed, config.optim.lr
    if resumed is None or not resumed.lr or lr is None or lr == resumed.lr:
        return
    for group in optimizer.param_groups:
        for key in ('initial_lr', 'lr'):
            if key in group:
                group[key] *= lr / resumed.lr
    if config.ranks.is_primary:
        _logger.warning(f'--lr {lr} (the run: {resumed.lr}): the schedule continues at the new lr from here on.')


def _setup_ema_compile_ddp(config: TrainConfig, task, device: torch.device) -> None:
    """EMA (restored from --resume), torch.compile of model and loss, then DDP — in timm's order."""
    ema = config.ema
    if ema.model_ema:
        task.setup_ema(decay=ema.model_ema_decay, use_warmup=ema.model_ema_warmup,
                       device='cpu' if ema.model_ema_force_cpu else None)
        if config.run.resume:
            load_task_ema_checkpoint(task, config.run.resume)
    if ema.torchcompile:  # as timm: before DDP wrapping; the loss too (one graph, see lt_timm.loss)
        if config.ranks.is_primary:
            _logger.info(f'Compiling model and loss with backend={ema.torchcompile}, mode={ema.torchcompile_mode}')
        task.compile(backend=ema.torchcompile, mode=ema.torchcompile_mode)
        task.criterion = torch.compile(task.criterion, backend=ema.torchcompile, mode=ema.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=ema.torchcompile, mode=ema.torchcompile_mode)
    if config.ranks.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not ema.no_ddp_bb)


# ---------------------------------------------------------------- the run folder

def checkpoint_args(record: argparse.Namespace, num_classes: int, class_to_idx: Dict[str, int],
                    train_images: Optional[int] = None, eval_images: Optional[int] = None) -> argparse.Namespace:
    """The ``args`` every checkpoint holds (timm's format): the resolved flags, the run's number of classes, its
    class map and image counts (not in ``args.yaml``; ``--resume`` compares them)."""
    saved = argparse.Namespace(**vars(record))
    saved.num_classes = num_classes
    if class_to_idx:
        saved.class_to_idx = class_to_idx
    if train_images is not None:
        saved.train_images, saved.eval_images = train_images, eval_images
    return saved


def open_run(config: TrainConfig, run: TrainingRun) -> RunLock:
    """Claim the run folder (never overwritten; a resumed run continues in its checkpoint's run folder), make it
    ready (:func:`_recorder`; ``args.yaml`` and the class map), give the trainer its :class:`Recorder`, log the
    run's start. Returns the folder's held lock."""
    exp_name = config.run.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(config.run.model), str(run.input_size[-1])])
    resumed = config.resumed
    lock = claim_run_dir(config.run.output or DEFAULT_OUTPUT, exp_name, folder=resumed.folder if resumed else '')
    output_dir = os.path.dirname(lock.path)
    try:
        recorder = _recorder(config, run, output_dir, exp_name)
        _write_run_files(config, run, output_dir)
    except BaseException:
        lock.release()
        raise
    run.trainer.recorder = recorder
    _log_start(config, run, output_dir)
    return lock


def _resumes_in(config: TrainConfig, output_dir: str) -> bool:
    resumed = config.resumed
    return bool(resumed and resumed.folder) and os.path.abspath(resumed.folder) == os.path.abspath(output_dir)


def _recorder(config: TrainConfig, run: TrainingRun, output_dir: str, exp_name: str) -> Recorder:
    """The run's checkpoints (:class:`EpochSaver`, in timm's format) and summary; a resumed run's folder is
    completed first (:func:`_resumed_rows`)."""
    trainer = run.trainer
    record = checkpoint_args(config.record, run.num_classes, run.class_to_idx, run.num_train, run.num_eval)
    saver = EpochSaver(output_dir, checkpoint_state_fn(trainer.task, trainer.optimizer, trainer.loss_scaler, record),
                       decreasing=config.run.eval_metric == 'loss', max_history=config.run.checkpoint_hist)
    rows = _resumed_rows(config, run.start_epoch, output_dir, saver) if config.resumed else []
    return Recorder(saver, output_dir, log_wandb=_init_wandb(config, exp_name, record), rows=rows)


def _checkpoint_epoch(path: str) -> Optional[int]:
    epoch = (read_checkpoint_meta(path) or {}).get('epoch')
    return epoch if isinstance(epoch, int) else None


def _resumed_rows(config: TrainConfig, start_epoch: int, output_dir: str, saver: EpochSaver) -> list:
    """A resumed run's folder made consistent with its checkpoint: what a kill left half-done removed, later epochs
    moved aside, the checkpoint history completed, ``summary.csv`` rewritten from the rows the checkpoint holds
    (older checkpoints: the file's rows before the start). Returns the rows."""
    path, summary = config.resumed.path, os.path.join(output_dir, 'summary.csv')
    content = read_checkpoint_meta(path) or {}
    in_place, aside = _resumes_in(config, output_dir), None
    if in_place:
        remove_stale_tmp(output_dir)
        if isinstance(content.get('epoch'), int):
            aside = supersede_later_epochs(output_dir, content['epoch'], _checkpoint_epoch)
    rows = content.get(SUMMARY_KEY)
    if rows is None:
        rows = read_summary_rows(summary) if in_place else []
    rows = [r for r in rows if int(float(r['epoch'])) < start_epoch]
    if rows or os.path.exists(summary):
        write_summary(summary, rows, keep_dir=aside)
    if in_place:
        saver.restore(path, content)
    return rows


def _write_run_files(config: TrainConfig, run: TrainingRun, output_dir: str) -> None:
    """``args.yaml`` (a resumed run keeps the run's; options it changes are recorded in ``args-resume-<epoch>.yaml``)
    and the class map."""
    changes = config.resumed.changes if config.resumed else ()
    if not _resumes_in(config, output_dir):
        _write_text(os.path.join(output_dir, 'args.yaml'), config.record_text)
    elif changes:
        name = os.path.join(output_dir, f'args-resume-{run.start_epoch}.yaml')
        _write_text(name, f'# resumed at epoch {run.start_epoch} with: {"; ".join(changes)}\n{config.record_text}')
        _logger.warning(f'Resumed with {"; ".join(changes)} from epoch {run.start_epoch} on; recorded in {name}.')
    if run.class_to_idx:
        write_class_map(run.class_to_idx, output_dir)


def _write_text(path: str, text: str) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def _init_wandb(config: TrainConfig, exp_name: str, record: argparse.Namespace) -> bool:
    """timm's optional wandb logging: ``True`` when metrics go to wandb; a warning when the package is missing."""
    r = config.run
    if not r.log_wandb:
        return False
    try:
        import wandb
    except ImportError:
        _logger.warning("You've requested to log metrics to wandb but package not found. "
                        "Metrics not being logged to wandb, try `pip install wandb`")
        return False
    if r.wandb_resume_id and not r.resume:
        raise UserError('--wandb-resume-id continues a wandb run: pass the run\'s checkpoint with --resume too.')
    wandb.init(project=r.wandb_project, name=exp_name, config=record, tags=r.wandb_tags,
               resume='must' if r.wandb_resume_id else None, id=r.wandb_resume_id or None)
    return True


def _log_start(config: TrainConfig, run: TrainingRun, output_dir: str) -> None:
    accum_steps, repeats = config.optim.grad_accum_steps, config.loader.aug_repeats
    batches = len(run.trainer.loader_train)
    accum = (f' x {accum_steps} accumulated = {run.updates_per_epoch} optimizer steps/epoch'
             if accum_steps > 1 else '')
    _logger.info(
        f'Model {safe_model_name(config.run.model)} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M '
        f'params), {run.num_train} train / {run.num_eval} val images, {run.num_classes} classes. '
        f'Criterion: {describe_criterion(run.criterion)}. Sampler: '
        + (f'grouped repeats m={repeats}, mode {config.loader.lt_epoch}, {batches} batches/epoch'
           if repeats else f'plain, {batches} batches/epoch')
        + f'{accum}. Output: {output_dir}. Epochs {run.start_epoch}..{run.num_epochs - 1}.')
