"""What the primary rank of a training run writes into its run folder while it trains: the checkpoints
(:class:`~lt_timm.checkpoints.EpochSaver`: ``last``, ``model_best``, ``checkpoint-N``, recovery files), one
``summary.csv`` row per validated epoch (and wandb), the input batches of ``--save-images`` and ``curves.png``.

Summary rows and checkpoints agree after a kill at any instruction: every checkpoint also holds the summary rows up
to its epoch, and the row is appended only after its checkpoint is committed; ``--resume`` rewrites ``summary.csv``
from the rows of the checkpoint it resumes (a missing or torn last row is restored, rows past it dropped).
"""
import logging
import os
from collections import OrderedDict
from typing import Callable, List, Mapping, Optional, Tuple

import torch
from timm.utils import unwrap_model

from .checkpoints import EpochSaver
from .errors import UserError, os_error_message
from .plots import plot_training_curves
from .run_dir import append_summary, summary_row

__all__ = ['Recorder', 'checkpoint_state_fn', 'SUMMARY_KEY']

_logger = logging.getLogger('train')

SUMMARY_KEY = 'summary'  # the checkpoint entry that holds the run's summary.csv rows up to its epoch


def checkpoint_state_fn(task, optimizer: torch.optim.Optimizer, loss_scaler, args) -> Callable[[int, Optional[float]],
                                                                                                 dict]:
    """The content of a checkpoint as timm's ``CheckpointSaver`` writes it (epoch, arch, optimizer, version 2, the
    run's ``args``, the AMP scaler, the task's model and EMA state dicts, the metric)."""
    def state(epoch: int, metric: Optional[float]) -> dict:
        out = {'epoch': epoch, 'arch': args.model, 'optimizer': optimizer.state_dict(), 'version': 2, 'args': args}
        if loss_scaler is not None:
            out[loss_scaler.state_dict_key] = loss_scaler.state_dict()
        out.update(task.get_checkpoint_state(unwrap_fn=unwrap_model))
        out.update(task.get_checkpoint_state(ema=True, unwrap_fn=unwrap_model))
        if metric is not None:
            out['metric'] = metric
        return out
    return state


class Recorder:
    """The run folder ``output_dir`` of a run: checkpoints through ``saver``, ``summary.csv`` from ``rows`` (the
    rows so far: a resumed run's, from its checkpoint)."""

    def __init__(self, saver: EpochSaver, output_dir: str, log_wandb: bool = False, rows=()):
        self.saver = saver
        self.output_dir = output_dir
        self.log_wandb = log_wandb
        self.summary_path = os.path.join(output_dir, 'summary.csv')
        self.rows: List[Mapping[str, object]] = list(rows)

    def commit_epoch(self, epoch: int, metric: float, train_loss: float, eval_metrics: Mapping[str, float],
                     lr: float, extra: Mapping[str, float]) -> Tuple[Optional[float], Optional[int]]:
        """The end of a validated epoch: its checkpoint (holding every summary row up to it), then its row; returns
        the best metric so far and its epoch."""
        row = summary_row(epoch, OrderedDict(loss=train_loss), eval_metrics, lr, extra)
        best = self.saver.save(epoch, metric, extra={SUMMARY_KEY: self.rows + [row]})
        self.rows.append(row)
        if self.log_wandb:
            import wandb
            wandb.log(row)
        try:
            append_summary(self.summary_path, row)
        except OSError as e:
            raise UserError(f'{os_error_message(e, in_run=True) or e}, then --resume {self.saver.path("last.pth.tar")} '
                            f'(epoch {epoch} is saved there with its summary row, which resuming writes).') from None
        return best

    def save_recovery(self, epoch: int, update_idx: int) -> None:
        self.saver.save_recovery(epoch, update_idx)

    def save_batch(self, input: torch.Tensor, batch_idx: int) -> None:
        """timm's ``--save-images``: the batch as one JPEG grid."""
        import torchvision.utils
        torchvision.utils.save_image(input.float(), os.path.join(self.output_dir, f'train-batch-{batch_idx}.jpg'),
                                     padding=0, normalize=True)

    def finish(self, best_metric: Optional[float], best_epoch: Optional[int], plot_title: Optional[str]) -> None:
        """The best epoch in the log; ``curves.png`` unless ``plot_title`` is None (``--no-plot``)."""
        if best_metric is not None:
            _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
        if plot_title is not None and os.path.exists(self.summary_path):
            png = plot_training_curves(self.summary_path, os.path.join(self.output_dir, 'curves.png'),
                                       title=plot_title)
            _logger.info(f'Training curves: {png}')
