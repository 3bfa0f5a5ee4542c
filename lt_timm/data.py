"""Datasets through timm, with one class map per run and images that are checked, converted and named on failure.

* **Strict images.** :class:`StrictImageDataset` reads an ImageFolder sample as timm's ``ImageDataset`` does, but an
  unreadable, truncated or unconvertible image stops the run with its path (timm skips it with a warning) and images
  are converted to ``input_img_mode`` (RGB for 3-channel models, as timm's train.py).
* **Up-front check.** :func:`check_images` opens every file before the first step, in parallel: ``header`` (default)
  parses each header and, for JPEG and PNG, checks that the file is complete (JPEG end marker, PNG chunk CRCs);
  ``decode`` decodes and converts every image (catches everything, costs one decode per image); ``none`` skips it.
* **One class map.** The training split's ``class_to_idx`` defines the labels; :func:`load_folder_dataset` with
  ``class_map=<that dict>`` maps another split onto it (a split missing some classes is fine) and refuses a split with
  classes the training split does not have, by name. The map is saved with the run and used by ``validate.py``.
* **Splits that exist.** A split folder that is not there is an error naming the folders that are (timm reads the
  whole data root instead, so a mistyped ``--val-split`` would train on the validation images); ``validate.py`` still
  reads a root whose sub-folders are class folders (``--data-dir imagenet/val``) as timm does.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from PIL import Image
from timm.data import ImageDataset, create_dataset

from .errors import UserError

__all__ = ['load_folder_dataset', 'StrictImageDataset', 'check_images', 'class_to_idx_of', 'write_class_map',
           'read_class_map', 'find_split_folder', 'IMAGE_CHECKS']

_logger = logging.getLogger(__name__)

IMAGE_CHECKS = ('header', 'decode', 'none')
CLASS_MAP_FILE = 'class_map.txt'
# timm's split synonyms (timm.data.dataset_factory): a split named by one of them finds a folder named by another
_SPLIT_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def _unreadable(path: str, e: BaseException) -> UserError:
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return UserError(f'cannot read image {path} ({reason}); delete or replace the file, or fix its format.')


def open_image(path: str, mode: Optional[str]) -> Image.Image:
    """Open and (with ``mode``) decode + convert one image; any failure names the file."""
    try:
        img = Image.open(path)
        return img.convert(mode) if mode else img
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files
        raise _unreadable(path, e) from None


class StrictImageDataset(ImageDataset):
    """timm's folder ``ImageDataset`` that fails on a bad image with its path instead of skipping it."""

    def __init__(self, dataset: ImageDataset):
        super().__init__(dataset.reader.root, reader=dataset.reader, load_bytes=dataset.load_bytes,
                         input_img_mode=dataset.input_img_mode, transform=dataset.transform,
                         target_transform=dataset.target_transform)

    def __getitem__(self, index):
        path, target = self.reader.samples[index]
        img = open_image(path, self.input_img_mode)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def _check_one(path: str, mode: str, img_mode: Optional[str]) -> Optional[str]:
    try:
        if mode == 'decode':
            open_image(path, img_mode or 'RGB')
            return None
        with Image.open(path) as img:  # parses the header
            fmt = img.format
            if fmt != 'JPEG':
                img.verify()  # PNG: every chunk's CRC; JPEG has no such check, its end marker is tested below
        if fmt == 'JPEG':
            with open(path, 'rb') as f:
                f.seek(-2, os.SEEK_END)
                if f.read(2) != b'\xff\xd9':
                    return f'cannot read image {path} (truncated JPEG: no end marker); delete or replace the file.'
        return None
    except UserError as e:
        return str(e)
    except Exception as e:
        return str(_unreadable(path, e))


def check_images(paths: List[str], mode: str = 'header', img_mode: Optional[str] = 'RGB', workers: int = 4) -> None:
    """Open every image before training; raise one :class:`UserError` naming the first bad file (and the count)."""
    if mode not in IMAGE_CHECKS:
        raise UserError(f'--check-images must be one of {", ".join(IMAGE_CHECKS)}, got {mode!r}.')
    if mode == 'none' or not paths:
        return
    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = [e for e in pool.map(lambda p: _check_one(p, mode, img_mode), paths, chunksize=256) if e]
    if errors:
        more = f' ({len(errors) - 1} more bad files)' if len(errors) > 1 else ''
        raise UserError(errors[0].rstrip('.') + more + '; or skip the check with --check-images none.')


def class_to_idx_of(dataset) -> Dict[str, int]:
    """The dataset's class-name -> label map ({} when it has none)."""
    reader = getattr(dataset, 'reader', None)
    return dict(getattr(dataset, 'class_to_idx', None) or getattr(reader, 'class_to_idx', None) or {})


