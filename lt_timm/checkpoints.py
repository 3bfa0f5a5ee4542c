"""A run folder's checkpoints, written so that a kill at any instruction leaves a folder that ``--resume`` completes
into exactly what the uninterrupted run writes.

Files, history and content as timm's ``CheckpointSaver``: ``last.pth.tar``; ``checkpoint-<epoch>.pth.tar``, the
``--checkpoint-hist`` best (ties keep the earlier epoch; epochs without a metric newest first); ``model_best.pth.tar``;
``recovery-<epoch>-<step>.pth.tar``. A checkpoint holds timm's keys (``timm.create_model(checkpoint_path=...)`` and
timm's resume read it), the history bookkeeping under ``saver`` in timm's own format, and whatever the caller adds
(the run's ``summary.csv`` rows).

The end of an epoch, in order (:meth:`EpochSaver.save`):

1. the state is written to ``tmp.pth.tar``; a write that fails (full disk, file-size limit, read-only folder)
   removes it and stops with one error: ``last.pth.tar`` is untouched;
2. ``os.replace(tmp.pth.tar, last.pth.tar)``: the epoch is committed, atomically;
3. the history: the worst ``checkpoint-N`` evicted, ``last`` linked as ``checkpoint-<epoch>``, and as
   ``model_best`` when it is the best. Each link is made under ``<name>.tmp`` and then ``os.replace``-d, so no
   name is ever missing or half-written (timm unlinks ``last`` and ``model_best`` before replacing them).

A kill between 2 and 3 leaves ``last.pth.tar`` ahead of the history: :meth:`EpochSaver.restore` (``--resume``) redoes
step 3 from what the checkpoint holds (the history before its epoch, its epoch and metric), which gives the files
the uninterrupted run has.
"""
import logging
import operator
import os
import shutil
from typing import Callable, List, Optional, Tuple

import torch

from .errors import UserError, os_error_message
from .run_dir import TMP_SUFFIX, resume_hint

__all__ = ['EpochSaver', 'write_checkpoint', 'link_atomic', 'LAST', 'BEST']

_logger = logging.getLogger('train')

LAST, BEST, TMP, EXT = 'last.pth.tar', 'model_best.pth.tar', 'tmp.pth.tar', '.pth.tar'


