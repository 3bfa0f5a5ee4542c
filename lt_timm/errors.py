"""User-facing errors: one clear message, the fix included, no traceback wall."""
import os
import re
import sys
from functools import wraps

__all__ = ['UserError', 'exit_on_user_error']


class UserError(Exception):
    """A problem with the user's input (flags, data, checkpoint) rather than a bug."""


def _first_meaningful_line(exc: BaseException) -> str:
    # DataLoader workers re-raise with the worker traceback in the message; the last line is the error.
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r'^[\w.]+(Error|Exception): ', '', lines[-1])


def exit_on_user_error(fn):
    """Decorate a CLI ``main``: user errors print ``error: ...`` and exit 2 (set LT_TIMM_DEBUG=1 for tracebacks)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, FileNotFoundError) as e:
            if os.environ.get('LT_TIMM_DEBUG'):
                raise
            sys.stdout.flush()
            print(f'error: {_first_meaningful_line(e)}', file=sys.stderr, flush=True)
            sys.exit(2)
    return wrapper
