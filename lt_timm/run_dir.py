"""The output folder of a training run: never overwrite a previous run, one writer at a time, consistent summary.

* :func:`claim_run_dir` gives a new run a folder of its own: ``<output>/<experiment>`` when it does not exist yet
  (created atomically), else ``<experiment>-1``, ``-2``, ... as timm's ``get_outdir(inc=True)``; a run resumed from
  ``<folder>/last.pth.tar`` keeps writing to ``<folder>``.
* :class:`RunLock` (``<folder>/.lock`` with the pid) stops a second process from writing the same folder while the
  first is alive; a lock left by a killed run is taken over.
* :func:`update_summary` appends an epoch's row: timm's columns in timm's order, then lt-timm's own; rows always
  line up with the header (a resumed run that adds columns rewrites the file with the union of columns).
* :func:`truncate_summary` drops ``summary.csv`` rows at or after the epoch a resumed run restarts from, so rows
  and checkpoints agree after a crash at any point of an epoch's end.
"""
import csv
import logging
import os
from collections import OrderedDict
from typing import Mapping, Optional

from .errors import UserError

__all__ = ['claim_run_dir', 'RunLock', 'truncate_summary', 'resume_hint']

_logger = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive, pid-stamped lock file in a run folder."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, '.lock')
        self.held = False

    def try_acquire(self) -> Optional[int]:
        """Take the lock; returns ``None`` on success, else the pid of the live process that holds it."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        pid = int(f.read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    return pid
                _logger.warning(f'taking over the lock {self.path} left by a process that is gone (pid {pid}).')
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(str(os.getpid()))
            self.held = True
            return None
        return 0

    def acquire(self) -> None:
        pid = self.try_acquire()
        if pid is not None:
            raise UserError(f'another run (pid {pid}) is writing to {os.path.dirname(self.path)}; wait for it to '
                            f'finish or pick another --experiment.')

    def release(self) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def claim_run_dir(output: str, experiment: str, resume: str = '') -> RunLock:
    """Create or reuse the run folder (see module doc) and return its held lock (``lock.path``'s folder is the run)."""
    base = os.path.join(output, experiment)
    if resume and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(base):
        lock = RunLock(base)
        lock.acquire()
        return lock
    os.makedirs(output, exist_ok=True)
    candidate, i = base, 0
    while True:
        try:
            os.mkdir(candidate)
            fresh = True
        except FileExistsError:
            fresh = not os.listdir(candidate)  # an empty folder (made by hand): ours if nobody else locks it
        if fresh:
            lock = RunLock(candidate)
            if lock.try_acquire() is None:
                break
        i += 1
        candidate = f'{base}-{i}'
    if candidate != base:
        _logger.warning(f'{base} holds another run; this run writes to {candidate} (to continue that run, pass '
                        f'--resume {os.path.join(base, "last.pth.tar")}).')
    return lock


def truncate_summary(path: str, start_epoch: int) -> None:
    """Keep only the rows of epochs before ``start_epoch`` (rewritten atomically)."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) < start_epoch]
    if len(kept) < len(rows):
        _replace_csv(path, kept)


def update_summary(epoch: int, train_metrics: Mapping[str, float], eval_metrics: Optional[Mapping[str, float]],
                   filename: str, lr: Optional[float] = None, extra: Optional[Mapping[str, float]] = None,
                   log_wandb: bool = False) -> None:
    """Append one epoch's row to ``summary.csv``: first exactly the columns ``timm.utils.update_summary`` writes,
    in its order (``epoch``, ``train_<k>``, ``eval_<k>``, ``lr``), then ``extra``'s columns (lt-timm's own, keys
    used as they are). A header is written when the file is new or empty; with ``log_wandb`` the row goes to wandb
    as in timm. When the row has columns the file's header lacks (a run resumed with other options), the file is
    rewritten once with the union of columns, each value kept under its name; a row lacking some of the header's
    columns leaves them empty."""
    row = OrderedDict(epoch=epoch)
    row.update((f'train_{k}', v) for k, v in train_metrics.items())
    row.update((f'eval_{k}', v) for k, v in (eval_metrics or {}).items())
    if lr is not None:
        row['lr'] = lr
    row.update(extra or {})
    if log_wandb:
        import wandb
        wandb.log(row)
    header = _summary_header(filename)
    added = [k for k in row if k not in header]
    if header and added:  # e.g. resumed with --model-ema, or a file of an older lt-timm: no shifted rows
        header = header + added
        _rewrite_summary(filename, header)
    with open(filename, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=header or list(row), restval='')
        if not header:
            writer.writeheader()
        writer.writerow(row)


def _summary_header(filename: str) -> list:
    """The column names of an existing ``summary.csv`` ([] when it is missing or empty)."""
    if not os.path.isfile(filename):
        return []
    with open(filename, newline='') as f:
        return next(csv.reader(f), [])


def _rewrite_summary(filename: str, header: list) -> None:
    """Rewrite ``summary.csv`` (atomically) with the columns ``header``, keeping each value under its name."""
    with open(filename, newline='') as f:
        rows = list(csv.DictReader(f))
    _replace_csv(filename, [header] + [[r.get(k) or '' for k in header] for r in rows])


def _replace_csv(path: str, rows: list) -> None:
    """Write ``rows`` (lists, the header first) to ``path`` atomically: a tmp file, then ``os.replace``."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', newline='') as f:
        csv.writer(f).writerows(rows)
    os.replace(tmp, path)


def resume_hint(output_dir: Optional[str], epoch: int) -> str:
    """How to go on after epoch ``epoch`` failed: resume from the run's last good checkpoint, or start again."""
    last = os.path.join(output_dir, 'last.pth.tar') if output_dir else None
    if last and os.path.exists(last):
        return f'then --resume {last} (the last good state, end of epoch {epoch - 1})'
    return 'then start again (no checkpoint was saved yet)'
