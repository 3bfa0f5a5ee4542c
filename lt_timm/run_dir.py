"""The output folder of a training run: never overwrite a previous run, one writer at a time, consistent summary.

* :func:`claim_run_dir` gives a new run a folder of its own: ``<output>/<experiment>`` when it does not exist yet
  (created atomically), else ``<experiment>-1``, ``-2``, ... as timm's ``get_outdir(inc=True)``; a resumed run keeps
  writing to its own folder. A folder that cannot be made (read-only file system, a file in its place) is one
  :class:`~lt_timm.errors.UserError` naming the path.
* :class:`RunLock` (``<folder>/.lock`` with the pid) stops a second process from writing the same folder while the
  first is alive; a lock left by a killed run is taken over.
* :func:`update_summary` appends an epoch's row: timm's columns in timm's order, then lt-timm's own; rows always
  line up with the header (a resumed run that adds columns rewrites the file with the union of columns).
  :func:`write_summary` rewrites the file from rows (a resumed run: from the rows its checkpoint holds), atomically;
  :func:`read_summary_rows` reads one back, repairing a torn last row (a kill in the middle of an append).
* :func:`supersede_later_epochs`: a run resumed from an earlier checkpoint than its latest moves the later
  checkpoints aside (``superseded-<epoch>/``) and says so, instead of leaving them as if they belonged to the new
  epochs; :func:`remove_stale_tmp` removes the temporary files a kill left.
* :func:`resume_command` / :func:`resume_hint` / :func:`stopped_run`: how to go on after a stop (a signal, a lost
  DDP process: :func:`lost_a_process`).
"""
import csv
import logging
import os
import shlex
import sys
import time
from collections import OrderedDict
from typing import Callable, List, Mapping, Optional, Sequence

from .errors import STOP_EXIT_CODES, RunStopped, Terminated, UserError, os_error_message

__all__ = ['DEFAULT_OUTPUT', 'claim_run_dir', 'RunLock', 'truncate_summary', 'update_summary', 'summary_row',
           'append_summary', 'summary_text', 'write_summary', 'read_summary_rows', 'supersede_later_epochs',
           'remove_stale_tmp',
           'resume_hint', 'resume_command', 'lost_a_process', 'lost_process_reason', 'stopped_run', 'TMP_SUFFIX']

_logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = './output/train'  # timm's
TMP_SUFFIX = '.tmp'  # every file of a run folder is written under <name>.tmp, then os.replace'd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_BEING_WRITTEN = -1


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
                pid = self._holder() or self._pid_being_written()
                if pid == _BEING_WRITTEN:  # its maker has not written its pid yet: held, not stale
                    return 0
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

    def _holder(self) -> int:
        """The pid written in the lock file; 0 when it is empty, unreadable or gone."""
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _pid_being_written(self, seconds: float = 10.0) -> int:
        """For an empty lock: the pid its maker writes within 1 s (it made the file with ``O_EXCL`` and writes its pid
        next); :data:`_BEING_WRITTEN` when the lock is still empty and younger than ``seconds``; 0 when it is older
        (its maker died in between: stale) or gone."""
        for _ in range(20):
            try:
                if time.time() - os.path.getmtime(self.path) > seconds:
                    return 0
            except OSError:
                return 0
            time.sleep(0.05)
            pid = self._holder()
            if pid:
                return pid
        return _BEING_WRITTEN

    def acquire(self) -> None:
        pid = self.try_acquire()
        if pid is not None:
            who = f'pid {pid}' if pid else 'its pid not yet written'
            raise UserError(f'another run ({who}) is writing to {os.path.dirname(self.path)}; wait for it to '
                            f'finish (or stop it), then run this again.')

    def release(self) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def _folder_error(path: str, e: OSError) -> UserError:
    if os.path.exists(path) and not os.path.isdir(path):
        return UserError(f'{path} is a file, not a folder; the run folder cannot be made there: move the file or pass '
                         f'another --output / --experiment.')
    return UserError((os_error_message(e, f'cannot make the run folder {path}', flag='--output / --experiment') or
                      f'cannot make the run folder {path} ({e.strerror}): pass another --output') + '.')


