"""Command-line flags defined once: LossTransform's (``train.py`` and the stock-timm launcher) and the timm options
that ``train.py`` and ``validate.py`` share (:data:`SHARED_OPTIONS`, same names, defaults and help as timm)."""
import argparse

from timm import utils

from ..layout import EPOCH_MODES
from ..registry import list_losses

__all__ = ['add_losstransform_args', 'add_launch_args', 'add_shared_options', 'SHARED_OPTIONS', 'LT_ARG_DEFAULTS',
           'LAUNCH_LOSSES', 'LT_OPTIONS']

# dest -> default; YAML recipes (-c) may set any of these keys.
LT_ARG_DEFAULTS = dict(loss='ce', lt_rho=1.0, lt_detach=False, lt_reverse_kl=False, lt_epoch='v1')
LT_OPTIONS = ('--loss', '--lt-rho', '--lt-detach', '--lt-reverse-kl', '--lt-epoch')  # what the launcher adds
LAUNCH_LOSSES = ('ce', 'losstransform')  # --loss choices under the launcher (the script picks the base loss)


def _option(*flags, **kwargs):
    return flags, kwargs


# First flag -> (flags, add_argument kwargs) of every option that timm's train.py and validate.py both define with the
# same flags and default (one help text for both); each parser adds them where timm's script lists them.
SHARED_OPTIONS = {
    'data': _option('data', nargs='?', metavar='DIR', const=None, help='path to dataset (positional is *deprecated*, use --data-dir)'),
    '--data-dir': _option('--data-dir', metavar='DIR', help='path to dataset (root dir)'),
    '--dataset-download': _option('--dataset-download', action='store_true', default=False, help='Allow download of dataset for torch/ and tfds/ datasets that support it.'),
    '--input-key': _option('--input-key', default=None, type=str, help='Dataset key for input images.'),
    '--input-img-mode': _option('--input-img-mode', default=None, type=str, help='Dataset image conversion mode for input images.'),
    '--target-key': _option('--target-key', default=None, type=str, help='Dataset key for target labels.'),
    '--dataset-trust-remote-code': _option('--dataset-trust-remote-code', action='store_true', default=False, help='Allow huggingface dataset import to execute code downloaded from the dataset\'s repo.'),
    '--in-chans': _option('--in-chans', type=int, default=None, metavar='N', help='Image input channels (default: None => 3)'),
    '--mean': _option('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='Override mean pixel value of dataset'),
    '--std': _option('--std', type=float, nargs='+', default=None, metavar='STD', help='Override std deviation of dataset'),
    '--interpolation': _option('--interpolation', default='', type=str, metavar='NAME', help='Image resize interpolation type (overrides model)'),
    '--pin-mem': _option('--pin-mem', action='store_true', default=False, help='Pin CPU memory in DataLoader for more efficient transfer to GPU.'),
    '--fast-norm': _option('--fast-norm', default=False, action='store_true', help='enable experimental fast-norm'),
    '--model-kwargs': _option('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs, help='model keyword arguments: key=value ...'),
    '--torchcompile-mode': _option('--torchcompile-mode', type=str, default=None, help="torch.compile mode (default: None)."),
    '--no-prefetcher': _option('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher'),
    '--channels-last': _option('--channels-last', action='store_true', default=False, help='Use channels_last memory layout'),
    '--device': _option('--device', default='cuda', type=str, help='Device (accelerator) to use.'),
    '--amp-dtype': _option('--amp-dtype', default='float16', type=str, help='lower precision AMP dtype (default: float16)'),
    '--amp': _option('--amp', action='store_true', default=False, help='use mixed precision (AMP)'),
    '--class-map': _option('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file (default: "")'),
    '--crop-pct': _option('--crop-pct', default=None, type=float, metavar='N', help='Input image center crop percent (for validation only)'),
    '--dataset': _option('--dataset', metavar='NAME', default='', help='dataset type + name ("<type>/<name>") (default: ImageFolder or ImageTar if empty)'),
    '--gp': _option('--gp', default=None, type=str, metavar='POOL', help='Global pool type, one of (fast, avg, max, avgmax, avgmaxc). Model default if None.'),
    '--img-size': _option('--img-size', type=int, default=None, metavar='N', help='Image size (default: None => model default)'),
    '--input-size': _option('--input-size', default=None, nargs=3, type=int, metavar='N', help='Input all image dimensions (d h w, e.g. --input-size 3 224 224)'),
    '--num-classes': _option('--num-classes', type=int, default=None, metavar='N', help='number of label classes (default: from the dataset)'),
    '--pretrained': _option('--pretrained', action='store_true', default=False, help='Start with pretrained version of specified network (if avail)'),
    '--seed': _option('--seed', type=int, default=42, metavar='S', help='random seed (default: 42; validate.py: of the augmented views)'),
    '--torchcompile': _option('--torchcompile', nargs='?', type=str, default=None, const='inductor', help='Enable compilation w/ specified backend (default: inductor); train.py compiles the model and the loss.'),
    '-j': _option('-j', '--workers', type=int, default=4, metavar='N', help='number of data loading workers (default: 4)'),
    '--model-dtype': _option('--model-dtype', default=None, type=str, help='Model dtype override (non-AMP) (default: float32)'),
}


def add_shared_options(group, *names: str) -> None:
    """Add the shared timm options ``names`` (keys of :data:`SHARED_OPTIONS`) to a parser or argument group."""
    for name in names:
        flags, kwargs = SHARED_OPTIONS[name]
        group.add_argument(*flags, **kwargs)


def add_losstransform_args(parser: argparse.ArgumentParser, with_loss: bool = True) -> argparse._ArgumentGroup:
    """Add ``--loss``, ``--lt-rho``, ``--lt-detach``, ``--lt-reverse-kl``, ``--lt-epoch`` to a timm-style parser."""
    group = parser.add_argument_group('LossTransform parameters')
    if with_loss:
        group.add_argument('--loss', default=LT_ARG_DEFAULTS['loss'], choices=list_losses(), metavar='NAME',
                           help=f'training loss: {", ".join(list_losses())} (default: "ce", timm\'s own choice '
                                'from --smoothing/--mixup/--bce-loss; "losstransform" wraps that in T(L))')
    group.add_argument('--lt-rho', type=float, default=LT_ARG_DEFAULTS['lt_rho'], metavar='RHO',
                       help='LossTransform consistency weight rho (default: 1.0)')
    group.add_argument('--lt-detach', action='store_true', default=LT_ARG_DEFAULTS['lt_detach'],
                       help='stop gradients through the consensus pbar (default: off)')
    group.add_argument('--lt-reverse-kl', action='store_true', default=LT_ARG_DEFAULTS['lt_reverse_kl'],
                       help='use KL(p_i || pbar) (AugMix direction) instead of the paper\'s KL(pbar || p_i)')
    group.add_argument('--lt-epoch', default=LT_ARG_DEFAULTS['lt_epoch'], choices=EPOCH_MODES,
                       help='repeated-augmentation epoch: v1 = as many samples as a plain epoch (paper\'s '
                            'LossTransform-v1), full = every image m times in -b rows per step, original = the '
                            'paper\'s first LT: -b images x m replicas per step (default: v1)')
    return group


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    """The launcher's flags on a stock timm script's parser: LossTransform's, ``--loss`` limited to
    :data:`LAUNCH_LOSSES`."""
    group = add_losstransform_args(parser, with_loss=False)
    group.add_argument('--loss', default=LT_ARG_DEFAULTS['loss'], choices=LAUNCH_LOSSES,
                       help='"ce": the criterion the script picks from --smoothing/--mixup/--bce-loss (default); '
                            '"losstransform": that criterion wrapped in LossTransform (needs --aug-repeats >= 2)')
