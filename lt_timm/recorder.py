"""What the primary rank of a training run writes into its run folder while it trains: checkpoints (timm's
``CheckpointSaver``: ``last``, ``model_best``, ``checkpoint-N``, recovery files; ``tmp`` then renamed), one
``summary.csv`` row per validated epoch (and wandb), the input batches of ``--save-images`` and ``curves.png``."""
import logging
import os
from collections import OrderedDict
from typing import Mapping, Optional, Tuple

import torch

from .plots import plot_training_curves
from .run_dir import update_summary

__all__ = ['Recorder']

_logger = logging.getLogger('train')


class Recorder:
    """The run folder ``output_dir`` of a run, written through ``saver`` (timm's ``CheckpointSaver``)."""

    def __init__(self, saver, output_dir: str, log_wandb: bool = False):
        self.saver = saver
        self.output_dir = output_dir
        self.log_wandb = log_wandb
        self.summary_path = os.path.join(output_dir, 'summary.csv')

    def save_checkpoint(self, epoch: int, metric: float) -> Tuple[Optional[float], Optional[int]]:
        """This epoch's checkpoint; returns the best metric so far and its epoch."""
        return self.saver.save_checkpoint(epoch, metric=metric)

    def save_recovery(self, epoch: int, update_idx: int) -> None:
        self.saver.save_recovery(epoch, batch_idx=update_idx)

    def save_batch(self, input: torch.Tensor, batch_idx: int) -> None:
        """timm's ``--save-images``: the batch as one JPEG grid."""
        import torchvision.utils
        torchvision.utils.save_image(input.float(), os.path.join(self.output_dir, f'train-batch-{batch_idx}.jpg'),
                                     padding=0, normalize=True)

    def summary_row(self, epoch: int, train_loss: float, eval_metrics: Mapping[str, float], lr: float,
                    extra: Mapping[str, float]) -> None:
        update_summary(epoch, OrderedDict(loss=train_loss), eval_metrics, self.summary_path, lr=lr, extra=extra,
                       log_wandb=self.log_wandb)

    def finish(self, best_metric: Optional[float], best_epoch: Optional[int], plot_title: Optional[str]) -> None:
        """The best epoch in the log; ``curves.png`` unless ``plot_title`` is None (``--no-plot``)."""
        if best_metric is not None:
            _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
        if plot_title is not None and os.path.exists(self.summary_path):
            png = plot_training_curves(self.summary_path, os.path.join(self.output_dir, 'curves.png'),
                                       title=plot_title)
            _logger.info(f'Training curves: {png}')
