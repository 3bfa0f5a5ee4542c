"""The training task: timm's ``ClassificationTask`` whose result dict also carries the loss parts.

timm's tasks return ``{'loss': ..., 'output': ...}``; with a :class:`~lt_timm.loss.LossTransform` criterion (also a
``torch.compile``'d one) this task adds ``'loss_base'`` and ``'loss_consistency'`` (detached, on the device), so the
training loop logs T(L)'s parts from the result, without reaching into the criterion.
"""
from typing import Dict

import torch
from timm.task import ClassificationTask

__all__ = ['LossTransformTask']


class LossTransformTask(ClassificationTask):
    """``ClassificationTask`` (model, criterion, EMA, compile, DDP, checkpoint state: all timm's) with the loss parts
    in its result."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        result = super().forward(input, target)
        base = getattr(self.criterion, 'last_base', None)  # set by each LossTransform call
        consistency = getattr(self.criterion, 'last_consistency', None)
        if base is not None and consistency is not None:
            result.update(loss_base=base, loss_consistency=consistency)
        return result