def write_class_map(class_to_idx: Dict[str, int], folder: str) -> str:
    """timm's class-map format (one class name per line, label = line number), written atomically."""
    path = os.path.join(folder, CLASS_MAP_FILE)
    tmp = path + f'.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        f.writelines(f'{name}\n' for name in sorted(class_to_idx, key=class_to_idx.get))
    os.replace(tmp, path)
    return path


def read_class_map(folder: str) -> Optional[Dict[str, int]]:
    path = os.path.join(folder, CLASS_MAP_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return {line.rstrip('\n'): i for i, line in enumerate(f) if line.strip()}


def find_split_folder(root: str, split: str) -> Optional[str]:
    """The folder timm's ``create_dataset`` reads for ``split`` of the ImageFolder ``root`` (``<root>/<split>``, else
    a timm synonym: ``validation`` finds ``val``), or None when there is none (timm then reads ``root`` itself)."""
    name = split.split('[')[0]
    candidates = [name] + [s for group in _SPLIT_SYNONYMS if name in group for s in group]
    return next((os.path.join(root, c) for c in candidates if os.path.exists(os.path.join(root, c))), None)


def _holds_class_folders(root: str, folders: List[str]) -> bool:
    """True when a sub-folder of ``root`` holds images itself: ``root`` is one split (class folders), not a root of
    splits."""
    for d in folders:
        with os.scandir(os.path.join(root, d)) as it:
            if any(e.is_file() and e.name.lower().endswith(_IMAGE_SUFFIXES) for e in it):
                return True
    return False


def _check_split(root: str, split: str, split_flag: str, allow_root: bool) -> None:
    """A split folder that does not exist is an error naming the folders that do (a documented difference from
    timm, which falls back to the whole root); with ``allow_root`` a root of class folders is read as the split."""
    if find_split_folder(root, split) is not None:
        return
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if allow_root and _holds_class_folders(root, folders):
        _logger.info(f'{root} has no {split!r} folder; its class folders are read as the split (as timm does).')
        return
    raise UserError(f'split {split!r} not found in {root}, which holds {folders}; pass the split\'s folder with '
                    f'{split_flag} (timm would read all of {root} instead, mixing its splits).')


def _create(name, root, split, is_training, class_map, batch_size, seed, input_img_mode, download):
    try:
        return create_dataset(name, root=root, split=split, is_training=is_training, class_map=class_map or '',
                              batch_size=batch_size, seed=seed, input_img_mode=input_img_mode, download=download)
    except (AssertionError, FileNotFoundError, RuntimeError) as e:
        raise UserError(f'cannot open split {split!r} of dataset {name or "ImageFolder"} at {root}: {e}. '
                        f'Check --data-dir, --train-split/--val-split (or --split).') from e


def load_folder_dataset(
        name: str,
        root: str,
        split: str,
        is_training: bool,
        class_map=None,
        input_img_mode: Optional[str] = 'RGB',
        batch_size: int = 1,
        seed: int = 42,
        download: bool = False,
        split_flag: str = '--split',
        allow_root: bool = False,
):
    """``timm.data.create_dataset`` with lt-timm's checks; folder datasets become :class:`StrictImageDataset`.

    Args:
        class_map: ``{class name: label}`` of the run (the training split's), or a timm class-map file; a split
            whose classes are a subset is mapped onto it, a split with other classes is refused by name.
        split_flag: the flag that names ``split`` (in the error when its folder is missing).
        allow_root: read a root of class folders as the split when it has no ``split`` folder (``validate.py``).
    """
    if not name:
        split_dirs = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))] if os.path.isdir(root) else []
        if not split_dirs:
            raise UserError(f'dataset folder {root} has no sub-folders; expected an ImageFolder with a training '
                            f'split (train/) and a validation split (e.g. val/), one folder per class inside.')
        _check_split(root, split, split_flag, allow_root)
    args = (name, root, split, is_training)
    opts = dict(batch_size=batch_size, seed=seed, input_img_mode=input_img_mode, download=download)
    own_map = isinstance(class_map, dict)
    dataset = _create(*args, None if own_map else class_map, **opts)
    found = class_to_idx_of(dataset)
    if own_map and found and found != class_map:
        extra = sorted(set(found) - set(class_map))
        if extra:
            raise UserError(f'split {split!r} at {root} has classes the training split does not have: '
                            f'{extra[:5]}{" ..." if len(extra) > 5 else ""}; remove them or train with them.')
        dataset = _create(*args, class_map, **opts)  # a subset of the classes: keep the run's labels
    if len(dataset) == 0:
        raise UserError(f'split {split!r} at {root} holds no images; check --data-dir and the split names.')
    if type(dataset) is ImageDataset and hasattr(dataset.reader, 'samples'):
        dataset = StrictImageDataset(dataset)
    return dataset
