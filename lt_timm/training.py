"""``train.py``'s run: from a :class:`~lt_timm.config.TrainConfig` to a trained run folder.

:func:`train` builds the run (:func:`build_run`: datasets, model, loaders, criterion, task, optimizer, resume, EMA /
compile / DDP, schedule, the :class:`~lt_timm.trainer.Trainer`), claims the run folder (:func:`open_run`) and fits.
Built from timm's pieces — ``create_model``, ``create_dataset``, ``lt_timm.create_loader``, ``Mixup`` /
``FastCollateMixup``, ``create_optimizer_v2``, ``create_scheduler_v2``, ``timm.task.ClassificationTask`` (with its
``ModelEmaV3``), ``CheckpointSaver`` (atomic ``tmp`` -> ``last`` writes), ``update_summary`` — so flags, YAML
recipes (``-c``, keys are the flags' dest names) and checkpoints carry over from timm.
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
from timm import utils
from timm.data import AugMixDataset, FastCollateMixup, Mixup, resolve_data_config
from timm.layers import set_fast_norm
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint

from .builders import (autocast_and_scaler, create_loaders, create_model_from, open_datasets, prepare_model,
                       resolve_num_classes, setup_training_process)
from .config import MixupOptions, OptimOptions, TrainConfig
from .data import write_class_map
from .errors import UserError
from .loss import LossTransform
from .modeling import checkpoint_problem, read_checkpoint_args
from .recorder import Recorder
from .registry import LossOptions, create_loss, describe_criterion
from .run_dir import RunLock, claim_run_dir, truncate_summary
from .task import LossTransformTask
from .trainer import Trainer

__all__ = ['train', 'build_run', 'open_run', 'TrainingRun', 'create_criterion', 'create_mixup', 'wrap_aug_splits',
           'create_optimizer', 'create_scheduler', 'checkpoint_args']

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
    """Run a full training job; returns the final epoch's eval metrics (and best) for scripting."""
    run = build_run(config)
    lock = None
    try:
        if config.ranks.is_primary:
            lock = open_run(config, run)
        return run.trainer.fit(run.start_epoch, run.num_epochs)
    finally:
        if lock is not None:
            lock.release()


def build_run(config: TrainConfig) -> TrainingRun:
    """Everything before the run folder, in timm's order: datasets, model, AMP, mixup, criterion, loaders, task,
    optimizer, ``--resume``, EMA / compile / DDP, the schedule."""
    setup_training_process(config.seed, config.ranks.rank)
    if config.fast_norm:
        set_fast_norm()
    device = torch.device(config.precision.device)
    dataset_train, dataset_eval, class_to_idx = open_datasets(config.data, config.ranks)
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
    """``--resume``: model, optimizer, scaler (timm's task checkpoint); a different ``--lr`` is refused."""
    path, lr = config.run.resume, config.optim.lr
    if not path:
        return None
    if not os.path.isfile(path):
        raise UserError(f'--resume checkpoint {path} not found; pass the last.pth.tar of the run to continue.')
    saved = read_checkpoint_args(path)
    if saved is not None and lr is not None and getattr(saved, 'lr', lr) != lr:
        raise UserError(f'--lr {lr} differs from the resumed run\'s lr {saved.lr}: a resumed run continues its '
                        f'own schedule; drop --lr, or start a new run from the weights with --initial-checkpoint.')
    keep = not config.run.no_resume_opt
    try:
        return resume_task_checkpoint(task, path, optimizer=optimizer if keep else None,
                                      loss_scaler=loss_scaler if keep else None, log_info=config.ranks.is_primary)
    except Exception as e:
        raise UserError(checkpoint_problem(path, e, f'--model {config.model.model} with {num_classes} classes')) from e


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

def checkpoint_args(record: argparse.Namespace, num_classes: int, class_to_idx: Dict[str, int]) -> argparse.Namespace:
    """The ``args`` every checkpoint holds (timm's format): the resolved flags, the run's number of classes and its
    class map (not in ``args.yaml``)."""
    saved = argparse.Namespace(**vars(record))
    saved.num_classes = num_classes
    if class_to_idx:
        saved.class_to_idx = class_to_idx
    return saved


def open_run(config: TrainConfig, run: TrainingRun) -> RunLock:
    """Claim the run folder (never overwritten; ``--resume`` continues in its own), make it ready (timm's
    CheckpointSaver, its history restored when resuming in place; summary rows past the start dropped;
    ``args.yaml`` and the class map written), give the trainer its :class:`Recorder`, log the run's start."""
    exp_name = config.run.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(config.run.model), str(run.input_size[-1])])
    lock = claim_run_dir(config.run.output or './output/train', exp_name, config.run.resume)
    output_dir = os.path.dirname(lock.path)
    trainer = run.trainer
    record = checkpoint_args(config.record, run.num_classes, run.class_to_idx)
    saver = utils.CheckpointSaver(
        model=run.model, optimizer=trainer.optimizer, args=record, amp_scaler=trainer.loss_scaler,
        checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=config.run.eval_metric == 'loss',
        max_history=config.run.checkpoint_hist, task=trainer.task)
    resume = config.run.resume
    if resume and os.path.dirname(os.path.abspath(resume)) == os.path.abspath(output_dir):
        saver.load_state_dict_from_checkpoint(resume)
    truncate_summary(os.path.join(output_dir, 'summary.csv'), run.start_epoch)
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        f.write(config.record_text)
    if run.class_to_idx:
        write_class_map(run.class_to_idx, output_dir)
    trainer.recorder = Recorder(saver, output_dir, log_wandb=_init_wandb(config, exp_name, record))
    _log_start(config, run, output_dir)
    return lock


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
