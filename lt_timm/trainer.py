"""``train.py``'s training loop: a :class:`Trainer` that owns what the loop shares (task, optimizer, loaders,
schedule, AMP, recording) and does one thing per method, as timm's ``timm.task`` does: :meth:`~Trainer.fit` (the
epochs), :meth:`~Trainer.train_epoch`, :meth:`~Trainer.train_step` (one micro-batch), :meth:`~Trainer.read_interval`
(the one host sync of a ``--log-interval``), :meth:`~Trainer.evaluate` and :meth:`~Trainer.record`.

The loss and its parts come from the task's result dict (:class:`lt_timm.task.LossTransformTask`), are summed on the
device and read at each log interval (and the epoch's end), where a non-finite sum stops the run:
no host synchronisation per step. ``--check-loss-every-step`` checks every step's loss before it is applied instead
(one sync per step).

``--grad-accum-steps N`` as timm: each micro-batch (a whole grouped batch, all replicas of its images) adds loss / N
to the gradients, the optimizer steps every N micro-batches (and at the epoch's end), DDP syncs only on the stepping
micro-batch, and the scheduler, EMA, log interval and recovery interval count optimizer steps.
"""
import logging
import math
import time
from collections import OrderedDict
from contextlib import suppress
from typing import List, Optional, Tuple

import torch
from timm import utils

from .accuracy import read_sums, validate
from .config import LoopOptions
from .errors import UserError
from .modeling import all_finite
from .run_dir import resume_hint

__all__ = ['Trainer', 'MicroBatches', 'EpochMeter', 'loss_parts']

_logger = logging.getLogger('train')


def loss_parts(result: dict) -> torch.Tensor:
    """(loss, base, consistency) of a task result as one detached device tensor; consistency NaN without T(L)."""
    loss = result['loss'].detach()
    base, cons = result.get('loss_base'), result.get('loss_consistency')
    if base is None or cons is None:
        base, cons = loss, torch.full_like(loss, float('nan'))
    return torch.stack([loss.float(), base.float(), cons.float()])


def _diverged(loss_value: float, epoch: int, steps: str, output_dir: Optional[str], applied: bool,
              amp: bool = False) -> UserError:
    what = 'nothing of this epoch was saved' if applied else 'this step was not applied'
    return UserError(f'loss is {loss_value} at epoch {epoch} {steps}: training diverged and {what}; '
                     f'{_advice(output_dir, epoch, amp)}.')


def _advice(output_dir: Optional[str], epoch: int, amp: bool) -> str:
    """What to do after a divergence: options a resumed run may change (--lr, --clip-grad), then --resume."""
    advice = f'lower --lr or add --clip-grad 1.0, {resume_hint(output_dir, epoch)}'
    if amp:
        advice += ' (or train without --amp: a new run from that checkpoint with --initial-checkpoint)'
    return advice


class MicroBatches:
    """timm's gradient accumulation over one epoch's micro-batches, its index arithmetic kept as is (the epoch's
    last, shorter accumulation divides by its own length)."""

    def __init__(self, num_batches: int, accum_steps: int):
        self.num_batches = num_batches
        self.accum_steps = max(1, accum_steps)
        self.last_accum_steps = num_batches % self.accum_steps
        self.last_batch_idx_to_accum = num_batches - self.last_accum_steps
        self.updates_per_epoch = (num_batches + self.accum_steps - 1) // self.accum_steps

    def step(self, batch_idx: int) -> Tuple[bool, bool, int, int]:
        """(last batch, optimizer step after it, update index, loss divisor) of micro-batch ``batch_idx``."""
        last_batch = batch_idx + 1 == self.num_batches
        need_update = last_batch or (batch_idx + 1) % self.accum_steps == 0
        update_idx = batch_idx // self.accum_steps
        if batch_idx >= self.last_batch_idx_to_accum:
            self.accum_steps = self.last_accum_steps
        return last_batch, need_update, update_idx, self.accum_steps