def _try_folder(candidate: str) -> Optional[RunLock]:
    """The held lock of ``candidate`` when it is ours to write (new, or empty and unlocked), else None."""
    try:
        os.mkdir(candidate)
        fresh = True
    except FileExistsError:
        if not os.path.isdir(candidate):
            raise _folder_error(candidate, FileExistsError()) from None
        fresh = not os.listdir(candidate)  # an empty folder (made by hand): ours if nobody else locks it
    except OSError as e:
        raise _folder_error(candidate, e) from None
    if not fresh:
        return None
    lock = RunLock(candidate)
    try:
        return lock if lock.try_acquire() is None else None
    except OSError as e:
        raise _folder_error(candidate, e) from None


def claim_run_dir(output: str, experiment: str, resume: str = '', folder: str = '') -> RunLock:
    """Create or reuse the run folder (see module doc) and return its held lock (``lock.path``'s folder is the run).

    ``folder``: the run folder a resumed run continues in; ``resume``: a checkpoint whose folder is
    ``<output>/<experiment>`` continues there too (``train_detection.py``)."""
    base = os.path.join(output, experiment)
    if not folder and resume and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(base):
        folder = base
    if folder:
        lock = RunLock(folder)
        try:
            lock.acquire()
        except OSError as e:
            raise UserError((os_error_message(e, f'cannot write to the run folder {folder}', in_run=True)
                             or f'cannot write to the run folder {folder} ({e.strerror})') + ', then resume again.') \
                from None
        return lock
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise _folder_error(output, e) from None
    candidate, i = base, 0
    while True:
        lock = _try_folder(candidate)
        if lock is not None:
            break
        i += 1
        candidate = f'{base}-{i}'
    if candidate != base:
        _logger.warning(f'{base} holds another run; this run writes to {candidate} (to continue that run, pass '
                        f'--resume {os.path.join(base, "last.pth.tar")}).')
    return lock


# ---------------------------------------------------------------- summary.csv

def summary_row(epoch: int, train_metrics: Mapping[str, float], eval_metrics: Optional[Mapping[str, float]],
                lr: Optional[float] = None, extra: Optional[Mapping[str, float]] = None) -> 'OrderedDict[str, object]':
    """One epoch's row: first exactly the columns ``timm.utils.update_summary`` writes, in its order (``epoch``,
    ``train_<k>``, ``eval_<k>``, ``lr``), then ``extra``'s columns (lt-timm's own, keys used as they are); values as
    plain Python numbers (the row is also kept in every checkpoint)."""
    row = OrderedDict(epoch=int(epoch))
    row.update((f'train_{k}', v) for k, v in train_metrics.items())
    row.update((f'eval_{k}', v) for k, v in (eval_metrics or {}).items())
    if lr is not None:
        row['lr'] = lr
    row.update(extra or {})
    return OrderedDict((k, v if isinstance(v, (int, float, str)) else float(v)) for k, v in row.items())


def append_summary(filename: str, row: Mapping[str, object]) -> None:
    """Append ``row`` to ``summary.csv`` (a header when the file is new or empty). When the row has columns the
    file's header lacks (a run resumed with other options), the file is rewritten once with the union of columns,
    each value kept under its name; a row lacking some of the header's columns leaves them empty."""
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


def update_summary(epoch: int, train_metrics: Mapping[str, float], eval_metrics: Optional[Mapping[str, float]],
                   filename: str, lr: Optional[float] = None, extra: Optional[Mapping[str, float]] = None,
                   log_wandb: bool = False) -> None:
    """:func:`summary_row` appended to ``filename`` (:func:`append_summary`); with ``log_wandb`` the row goes to
    wandb as in timm."""
    row = summary_row(epoch, train_metrics, eval_metrics, lr, extra)
    if log_wandb:
        import wandb
        wandb.log(row)
    append_summary(filename, row)


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
    tmp = f'{path}{TMP_SUFFIX}'
    with open(tmp, 'w', newline='') as f:
        csv.writer(f).writerows(rows)
    os.replace(tmp, path)


