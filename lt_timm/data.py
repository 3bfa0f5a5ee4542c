"""Dataset creation through timm, with a clear error for missing or unreadable data."""
import argparse
import logging
import os

from timm.data import ImageDataset, create_dataset

from .errors import UserError

__all__ = ['load_folder_dataset', 'StrictImageDataset']

_logger = logging.getLogger(__name__)


class StrictImageDataset(ImageDataset):
    """timm's ImageDataset, but an unreadable image stops the run with its path instead of being skipped.

    timm silently substitutes the next image for a corrupt one; under repeated augmentation that still keeps
    replicas together, but it hides broken data, so lt-timm fails loudly and names the file.
    """

    @classmethod
    def from_dataset(cls, dataset: ImageDataset) -> 'StrictImageDataset':
        strict = cls.__new__(cls)
        strict.__dict__.update(dataset.__dict__)
        strict._max_retries = 1
        return strict

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except RuntimeError as e:
            if 'Failed to load' not in str(e):
                raise
            path = self.filename(index, absolute=True)
            raise UserError(f'cannot read image {path} (corrupt or not an image); delete or replace the file.') from None


def load_folder_dataset(name: str, root: str, split: str, is_training: bool, args: argparse.Namespace):
    """``timm.data.create_dataset`` with lt-timm's checks; folder datasets become :class:`StrictImageDataset`."""
    if not name:
        split_dirs = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))] if os.path.isdir(root) else []
        if not split_dirs:
            raise UserError(f'dataset folder {root} has no sub-folders; expected an ImageFolder with '
                            f'{args.train_split}/ and a validation split (e.g. val/), one folder per class inside.')
    try:
        dataset = create_dataset(
            name, root=root, split=split, is_training=is_training, class_map=getattr(args, 'class_map', ''),
            batch_size=args.batch_size, seed=args.seed, input_img_mode=getattr(args, 'input_img_mode', None),
            download=getattr(args, 'dataset_download', False))
    except (AssertionError, FileNotFoundError, RuntimeError) as e:
        raise UserError(f'cannot open split {split!r} of dataset {name or "ImageFolder"} at {root}: {e}. '
                        f'Check --data-dir, --train-split/--val-split (or --split).') from e
    if len(dataset) == 0:
        raise UserError(f'split {split!r} at {root} holds no images; check --data-dir and the split names.')
    if type(dataset) is ImageDataset:
        dataset = StrictImageDataset.from_dataset(dataset)
    return dataset
