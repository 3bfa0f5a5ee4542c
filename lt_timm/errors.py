"""User-facing errors: one clear message, the fix included, no traceback wall.

Every script's ``main`` goes through :func:`exit_on_user_error`: a :class:`UserError` (and the ``ValueError`` /
``FileNotFoundError`` of lt-timm's own checks) prints one ``error: ...`` line and exits 2; an operating-system error
that the user can fix (read-only or full file system, file-size limit, permission, a file where a folder should be)
names the path and exits 2 too; Ctrl-C exits 130 and SIGTERM 143 (128 + the signal), each with one line. A
:class:`RunStopped` raised by a run that was stopped carries its own exit status and the command that resumes it.
"""
import errno
import os
import re
import signal
import sys
from contextlib import contextmanager
from functools import wraps

__all__ = ['UserError', 'RunStopped', 'Terminated', 'exit_on_user_error', 'sigterm_raises', 'os_error_message',
           'STOP_EXIT_CODES']

# exit status of a run stopped by a signal: 128 + the signal's number, as a shell reports it
STOP_EXIT_CODES = {'KeyboardInterrupt': 128 + signal.SIGINT, 'Terminated': 128 + signal.SIGTERM}

# operating-system errors the user can act on: the path and the fix, never a traceback. The fix for a new file or
# folder (another --output works), and for a file of a run in progress (which continues in its own folder).
# ``{flag}``: the option that names the path (--output, --results-file, ...).
_OS_FIXES = {
    errno.EROFS: ('the file system is read-only; pass a writable {flag}', 'make it writable again'),
    errno.EACCES: ('pass a folder you can write to ({flag}) or fix its permissions', 'fix its permissions'),
    errno.EPERM: ('pass a folder you can write to ({flag})', 'fix its permissions'),
    errno.ENOSPC: ('free space (df -h) or pass another {flag}', 'free space (df -h)'),
    errno.EDQUOT: ('free space or pass another {flag}', 'free space'),
    errno.EFBIG: ('raise the file-size limit (ulimit -f) or pass another {flag}',
                  'raise the file-size limit (ulimit -f)'),
    errno.ENOTDIR: ('a file is where a folder should be: move it or pass another {flag}',
                    'move the file that is where a folder should be'),
    errno.EEXIST: ('a file is where a folder should be: move it or pass another {flag}',
                   'move the file that is where a folder should be'),
    errno.EISDIR: ('a folder is where a file should be: move it or pass another {flag}',
                   'move the folder that is where a file should be'),
}


class UserError(Exception):
    """A problem with the user's input (flags, data, checkpoint) rather than a bug."""


class RunStopped(UserError):
    """A run that stopped before its end (a signal, a lost DDP process): the message says what happened and how to
    resume; ``exit_code`` is the script's exit status (2, or 128 + the signal)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises ``KeyboardInterrupt`` (see :func:`sigterm_raises`)."""


def _first_meaningful_line(exc: BaseException) -> str:
    # DataLoader workers re-raise with the worker traceback in the message; the last line is the error.
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r'^[\w.]+(Error|Exception): ', '', lines[-1])


def os_error_message(e: OSError, doing: str = '', in_run: bool = False, flag: str = '--output') -> str:
    """One sentence for an operating-system error the user can fix: what failed on which path and the fix ('' when
    ``e`` is not such an error); ``flag`` names the path's option. ``in_run``: a file of a run in progress, whose fix
    ends in resuming it (the caller adds how)."""
    fixes = _OS_FIXES.get(e.errno)
    if fixes is None:
        return ''
    path = e.filename if e.filename is not None else ''
    what = doing or (f'cannot write {path}' if path else 'a file operation failed')
    return f'{what} ({e.strerror or os.strerror(e.errno)}): {(fixes[1] if in_run else fixes[0]).format(flag=flag)}'


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_raises():
    """While the block runs (in the main thread), SIGTERM raises :class:`Terminated` instead of killing the process
    silently: ``finally`` blocks run (the run folder's lock is released) and the script says how to resume."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit(message: str, code: int) -> None:
    sys.stdout.flush()
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(code)


def _message(e: BaseException) -> str:
    """The one line of an error the door reports ('' for an operating-system error it leaves as a traceback)."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # only writing fails this way
            message = os_error_message(e)
            return message + '.' if message else ''
        if e.errno in _OS_FIXES:  # reading or writing: say what, where
            return f'{e.filename or "a file operation"}: {e.strerror}; check the path and its permissions.'
        return ''
    return _first_meaningful_line(e)


def exit_on_user_error(fn):
    """Decorate a CLI ``main``: user errors print ``error: ...`` and exit 2, Ctrl-C exits 130 and SIGTERM 143, each
    with one line (set LT_TIMM_DEBUG=1 for tracebacks)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with sigterm_raises():
                return fn(*args, **kwargs)
        except (UserError, ValueError, OSError) as e:
            if isinstance(e, RunStopped) and not str(e):
                sys.exit(e.exit_code)  # another process of the run says what happened
            message = _message(e)
            if os.environ.get('LT_TIMM_DEBUG') or not message:
                raise
            _exit(message, getattr(e, 'exit_code', 2))
        except (KeyboardInterrupt, Terminated) as e:
            if os.environ.get('LT_TIMM_DEBUG'):
                raise
            name = 'Ctrl-C (SIGINT)' if isinstance(e, KeyboardInterrupt) else 'SIGTERM'
            _exit(f'stopped by {name}; nothing was written.', STOP_EXIT_CODES[type(e).__name__])
    return wrapper