def summary_text(rows: Sequence[Mapping[str, object]]) -> str:
    """The text of a ``summary.csv`` holding ``rows`` (columns: their union, in the order they first appear)."""
    import io
    header: List[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    buf = io.StringIO(newline='')
    writer = csv.DictWriter(buf, fieldnames=header, restval='')
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue() if rows else ''


def write_summary(path: str, rows: Sequence[Mapping[str, object]], keep_dir: Optional[str] = None) -> None:
    """``summary.csv`` rewritten atomically to hold exactly ``rows`` (a resumed run: the rows its checkpoint
    holds). A file whose content was not the beginning of that (later epochs, an edit, damage other than a kill
    during an append) is kept, with a warning, in ``keep_dir`` or as ``summary.csv.before-resume``: nothing is
    lost."""
    text = summary_text(rows)
    old = None
    if os.path.isfile(path):
        with open(path, newline='') as f:
            old = f.read()
    if old == text:
        return
    if old and not text.startswith(old):
        keep = os.path.join(keep_dir, os.path.basename(path)) if keep_dir else f'{path}.before-resume'
        os.replace(path, keep)
        _logger.warning(f'{path} did not match the rows the checkpoint holds; it is rewritten from them (the old '
                        f'file is kept as {keep}).')
    tmp = f'{path}{TMP_SUFFIX}'
    with open(tmp, 'w', newline='') as f:
        f.write(text)
    os.replace(tmp, path)


def read_summary_rows(path: str) -> List['OrderedDict[str, str]']:
    """The rows of ``summary.csv`` (text values); a torn last row (no line end: a kill in the middle of an append) is
    dropped with a warning; a row whose epoch is not a number is refused, naming the file and the line."""
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        text = f.read()
    if text and not text.endswith('\n'):
        _logger.warning(f'{path}: the last row was cut off (a run killed while writing it); it is dropped.')
        text = text[:text.rfind('\n') + 1]
    lines = list(csv.reader(text.splitlines()))
    if not lines:
        return []
    header, rows = lines[0], []
    for number, values in enumerate(lines[1:], start=2):
        if not values:
            continue
        try:
            int(float(values[0]))
        except ValueError:
            raise UserError(f'{path} line {number} is not a summary row ({",".join(values)[:60]!r}); delete that '
                            f'line, then run again.') from None
        rows.append(OrderedDict(zip(header, values)))
    return rows


def truncate_summary(path: str, start_epoch: int) -> None:
    """Keep only the rows of epochs before ``start_epoch`` (a torn last row repaired; rewritten atomically)."""
    rows = read_summary_rows(path)
    if rows or os.path.isfile(path):
        write_summary(path, [r for r in rows if int(float(r['epoch'])) < start_epoch])


# ---------------------------------------------------------------- a resumed run folder

def remove_stale_tmp(folder: str) -> List[str]:
    """Remove what a killed run left half-done: ``tmp.pth.tar``, ``recovery_tmp.pth.tar`` and ``*.tmp`` files."""
    removed = []
    for name in sorted(os.listdir(folder)):
        if name in ('tmp.pth.tar', 'recovery_tmp.pth.tar') or name.endswith(TMP_SUFFIX):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    if removed:
        _logger.info(f'Removed what a stopped run left unfinished in {folder}: {", ".join(removed)}.')
    return removed


def _later_files(folder: str, epoch: int, epoch_of: Callable[[str], Optional[int]]) -> List[str]:
    later = []
    for name in sorted(os.listdir(folder)):
        parts = name[:-len('.pth.tar')].split('-') if name.endswith('.pth.tar') else []
        if parts and parts[0] in ('checkpoint', 'recovery') and len(parts) > 1 and parts[1].isdigit():
            file_epoch: Optional[int] = int(parts[1])
        elif name in ('last.pth.tar', 'model_best.pth.tar'):
            file_epoch = epoch_of(os.path.join(folder, name))
        else:
            continue
        if file_epoch is not None and file_epoch > epoch:
            later.append(name)
    return later


def supersede_later_epochs(folder: str, epoch: int, epoch_of: Callable[[str], Optional[int]]) -> Optional[str]:
    """A run resumed from the end of ``epoch`` in ``folder``: the checkpoints of later epochs (``epoch_of`` reads a
    checkpoint's epoch) move to ``<folder>/superseded-<epoch + 1>[-N]`` with a warning (their summary rows are kept
    by :func:`write_summary`); returns that folder, or None when no checkpoint is later."""
    later = _later_files(folder, epoch, epoch_of)
    if not later:
        return None
    target, i = os.path.join(folder, f'superseded-{epoch + 1}'), 0
    while os.path.exists(target):
        i += 1
        target = os.path.join(folder, f'superseded-{epoch + 1}-{i}')
    os.mkdir(target)
    for name in later:
        os.replace(os.path.join(folder, name), os.path.join(target, name))
    _logger.warning(f'{folder} holds epochs after {epoch}, the epoch this run resumes from: they are not this run\'s '
                    f'continuation, so {", ".join(later)} moved to {target}.')
    return target


# ---------------------------------------------------------------- how to go on

def resume_command(checkpoint: str, argv: Optional[Sequence[str]] = None, module: str = '') -> str:
    """The command that resumes this run from ``checkpoint``: this process's command line (``torchrun`` with the
    number of processes under torchrun) with ``--resume checkpoint`` in place of any ``--resume``. ``module``: the
    run was started as ``python -m module ARGV`` (``torchrun ... -m module ARGV``), ``argv`` being all of ARGV."""
    argv = list(sys.argv if argv is None else argv)
    program = ['-m', module] if module else [os.path.relpath(argv[0]) if argv else 'train.py']
    args, skip = [], False
    for a in (argv if module else argv[1:]):
        if skip:
            skip = False
        elif a == '--resume':
            skip = True
        elif not a.startswith('--resume='):
            args.append(a)
    procs = os.environ.get('LOCAL_WORLD_SIZE') if os.environ.get('TORCHELASTIC_RUN_ID') else None
    head = ['torchrun', '--nproc_per_node', procs] if procs else ['python']
    return shlex.join(head + program + args + ['--resume', checkpoint])


def resume_hint(output_dir: Optional[str], epoch: int) -> str:
    """How to go on after epoch ``epoch`` failed: resume from the run's last good checkpoint, or start again."""
    last = os.path.join(output_dir, 'last.pth.tar') if output_dir else None
    if last and os.path.exists(last):
        return f'then --resume {last} (the last good state, end of epoch {epoch - 1})'
    return 'then start again (no checkpoint was saved yet)'


# What gloo / NCCL / torch's store say when a peer process is gone; not setup errors ('only supported with GPUs',
# an address in use), which name their own problem.
_LOST = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'Connection refused',
         'ncclRemoteError', 'NCCL communicator was aborted')


