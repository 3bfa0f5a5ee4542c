"""``validate.py``'s command line: timm's validate.py flags, the view-consistency flags, the refused timm options,
and one resolve step that turns the parsed flags into a :class:`~lt_timm.config.ValidateConfig`."""
import argparse
from typing import List, Optional

from ..builders import VALIDATE_DATASET_OPTIONS, available_device
from ..config import Precision, ValidateConfig, ViewOptions, settings_from
from .checks import resolve_model_dtype
from .flags import add_shared_options
from .parity import add_refused_options, check_refused
from .train import image_settings

__all__ = ['build_validate_parser', 'parse_args', 'resolve']


def build_validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='lt-timm validation (timm validate.py flags + view consistency)')
    add_shared_options(p, 'data', '--data-dir', '--dataset')
    p.add_argument('--split', metavar='NAME', default='validation', help='dataset split (default: validation)')
    p.add_argument('--num-samples', default=None, type=int, metavar='N', help='Manually specify num samples in dataset split, for IterableDatasets.')
    add_shared_options(p, '--dataset-download', '--class-map')
    add_shared_options(p, '--input-key', '--input-img-mode', '--target-key', '--dataset-trust-remote-code')
    p.add_argument('--model', '-m', metavar='NAME', default='resnet50', help='model architecture (default: resnet50)')
    p.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='path to latest checkpoint (default: none)')
    add_shared_options(p, '--pretrained')
    p.add_argument('--pretrained-path', default=None, type=str, help='Load this checkpoint as if they were the pretrained weights.')
    add_shared_options(p, '--num-classes', '--gp', '--img-size', '--in-chans', '--input-size')
    p.add_argument('--use-train-size', action='store_true', default=False, help='force use of train input size, even when test size is specified in pretrained cfg')
    add_shared_options(p, '--crop-pct')
    p.add_argument('--crop-mode', default=None, type=str, metavar='N', help='Input image crop mode (squash, border, center). Model default if None.')
    p.add_argument('--crop-border-pixels', type=int, default=None, help='Crop pixels from image border.')
    add_shared_options(p, '--mean', '--std', '--interpolation')
    p.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='mini-batch size (default: 256)')
    p.add_argument('--log-freq', default=10, type=int, metavar='N', help='batch logging frequency (default: 10)')
    p.add_argument('--test-pool', dest='test_pool', action='store_true', help='enable test time pool')
    add_shared_options(p, '--pin-mem')
    p.add_argument('--use-ema', dest='use_ema', action='store_true', help='use ema version of weights if present')
    add_shared_options(p, '--fast-norm')
    p.add_argument('--reparam', default=False, action='store_true', help='Reparameterize model')
    add_shared_options(p, '--model-kwargs', '--torchcompile-mode', '--torchcompile', '-j')
    add_shared_options(p, '--no-prefetcher', '--channels-last', '--device', '--amp', '--amp-dtype', '--model-dtype')
    p.add_argument('--results-file', default='', type=str, metavar='FILENAME', help='Output csv or json file for validation results')
    p.add_argument('--results-format', default=None, type=str, choices=('csv', 'json'), help='Format for results file: csv or json (default: json for a .json file, else csv)')
    add_shared_options(p, '--seed')
    g = p.add_argument_group('LossTransform evaluation')
    g.add_argument('--consistency', type=int, default=0, metavar='N',
                   help='evaluate N augmented views per image (training transform): mean KL to the consensus and view agreement')
    g.add_argument('--consistency-images', type=int, default=1000, metavar='N', help='images used for --consistency/--tta (default: 1000)')
    g.add_argument('--tta', type=int, default=0, metavar='N', help='also report top-1 of N-view test-time averaging')
    g.add_argument('--plot', default='', type=str, metavar='PATH', help='save a Fig. 3 style (views x classes) heatmap PNG')
    g.add_argument('--plot-images', type=int, default=6, metavar='N', help='images in the --plot heatmap (default: 6)')
    g.add_argument('--aa', type=str, default=None, metavar='NAME', help='AutoAugment policy of the view transform (default: none)')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT', help='view transform random resize scale')
    g.add_argument('--hflip', type=float, default=0.5, help='view transform horizontal flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='view transform color jitter')
    g.add_argument('--train-crop-mode', type=str, default=None, help='view transform crop: timm\'s (default) or "pad" (CIFAR pad-and-crop)')
    g.add_argument('--train-crop-pad', type=int, default=4, metavar='N', help='padding of --train-crop-mode pad (default: 4)')
    add_refused_options(p, 'validate')
    return p


def parse_args(argv: Optional[List[str]] = None) -> ValidateConfig:
    """``validate.py``'s command line to its settings: parse, refuse unsupported timm options, resolve."""
    return resolve(build_validate_parser().parse_args(argv))


def resolve(args: argparse.Namespace) -> ValidateConfig:
    """The one step from parsed flags to validation settings: refused options and ``--model-dtype`` checked, the
    CPU fallback of ``--device cuda``, the prefetcher."""
    check_refused(args, 'validate')
    model_dtype = resolve_model_dtype(args.model_dtype, args.amp)
    args.device = available_device(args.device, 'validating')
    args.prefetcher = not args.no_prefetcher
    return settings_from(
        ValidateConfig, args,
        precision=settings_from(Precision, args, model_dtype=model_dtype),
        **image_settings(args, VALIDATE_DATASET_OPTIONS),
        views=settings_from(ViewOptions, args))