class EpochMeter:
    """One epoch so far: loss, base and consistency summed on the device (each times its rows), rows, and timm's
    update / data time meters."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float32 if device.type == 'mps' else torch.float64, device=device)
        self.samples = 0
        self.update_samples = 0  # rows since the last optimizer step
        self.logged_step = 0  # the first micro-batch not yet checked by a log-interval read
        self.update_time, self.data_time = utils.AverageMeter(), utils.AverageMeter()
        self.start = time.time()
        self.update_start = self.data_start = time.time()

    def add(self, parts: torch.Tensor, rows: int) -> None:
        self.sums += parts.to(self.sums.dtype) * rows
        self.samples += rows
        self.update_samples += rows

    def updated(self) -> None:
        self.update_time.update(time.time() - self.update_start)
        self.update_start = time.time()


class Trainer:
    """Fits ``task`` (a timm task whose result holds the loss parts) with ``optimizer`` on ``loader_train``,
    validating on ``loader_eval``; ``recorder`` (:class:`lt_timm.recorder.Recorder`, primary rank only) writes the
    run folder."""

    def __init__(self, task, optimizer: torch.optim.Optimizer, loader_train, device: torch.device,
                 loop: LoopOptions, loader_eval=None, lr_scheduler=None, autocast=suppress, loss_scaler=None,
                 mixup_fn=None, model_dtype: Optional[torch.dtype] = None, recorder=None):
        self.task, self.optimizer, self.device, self.loop = task, optimizer, device, loop
        self.loader_train, self.loader_eval, self.lr_scheduler = loader_train, loader_eval, lr_scheduler
        self.autocast, self.loss_scaler, self.mixup_fn = autocast, loss_scaler, mixup_fn
        self.model_dtype, self.recorder = model_dtype, recorder
        self.second_order = getattr(optimizer, 'is_second_order', False)
        self.epoch: Optional[int] = None  # the epoch in progress (named when the run is stopped)

    @property
    def output_dir(self) -> Optional[str]:
        return self.recorder.output_dir if self.recorder is not None else None

    # ---------------------------------------------------------------- epochs

    def fit(self, start_epoch: int, num_epochs: int) -> 'OrderedDict[str, float]':
        """Epochs ``start_epoch .. num_epochs - 1``; returns the last eval metrics, the best metric and the folder."""
        best: Tuple[Optional[float], Optional[int]] = (None, None)
        eval_metrics = OrderedDict()
        for epoch in range(start_epoch, num_epochs):
            self.epoch = epoch
            self.begin_epoch(epoch)
            train_metrics = self.train_epoch(epoch)
            self.distribute_bn(log=epoch == start_epoch)
            self.check_finite_weights(epoch)
            if (epoch + 1) % self.loop.val_interval != 0 and epoch + 1 != num_epochs:
                self.skip_validation(epoch)
                continue
            eval_metrics, extra = self.evaluate(train_metrics)
            best = self.record(epoch, train_metrics, eval_metrics, extra) or best
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(epoch + 1, eval_metrics[self.loop.eval_metric])
        return self.finish(eval_metrics, *best)

    def begin_epoch(self, epoch: int) -> None:
        """The sampler's epoch, and every RNG the epoch uses (augmentation, dropout, mixup, worker seeds) from
        (seed, epoch, rank): a resumed run replays the uninterrupted one."""
        inner = getattr(self.loader_train, 'loader', self.loader_train)  # also through timm's PrefetchLoader
        for obj in (getattr(inner, 'batch_sampler', None), getattr(inner, 'sampler', None)):
            if hasattr(obj, 'set_epoch'):
                obj.set_epoch(epoch)
                break
        utils.random_seed(self.loop.seed + 100_003 * (epoch + 1), self.loop.ranks.rank)

    def distribute_bn(self, log: bool = False) -> None:
        """As timm (``--dist-bn``): make the ranks' BatchNorm statistics equal (mean over ranks, or rank 0's)."""
        ranks, mode = self.loop.ranks, self.loop.dist_bn
        if not (ranks.distributed and mode in ('broadcast', 'reduce')):
            return
        if ranks.is_primary and log:
            _logger.info(f'Distributing BatchNorm running means and vars after every epoch (--dist-bn {mode}).')
        utils.distribute_bn(self.task.get_trainable_module(), ranks.world_size, mode == 'reduce')
        if self.task.has_ema() and not self.loop.model_ema_force_cpu:
            utils.distribute_bn(self.task.get_trainable_module(ema=True), ranks.world_size, mode == 'reduce')

    def check_finite_weights(self, epoch: int) -> None:
        """Never validate or save non-finite weights: stop and say which good checkpoint to resume from."""
        task = self.task
        models = [task.get_trainable_module()] + ([task.get_eval_model(ema=True)] if task.has_ema() else [])
        if all(all_finite(m) for m in models):
            return
        raise UserError(f'training diverged in epoch {epoch}: the weights are no longer finite (NaN/inf) and were not '
                        f'saved; {_advice(self.output_dir, epoch, self.autocast is not suppress)}.')

    def skip_validation(self, epoch: int) -> None:
        """As timm: no validation, summary row or checkpoint this epoch (``--val-interval``); the scheduler steps."""
        if self.loop.ranks.is_primary:
            _logger.info(f'Epoch {epoch}: skipping validation and checkpointing (--val-interval '
                         f'{self.loop.val_interval}).')
        if self.lr_scheduler is not None:
            self.lr_scheduler.step(epoch + 1, None)

    # ---------------------------------------------------------------- one epoch

    def train_epoch(self, epoch: int) -> 'OrderedDict[str, float]':
        """One epoch over ``loader_train``; returns the epoch's mean loss, its parts, time and throughput."""
        self.stop_mixup_after_off_epoch(epoch)
        self.task.get_trainable_module().train()
        batches = MicroBatches(len(self.loader_train), self.loop.grad_accum_steps)
        meter = EpochMeter(self.device)
        num_updates = epoch * batches.updates_per_epoch
        self.optimizer.zero_grad()
        for batch_idx, (input, target) in enumerate(self.loader_train):
            meter.data_time.update(time.time() - meter.data_start)
            last_batch, need_update, update_idx, divisor = batches.step(batch_idx)
            input, target = self.prepare_batch(input, target)
            parts = self.train_step(input, target, divisor, need_update, epoch, batch_idx)
            meter.add(parts, input.shape[0])
            if not need_update:
                meter.data_start = time.time()
                continue
            num_updates += 1
            self.after_update(num_updates, meter)
            if update_idx % self.loop.log_interval == 0 or last_batch:
                host = self.read_interval(meter, parts, epoch, batch_idx)
                self.log_interval(epoch, batch_idx, update_idx, batches.updates_per_epoch, host, meter, input)
            meter.update_samples = 0
            self.after_log(epoch, update_idx, num_updates)
            meter.data_start = time.time()
        return self.epoch_metrics(meter)

    def stop_mixup_after_off_epoch(self, epoch: int) -> None:
        """timm's ``--mixup-off-epoch``: from that epoch on, Mixup/CutMix are off (in the prefetcher or
        ``mixup_fn``)."""
        off = self.loop.mixup_off_epoch
        if off and epoch >= off:
            if self.loop.prefetcher and getattr(self.loader_train, 'mixup_enabled', False):
                self.loader_train.mixup_enabled = False
            elif self.mixup_fn is not None:
                self.mixup_fn.mixup_enabled = False

    def prepare_batch(self, input: torch.Tensor, target: torch.Tensor):
        """Without the prefetcher: to the device (images in the model's dtype), then Mixup; channels-last."""
        if not self.loop.prefetcher:
            input, target = input.to(device=self.device, dtype=self.model_dtype), target.to(self.device)
            if self.mixup_fn is not None:
                input, target = self.mixup_fn(input, target)
        if self.loop.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        return input, target

    def train_step(self, input: torch.Tensor, target: torch.Tensor, divisor: int, need_update: bool, epoch: int,
                   batch_idx: int) -> torch.Tensor:
        """One micro-batch: the task's forward (its result dict), backward of loss / ``divisor``, and on
        ``need_update`` the optimizer step. Returns (loss, base, consistency) as one detached device tensor."""
        distributed = self.loop.ranks.distributed and hasattr(self.task.get_trainable_module(), 'no_sync')
        with self.task.no_sync() if distributed and not need_update else suppress():
            with self.autocast():
                result = self.task(input, target)
            loss = result['loss']
            if self.loop.check_loss_every_step and not torch.isfinite(loss):
                raise _diverged(loss.item(), epoch, f'step {batch_idx}', self.output_dir, applied=False,
                                amp=self.autocast is not suppress)
            self.backward_and_step(loss / divisor if divisor > 1 else loss, need_update)
        return loss_parts(result)

    def backward_and_step(self, step_loss: torch.Tensor, need_update: bool) -> None:
        """timm's step: backward of the micro-batch's share of the loss; on ``need_update``, clipping then the
        optimizer step (through the AMP loss scaler when there is one)."""
        clip_grad, clip_mode = self.loop.clip_grad, self.loop.clip_mode
        clip_parameters = self.task.get_clip_parameters(exclude_head='agc' in clip_mode) \
            if clip_grad is not None else None
        if self.loss_scaler is not None:
            self.loss_scaler(step_loss, self.optimizer, clip_grad=clip_grad, clip_mode=clip_mode,
                             parameters=clip_parameters, create_graph=self.second_order, need_update=need_update)
            return
        step_loss.backward(create_graph=self.second_order)
        if need_update:
            if clip_grad is not None:
                utils.dispatch_clip_grad(clip_parameters, value=clip_grad, mode=clip_mode)
            self.optimizer.step()

    def after_update(self, num_updates: int, meter: EpochMeter) -> None:
        """After an optimizer step: gradients cleared, EMA updated, optional CUDA sync, the update timed."""
        self.optimizer.zero_grad()
        self.task.update_ema(step=num_updates)
        if self.loop.synchronize_step and self.device.type == 'cuda':
            torch.cuda.synchronize()
        meter.updated()

    def read_interval(self, meter: EpochMeter, parts: torch.Tensor, epoch: int, batch_idx: int) -> List[float]:
        """The one host sync of a log interval: the epoch's sums, rows and this step's parts (over the ranks); a
        non-finite sum stops the run."""
        host = read_sums(torch.cat([meter.sums, meter.sums.new_tensor([meter.samples]), parts.to(meter.sums.dtype)]),
                         self.loop.ranks.distributed, self.device)
        if not math.isfinite(host[0]):
            raise _diverged(host[0], epoch, f'between steps {meter.logged_step} and {batch_idx} (checked every '
                            f'--log-interval {self.loop.log_interval} steps; --check-loss-every-step stops before the '
                            f'step)', self.output_dir, applied=True, amp=self.autocast is not suppress)
        meter.logged_step = batch_idx + 1
        return host

    def log_interval(self, epoch: int, batch_idx: int, update_idx: int, updates_per_epoch: int, host: List[float],
                     meter: EpochMeter, input: torch.Tensor) -> None:
        """timm's training log line (``Train: epoch [update/updates (pct%)]  Loss: now (mean)  Time ...  LR ...  Data
        ...``) plus the loss parts (``Base:``, ``Consistency:``, now and epoch mean), on the primary rank; and
        ``--save-images``. ``host`` = summed loss, base and consistency (times rows), rows, then the last step's
        loss, base and consistency, summed over the ranks."""
        ranks = self.loop.ranks
        if not ranks.is_primary:
            return
        rows, update_rows = max(host[3], 1.0), meter.update_samples * ranks.world_size
        now = [v / ranks.world_size for v in host[4:7]]
        mean = [v / rows for v in host[0:3]]
        lrl = [pg['lr'] for pg in self.optimizer.param_groups]
        update_time, data_time = meter.update_time, meter.data_time
        _logger.info(
            f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
            f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
            f'Loss: {now[0]:#.3g} ({mean[0]:#.3g})  '
            f'Time: {update_time.val:.3f}s, {update_rows / max(update_time.val, 1e-9):>7.2f}/s  '
            f'({update_time.avg:.3f}s, {update_rows / max(update_time.avg, 1e-9):>7.2f}/s)  '
            f'LR: {sum(lrl) / len(lrl):.3e}  '
            f'Data: {data_time.val:.3f} ({data_time.avg:.3f})'
            + ('' if math.isnan(now[2]) else
               f'  Base: {now[1]:#.3g} ({mean[1]:#.3g})  Consistency: {now[2]:#.3g} ({mean[2]:#.3g})'))
        if self.loop.save_images and self.recorder is not None:
            self.recorder.save_batch(input, batch_idx)

    def after_log(self, epoch: int, update_idx: int, num_updates: int) -> None:
        """Recovery checkpoint every ``--recovery-interval`` optimizer steps; the scheduler's per-update step."""
        interval = self.loop.recovery_interval
        if self.recorder is not None and interval and (update_idx + 1) % interval == 0:
            self.recorder.save_recovery(epoch, update_idx)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step_update(num_updates=num_updates)

    def epoch_metrics(self, meter: EpochMeter) -> 'OrderedDict[str, float]':
        """The epoch's means (one host sync, over the ranks), its time and images/s."""
        if hasattr(self.optimizer, 'sync_lookahead'):
            self.optimizer.sync_lookahead()
        epoch_time = time.time() - meter.start
        loss, base, consistency, count = read_sums(torch.cat([meter.sums, meter.sums.new_tensor([meter.samples])]),
                                                   self.loop.ranks.distributed, self.device)
        return OrderedDict([
            ('loss', loss / max(count, 1.0)),
            ('loss_base', base / max(count, 1.0)),
            ('loss_consistency', consistency / max(count, 1.0)),
            ('epoch_s', epoch_time),
            ('img_s', count / max(epoch_time, 1e-9)),
        ])

    # ---------------------------------------------------------------- evaluation and recording

    def evaluate(self, train_metrics) -> Tuple['OrderedDict[str, float]', 'OrderedDict[str, float]']:
        """(eval metrics, extra summary columns). As timm: with EMA, the eval metrics (summary's ``eval_*``, best
        checkpoint, plateau scheduler) are the EMA weights'; the plain weights' are kept as ``eval_noema_*``."""
        eval_metrics = self.validate_model(self.task.get_eval_model())
        extra = OrderedDict((f'train_{k}', v) for k, v in train_metrics.items() if k != 'loss')
        if self.task.has_ema() and not self.loop.model_ema_force_cpu:
            extra.update((f'eval_noema_{k}', v) for k, v in eval_metrics.items())
            eval_metrics = self.validate_model(self.task.get_eval_model(ema=True), ' (EMA)')
        return eval_metrics, extra

    def validate_model(self, model, log_suffix: str = '') -> 'OrderedDict[str, float]':
        """timm's validation of ``model`` on ``loader_eval`` (:func:`lt_timm.accuracy.validate`)."""
        return validate(model, self.loader_eval, self.device, self.loop.ranks, self.loop.prefetcher,
                        self.loop.channels_last, self.autocast, log_suffix, log_freq=self.loop.log_interval,
                        input_dtype=self.model_dtype)

    def record(self, epoch: int, train_metrics, eval_metrics, extra) -> Optional[Tuple[Optional[float], Optional[int]]]:
        """The checkpoint, then its summary row (:meth:`lt_timm.recorder.Recorder.commit_epoch`); returns the best
        metric and its epoch so far (``None`` off the primary rank)."""
        if self.recorder is None:
            return None
        lrs = [pg['lr'] for pg in self.optimizer.param_groups]
        return self.recorder.commit_epoch(epoch, eval_metrics[self.loop.eval_metric], train_metrics['loss'],
                                          eval_metrics, sum(lrs) / len(lrs), extra)

    def finish(self, eval_metrics, best_metric: Optional[float], best_epoch: Optional[int]) -> 'OrderedDict':
        if self.recorder is not None:
            self.recorder.finish(best_metric, best_epoch, None if self.loop.no_plot else self.loop.plot_title)
        result = OrderedDict(eval_metrics)
        result['best'] = best_metric
        result['output_dir'] = self.output_dir
        return result