def lost_a_process(e: BaseException) -> bool:
    """A collective that failed because another process of the DDP group is gone: a ``RuntimeError`` (torch's
    ``Dist*Error`` included) with one of gloo's / NCCL's connection-loss messages."""
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _LOST)


def lost_process_reason(e: BaseException) -> str:
    """Why a collective failed (:func:`lost_a_process`), in a few words: gloo's connection error, else the first
    line of the error."""
    text = str(e)
    known = [s for s in _LOST if s in text]
    return known[0] if known else (text.strip().splitlines() or [type(e).__name__])[0][:120]


def stopped_run(e: BaseException, epoch: Optional[int], last: str, rank: int = 0, distributed: bool = False) \
        -> RunStopped:
    """The one line for a run stopped by Ctrl-C (exit 130), SIGTERM (143) or a lost DDP process (2): what stopped it,
    in which epoch, and on process 0 the command that resumes it from ``last`` (its last checkpoint, '' if none).
    Ctrl-C reaches every process of a DDP run: only process 0 says it (the others exit quietly)."""
    if isinstance(e, (KeyboardInterrupt, Terminated)):
        code = STOP_EXIT_CODES[type(e).__name__]
        what = 'stopped by Ctrl-C (SIGINT)' if isinstance(e, KeyboardInterrupt) else 'stopped by SIGTERM'
        if distributed and isinstance(e, Terminated):
            what += f' (process {rank}; torchrun sends it to every process when one of them fails, see its report)'
        elif rank != 0:
            return RunStopped('', code)
    else:
        code, what = 2, f'process {rank} of this DDP run lost another process ({lost_process_reason(e)})'
    where = f' in epoch {epoch}' if epoch is not None else ''
    if rank != 0:
        how = 'to continue, pass --resume <run folder>/last.pth.tar (process 0 names the run folder in its log)'
    elif last and os.path.exists(last):
        how = f'the run folder is unlocked and {last} holds the last saved epoch; to continue: {resume_command(last)}'
    else:
        how = 'no checkpoint was saved yet: start again'
    return RunStopped(f'{what}{where}; {how}', code)
