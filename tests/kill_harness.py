"""Test helper (not part of lt-timm): a fork server that runs the repository's real CLI ``main`` in child processes
and stops them the way users and machines do, at chosen moments.

    python tests/kill_harness.py        # then one JSON command per line on stdin, one JSON reply per line on stdout

It imports torch, timm and the scripts once; every command forks a child that runs the script's ``main`` with the
given argv (stdout/stderr to files) and replies ``{"code": exit status or null, "signal": signal or null}``.
A command may ask the child to:

* ``fault``: ``{"watch": folder, "kill_at": k, "torn": bool, "trace": file}`` — count the file operations on paths
  under ``watch`` (``open`` for writing, ``os.open`` with ``O_CREAT``, ``os.replace/rename/link/remove/unlink/mkdir``,
  ``shutil.copyfile``), append each to ``trace`` as a JSON line, and at operation ``k`` send itself SIGKILL: before
  the operation, or (``torn``, for an ``open`` for writing) after writing the first half of the first ``write`` through
  that file — a write cut off by the kill. ``kill_at`` -1: never.
* ``signal``: ``{"name": "SIGINT"|"SIGTERM", "when_exists": path}`` — the child gets the signal once ``path``
  exists (e.g. the run's ``last.pth.tar``); or ``"when_logged": text`` — once the child's stderr holds ``text``. It
  arrives where a user's Ctrl-C mostly does, in the data pipeline: the child sends it to itself as it opens the first
  image file after the condition holds (a parent polling for the condition raced a tiny run's end on a busy CPU).
* ``rlimit_fsize``: bytes — ``RLIMIT_FSIZE`` of the child (a full disk for files larger than that).
* ``user``: uid — the child drops root to that user and group first (a read-only folder by ``chmod``).

Nothing here is in lt-timm: the product has no test hooks; the faults are the child process's own, made by wrapping
functions of ``os``, ``shutil`` and ``builtins`` in the child after the fork.
"""
import builtins
import importlib.util
import json
import os
import resource
import shutil
import signal
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402,F401  (imported once, before the forks)
import timm  # noqa: E402,F401

_MAINS = {}


def script_main(script: str):
    if script not in _MAINS:
        spec = importlib.util.spec_from_file_location(f'_harness_{Path(script).stem}', REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MAINS[script] = module.main
    return _MAINS[script]


class Faults:
    """The child's file operations under ``watch``, counted and traced; SIGKILL at operation ``kill_at``."""

    def __init__(self, watch: str, kill_at: int, torn: bool, trace: str):
        self.watch = os.path.abspath(watch)
        self.kill_at, self.torn = kill_at, torn
        self.count = 0
        self.trace_fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def watched(self, path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(self.watch)
        except TypeError:
            return False

    def hit(self, op: str, path) -> bool:
        """Count one operation; True when it is the one to cut off with a torn write."""
        if not self.watched(path):
            return False
        index = self.count
        self.count += 1
        os.write(self.trace_fd, (json.dumps({'i': index, 'op': op, 'path': os.path.basename(os.fspath(path))})
                                 + '\n').encode())
        if index != self.kill_at:
            return False
        if self.torn and op == 'open':
            return True
        os.kill(os.getpid(), signal.SIGKILL)
        return False


class TornFile:
    """A file whose first write is cut off in the middle by SIGKILL."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        half = max(1, len(data) // 2)
        self.f.write(data[:half])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def install(faults: Faults) -> None:
    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode='r', *args, **kwargs):
        writing = any(c in mode for c in 'wax+')
        torn = writing and faults.hit('open', file)
        f = real_open(file, mode, *args, **kwargs)
        return TornFile(f) if torn else f

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            faults.hit('os.open', path)
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open, os.open = open_, os_open
    for module, name, arg in ((os, 'replace', 1), (os, 'rename', 1), (os, 'link', 1), (os, 'remove', 0),
                              (os, 'unlink', 0), (os, 'mkdir', 0), (shutil, 'copyfile', 1)):
        real = getattr(module, name)

        def wrapped(*args, _real=real, _name=f'{module.__name__}.{name}', _arg=arg, **kwargs):
            faults.hit(_name, args[_arg] if len(args) > _arg else '')
            return _real(*args, **kwargs)
        setattr(module, name, wrapped)


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def signal_at_next_image(sig: dict, err: str) -> None:
    """The child sends itself ``sig['name']`` once, as it opens the first image file after ``_ready(sig)``."""
    real_open, sent = builtins.open, []

    def open_(file, mode='r', *args, **kwargs):
        image = isinstance(file, (str, os.PathLike)) and os.fspath(file).lower().endswith(IMAGE_SUFFIXES)
        if image and not sent:
            sys.stderr.flush()  # for when_logged: the child's own log lines, in the file
            if _ready(sig, err):
                sent.append(True)
                os.kill(os.getpid(), getattr(signal, sig['name']))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_


def child(cmd: dict) -> None:
    """The forked child: redirect output, set up the faults, run the script's main, exit with its status."""
    code = 1
    try:
        for fd, path in ((1, cmd['out']), (2, cmd['err'])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        if cmd.get('user') is not None:
            os.setgid(cmd['user'])
            os.setuid(cmd['user'])
        if cmd.get('rlimit_fsize'):
            resource.setrlimit(resource.RLIMIT_FSIZE, (cmd['rlimit_fsize'], resource.RLIM_INFINITY))
        if cmd.get('fault'):
            install(Faults(**cmd['fault']))
        if cmd.get('signal'):
            # Ctrl-C as a terminal delivers it: a shell's background job (CI runners, `cmd &`) inherits SIGINT ignored,
            # and Python then installs no KeyboardInterrupt handler.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal_at_next_image(cmd['signal'], cmd['err'])
        sys.argv = [str(REPO / cmd.get('script', 'train.py'))] + cmd['argv']
        os.chdir(REPO)
        main = script_main(cmd.get('script', 'train.py'))
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(cmd: dict) -> dict:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(cmd)
    _, status = os.waitpid(pid, 0)
    return _reply(status)


def _ready(sig: dict, err: str) -> bool:
    if 'when_exists' in sig:
        return os.path.exists(sig['when_exists'])
    try:
        with open(err) as f:
            return sig['when_logged'] in f.read()
    except FileNotFoundError:
        return False


def _reply(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {'code': None, 'signal': os.WTERMSIG(status)}
    return {'code': os.WEXITSTATUS(status), 'signal': None}


def serve() -> None:
    script_main('train.py')  # import the scripts once, before the forks
    script_main('validate.py')
    script_main('train_detection.py')
    import lt_timm.detection.train  # noqa: F401  (imported by train_detection's main when it runs)
    import lt_timm.detection.consistency  # noqa: F401
    import lt_timm.detection.data  # noqa: F401
    import lt_timm.detection.evaluate  # noqa: F401
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == '__main__':
    serve()
