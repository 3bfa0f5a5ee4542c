"""timm's validation loop (top-1, top-5 and CE loss over a loader), shared by the :class:`~lt_timm.trainer.Trainer`
and ``validate.py``, and the one reader of device-side sums (one host sync; summed over DDP ranks)."""
import logging
import time
from collections import OrderedDict
from contextlib import suppress
from typing import List, Optional

import torch
import torch.nn as nn
from timm import utils

from .config import Ranks

__all__ = ['validate', 'read_sums']

_logger = logging.getLogger('train')


def read_sums(sums: torch.Tensor, distributed: bool, device: torch.device) -> List[float]:
    """Device-side sums on the host (one sync); summed over ranks under DDP, so every rank logs the same means."""
    if distributed:
        sums = sums.to(device=device, dtype=torch.float64 if device.type != 'mps' else torch.float32)
        torch.distributed.all_reduce(sums)
    return sums.cpu().double().tolist()


def _log_eval_batch(name: str, batch_idx: int, num_batches: Optional[int], batch_time_m, now: torch.Tensor,
                    sums: torch.Tensor) -> None:
    """timm's validation log line: ``Test: [batch/last]  Time: ...  Loss: ...  Acc@1: ...  Acc@5: ...`` (this batch,
    then the running mean)."""
    cur, avg = (now[:3] / max(now[3].item(), 1.0)).tolist(), (sums[:3] / max(sums[3].item(), 1.0)).tolist()
    _logger.info(
        f'{name}: [{batch_idx:>4d}/{num_batches - 1 if num_batches else "?"}]  '
        f'Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})  '
        f'Loss: {cur[0]:>7.3f} ({avg[0]:>6.4f})  '
        f'Acc@1: {cur[1]:>7.3f} ({avg[1]:>7.3f})  '
        f'Acc@5: {cur[2]:>7.3f} ({avg[2]:>7.3f})')


def _batch_sums(model: nn.Module, input: torch.Tensor, target: torch.Tensor, autocast,
                present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(loss, top-1, top-5) of one batch, each times its rows, the rows, then (with ``present``, the labels the data
    holds) the top-1 hits among those classes only (float64, on the host)."""
    with autocast():
        output = model(input)
    if isinstance(output, (tuple, list)):
        output = output[0]
    loss = nn.functional.cross_entropy(output.float(), target)
    k = min(5, output.shape[-1])
    acc1, acc5 = utils.accuracy(output, target, topk=(1, k))
    n = input.shape[0]
    sums = [loss.item() * n, acc1.item() * n, acc5.item() * n, n]
    if present is not None:
        present = present.to(output.device)
        sums.append((present[output[:, present].argmax(1)] == target).sum().item())
    return torch.tensor(sums, dtype=torch.float64)


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, ranks: Ranks = Ranks(), prefetcher: bool = False,
             channels_last: bool = False, autocast=suppress, log_suffix: str = '', log_freq: int = 0,
             input_dtype: Optional[torch.dtype] = None, present: Optional[torch.Tensor] = None
             ) -> 'OrderedDict[str, float]':
    """Top-1/top-5 accuracy (%) and CE loss over ``loader`` (timm's validation semantics); ``present`` (label
    indices): also ``top1_present``, top-1 among those classes only (e.g. the 10 ImageNet classes of Imagenette
    under the 1000-way head); ``log_freq``: log
    timm's per-batch line at batch 0, every ``log_freq`` batches and the last (train.py: ``--log-interval``,
    validate.py: ``--log-freq``). Without the prefetcher, batches are moved to ``device`` (images in
    ``input_dtype``)."""
    model.eval()
    sums = torch.zeros(4 if present is None else 5, dtype=torch.float64)  # loss*n, top1*n, top5*n, n[, hits]
    num_batches = len(loader) if hasattr(loader, '__len__') else None
    batch_time_m = utils.AverageMeter()
    end = time.time()
    for batch_idx, (input, target) in enumerate(loader):
        if not prefetcher:
            input, target = input.to(device=device, dtype=input_dtype), target.to(device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        now = _batch_sums(model, input, target, autocast, present)
        sums += now
        batch_time_m.update(time.time() - end)
        end = time.time()
        last = num_batches is not None and batch_idx + 1 == num_batches
        if log_freq and (last or batch_idx % log_freq == 0) and ranks.is_primary:
            _log_eval_batch(f'Test{log_suffix}', batch_idx, num_batches, batch_time_m, now, sums)
    loss, top1, top5, count, *hits = read_sums(sums, ranks.distributed, device)
    n = max(count, 1.0)
    metrics = OrderedDict([('loss', loss / n), ('top1', top1 / n), ('top5', top5 / n)])
    if hits:
        metrics['top1_present'] = 100. * hits[0] / n
    if ranks.is_primary:
        _logger.info(f' * Acc@1 {metrics["top1"]:.3f} ({100 - metrics["top1"]:.3f}) Acc@5 {metrics["top5"]:.3f} '
                     f'({100 - metrics["top5"]:.3f}){log_suffix}')  # timm validate.py's closing line
    return metrics