class _WriteErrors:
    """A file whose failed write is remembered: ``torch.save`` reports a full disk as a RuntimeError of its zip
    writer ('[enforce fail at inline_container.cc]'); the OSError under it says what happened."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_checkpoint(state: dict, path: str) -> None:
    """``torch.save(state, path)``; when it fails the partial file is removed and the ``OSError`` (with its errno)
    is raised."""
    recorder = None
    try:
        with open(path, 'wb') as f:
            recorder = _WriteErrors(f)
            torch.save(state, recorder)
    except (OSError, RuntimeError) as e:
        _remove(path)
        cause = e if isinstance(e, OSError) else getattr(recorder, 'error', None)
        if cause is None:
            raise
        raise cause from None


def link_atomic(src: str, dst: str) -> None:
    """``dst`` becomes the file ``src`` (a hard link, a copy where links are not supported), atomically: under
    ``dst.tmp`` first, then ``os.replace``."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    tmp = dst + TMP_SUFFIX
    _remove(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        _remove(tmp)
        raise


class EpochSaver:
    """The checkpoints of the run folder ``folder`` (see the module doc). ``state_fn(epoch, metric)`` returns a
    checkpoint's content in timm's format; ``decreasing``: a lower metric is better (``--eval-metric loss``)."""

    def __init__(self, folder: str, state_fn: Callable[[int, Optional[float]], dict], decreasing: bool = False,
                 max_history: int = 10):
        self.folder = folder
        self.state_fn = state_fn
        self.decreasing = decreasing
        self.cmp = operator.lt if decreasing else operator.gt
        self.max_history = max(1, max_history)
        self.history: List[Tuple[str, Optional[float]]] = []  # (file name, metric), best first
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.recovery_files: List[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def bookkeeping(self, epoch: Optional[int], metric: Optional[float]) -> dict:
        """The history as timm's ``CheckpointSaver.state_dict`` writes it: before ``epoch``, which is pending."""
        return {'checkpoint_files': list(self.history), 'best_epoch': self.best_epoch,
                'best_metric': self.best_metric, 'pending': (epoch, metric)}

    # ---------------------------------------------------------------- writing

    def write(self, path: str, epoch: int, metric: Optional[float], extra: Optional[dict], pending: bool) -> None:
        """The state of ``epoch`` to ``path``; a failed write is one UserError (the partial file removed)."""
        state = self.state_fn(epoch, metric)
        state.update(extra or {})
        state['saver'] = self.bookkeeping(epoch if pending else None, metric)
        try:
            write_checkpoint(state, path)
        except OSError as e:
            doing = f'cannot write the checkpoint of epoch {epoch} to {path}'
            reason = os_error_message(e, doing, in_run=True) or f'{doing} ({e}): fix that'
            raise UserError(f'{reason}, {resume_hint(self.folder, epoch)}; nothing of epoch {epoch} was saved.') \
                from None

    def save(self, epoch: int, metric: Optional[float], extra: Optional[dict] = None) \
            -> Tuple[Optional[float], Optional[int]]:
        """The end of ``epoch`` (steps 1-3 of the module doc); returns the best metric so far and its epoch."""
        self.write(self.path(TMP), epoch, metric, extra, pending=True)
        os.replace(self.path(TMP), self.path(LAST))
        try:
            self.keep(self.path(LAST), epoch, metric)
        except OSError as e:
            raise UserError(f'{os_error_message(e, in_run=True) or e}, then --resume {self.path(LAST)} (epoch {epoch} '
                            f'is saved there; resuming completes its checkpoint-N / model_best copies).') from None
        return self.best_metric, self.best_epoch

    def keep(self, source: str, epoch: int, metric: Optional[float]) -> None:
        """timm's history rule for the checkpoint ``source`` of ``epoch``: kept as ``checkpoint-<epoch>`` while the
        history has room or it beats the worst kept one (which is then removed); ``model_best`` when best."""
        worst = self.history[-1] if self.history else None
        if not (len(self.history) < self.max_history or worst[1] is None
                or (metric is not None and self.cmp(metric, worst[1]))):
            return
        if len(self.history) >= self.max_history:
            for name, _ in self.history[self.max_history - 1:]:
                _remove(self.path(name))
            self.history = self.history[:self.max_history - 1]
        name = f'checkpoint-{epoch}{EXT}'
        link_atomic(source, self.path(name))
        self.track(name, metric)
        if metric is not None and (self.best_metric is None or self.cmp(metric, self.best_metric)):
            self.best_epoch, self.best_metric = epoch, metric
            link_atomic(source, self.path(BEST))

    def track(self, name: str, metric: Optional[float]) -> None:
        """``name`` into the history: ranked checkpoints best first (stable: ties keep the earlier epoch), then those
        without a metric, newest first."""
        self.history.append((name, metric))
        ranked = sorted([c for c in self.history if c[1] is not None], key=lambda c: c[1],
                        reverse=not self.decreasing)
        unranked = [c for c in self.history if c[1] is None]
        if metric is None:
            unranked.insert(0, unranked.pop())
        self.history = ranked + unranked
        _logger.info('Current checkpoints:\n' + ''.join(f' {(self.path(n), m)}\n' for n, m in self.history))

    def save_recovery(self, epoch: int, batch_idx: int) -> None:
        """timm's recovery checkpoint ``recovery-<epoch>-<step>``: written as ``recovery_tmp`` then renamed; the
        newest two are kept."""
        tmp = self.path('recovery_tmp' + EXT)
        self.write(tmp, epoch, None, None, pending=False)
        path = self.path(f'recovery-{epoch}-{batch_idx}{EXT}')
        os.replace(tmp, path)
        self.recovery_files.append(path)
        for old in self.recovery_files[:-2]:
            _remove(old)
        self.recovery_files = self.recovery_files[-2:]

    # ---------------------------------------------------------------- resuming

    def restore(self, resumed: str, content: Optional[dict]) -> None:
        """A run resumed in this folder from ``resumed`` (``content``: its entries): the history as it was before the
        checkpoint's epoch, then that epoch's step 3 redone (idempotent), so a kill anywhere in an epoch's end
        leaves what the uninterrupted run has; ``last.pth.tar`` is the resumed state."""
        state = content.get('saver') if isinstance(content, dict) else None
        if not isinstance(state, dict):
            _logger.warning(f'No checkpoint history in {resumed}; ranked checkpoints start afresh.')
            return
        self.history = [(os.path.basename(f), m) for f, m in state.get('checkpoint_files', [])
                        if os.path.exists(self.path(os.path.basename(f)))]
        self.best_epoch, self.best_metric = state.get('best_epoch'), state.get('best_metric')
        epoch, metric = state.get('pending') or (None, None)
        if epoch is None:
            return
        link_atomic(resumed, self.path(LAST))
        self.keep(self.path(LAST), epoch, metric)
        best = self.path(f'checkpoint-{self.best_epoch}{EXT}')
        if self.best_epoch is not None and not os.path.exists(self.path(BEST)) and os.path.exists(best):
            link_atomic(best, self.path(BEST))  # the best one moved aside with later epochs: the earlier best again
        _logger.info(f'Restored checkpoint history ({len(self.history)} files), best metric {self.best_metric} '
                     f'(epoch {self.best_epoch}).')
