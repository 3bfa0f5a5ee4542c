"""The one ``-c`` reader: a YAML recipe whose keys are flag dest names sets a parser's defaults (timm's two-stage
parse), for ``train.py`` and ``train_detection.py`` alike; command-line flags still override the file.

The file is untrusted input: it is read with ``yaml.safe_load`` (no code runs), and every way it can be wrong is one
:class:`~lt_timm.errors.UserError` naming the file and the fix: missing, not YAML, not a mapping, unknown keys.
"""
import argparse
import os
from typing import Collection, List, Optional, Tuple

import yaml

from ..errors import UserError

__all__ = ['add_config_option', 'read_recipe', 'parse_with_recipe']


def add_config_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The ``-c/--config FILE`` option (timm's)."""
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE', help=help_text)


def read_recipe(path: str, known: Collection[str], ignored: Collection[str] = ()) -> dict:
    """The recipe at ``path`` as ``{dest: value}``: keys in ``ignored`` (and ``config``) dropped, every other key one
    of ``known``."""
    if not os.path.isfile(path):
        raise UserError(f'config file {path} not found; pass an existing YAML with -c.')
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        where = getattr(e, 'problem_mark', None)
        at = f' at line {where.line + 1}, column {where.column + 1}' if where is not None else ''
        raise UserError(f'config {path} is not valid YAML{at} ({getattr(e, "problem", None) or e}); '
                        f'fix the file (keys are flag dest names, e.g. "aug_repeats: 3").') from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise UserError(f'config {path} holds a {type(cfg).__name__}, not a mapping of flag dest '
                        f'names to values (e.g. "aug_repeats: 3").')
    cfg = {k: v for k, v in cfg.items() if k not in ignored and k != 'config'}  # run-time keys of a namespace
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise UserError(f'config {path} has unknown keys {unknown}; keys are flag dest names '
                        f'(e.g. aug_repeats for --aug-repeats).')
    return cfg


def parse_with_recipe(config_parser: argparse.ArgumentParser, parser: argparse.ArgumentParser,
                      argv: Optional[List[str]], ignored: Collection[str] = ()) -> Tuple[argparse.Namespace, str]:
    """timm's two-stage parse: ``-c`` (read by ``config_parser``) sets ``parser``'s defaults, then the command line
    is parsed. Returns the namespace and the recipe's path ('' without ``-c``)."""
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**read_recipe(args_config.config, known, ignored))
    return parser.parse_args(remaining), args_config.config
