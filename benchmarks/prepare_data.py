"""Prepare the small CPU benchmark datasets (idempotent).

1. ``--src`` (Imagenette ImageFolder with train/ and val/) -> ``--dst`` with every image resized so its
   shorter side is ``--size`` px (PIL, bicubic, JPEG q=90).
2. A hyper-parameter split carved out of the *train* split only: ``--sweep-dst``/{train,val}, holding out
   ``--sweep-frac`` of each class's training images (seeded). The real val split is never used for sweeps.
3. Optional: a class-balanced subset of CIFAR-10 (JPEG copy): ``--cifar-src`` (train/, test/) ->
   ``--cifar-subset-dst`` with every ``--cifar-every``-th training image of each class (sorted file names) and the
   whole test split, as symlinks. The CPU budget of ``benchmarks/reproduce_cifar.py``.
4. Optional: MNIST-5k exported through ``lt_timm.datasets.export_mnist5k`` to ``--mnist-dst``.

    python benchmarks/prepare_data.py --src /tmp/datasets/imagenette --dst /tmp/datasets/imagenette64 \
        --sweep-dst /tmp/datasets/imagenette64_sweep --mnist-dst /tmp/datasets/mnist5k
"""
import argparse
import os
import random
import sys
import time
from pathlib import Path

EXTS = ('.jpg', '.jpeg', '.png', '.JPEG')


def resize_tree(src: Path, dst: Path, size: int) -> int:
    from PIL import Image
    done = dst / '.complete'
    if done.exists():
        print(f'[prepare] {dst} already complete')
        return 0
    n, t0 = 0, time.time()
    for split in ('train', 'val'):
        for cls in sorted(os.listdir(src / split)):
            if not (src / split / cls).is_dir():
                continue
            out = dst / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(src / split / cls)):
                if not name.endswith(EXTS):
                    continue
                target = out / (os.path.splitext(name)[0] + '.jpg')
                if target.exists():
                    n += 1
                    continue
                with Image.open(src / split / cls / name) as im:
                    im = im.convert('RGB')
                    w, h = im.size
                    s = size / min(w, h)
                    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
                    im.save(target, quality=90)
                n += 1
                if n % 2000 == 0:
                    print(f'[prepare] {n} images resized ({time.time() - t0:.0f}s)', flush=True)
    done.write_text(f'{n} images, shorter side {size}px, from {src}\n')
    print(f'[prepare] {dst}: {n} images in {time.time() - t0:.0f}s')
    return n


def carve(src: Path, dst: Path, frac: float, seed: int) -> None:
    done = dst / '.complete'
    if done.exists():
        print(f'[prepare] {dst} already complete')
        return
    rng = random.Random(seed)
    counts = {'train': 0, 'val': 0}
    for cls in sorted(os.listdir(src / 'train')):
        files = sorted(os.listdir(src / 'train' / cls))
        rng.shuffle(files)
        n_val = max(1, round(len(files) * frac))
        for split, chunk in (('val', files[:n_val]), ('train', files[n_val:])):
            out = dst / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for f in chunk:
                link = out / f
                if not link.exists():
                    os.symlink(os.path.abspath(src / 'train' / cls / f), link)
            counts[split] += len(chunk)
    done.write_text(f'carved from {src}/train: {counts}, frac={frac}, seed={seed}\n')
    print(f'[prepare] {dst}: {counts}')


def cifar_subset(src: Path, dst: Path, every: int) -> None:
    done = dst / '.complete'
    if done.exists():
        print(f'[prepare] {dst} already complete')
        return
    counts = {'train': 0, 'test': 0}
    for split, step in (('train', every), ('test', 1)):
        for cls in sorted(os.listdir(src / split)):
            out = dst / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(os.listdir(src / split / cls))[::step]:
                link = out / f
                if not link.exists():
                    os.symlink(os.path.abspath(src / split / cls / f), link)
                counts[split] += 1
    done.write_text(f'every {every}th train image per class, all test images, from {src}: {counts}\n')
    print(f'[prepare] {dst}: {counts}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', default='/tmp/datasets/imagenette', help='Imagenette ImageFolder root (train/, val/)')
    p.add_argument('--dst', default='/tmp/datasets/imagenette64', help='downscaled copy')
    p.add_argument('--size', type=int, default=64, help='shorter side in px (default 64)')
    p.add_argument('--sweep-dst', default='/tmp/datasets/imagenette64_sweep', help='carved sweep split ("" to skip)')
    p.add_argument('--sweep-frac', type=float, default=0.1, help='fraction of each train class held out (default 0.1)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--cifar-src', default='', help='CIFAR-10 JPEG ImageFolder root (train/, test/)')
    p.add_argument('--cifar-subset-dst', default='/tmp/datasets/cifar10_sub10k', help='subset of --cifar-src')
    p.add_argument('--cifar-every', type=int, default=5, help='keep every n-th train image per class (default 5)')
    p.add_argument('--mnist-dst', default='', help='also export MNIST-5k here (e.g. /tmp/datasets/mnist5k)')
    a = p.parse_args(argv)
    if a.src and os.path.isdir(a.src):
        resize_tree(Path(a.src), Path(a.dst), a.size)
        if a.sweep_dst:
            carve(Path(a.dst), Path(a.sweep_dst), a.sweep_frac, a.seed)
    else:
        print(f'[prepare] {a.src} not found: skipping Imagenette', file=sys.stderr)
    if a.cifar_src:
        cifar_subset(Path(a.cifar_src), Path(a.cifar_subset_dst), a.cifar_every)
    if a.mnist_dst:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from lt_timm.datasets import export_mnist5k
        print(f'[prepare] MNIST-5k at {export_mnist5k(a.mnist_dst)}')


if __name__ == '__main__':
    main()
