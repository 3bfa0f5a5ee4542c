#!/usr/bin/env python3
"""Validate a timm model or lt-timm checkpoint: top-1/top-5/loss, plus LossTransform's view consistency.

    python validate.py --data-dir DIR --model resnet50 --checkpoint model_best.pth.tar --consistency 8 --plot fig3.png

The command line lives in ``lt_timm.cli.validate``, the run in ``lt_timm.evaluation``.
"""
from timm import utils

from lt_timm import models as _models  # noqa: F401  (registers the CIFAR ResNets)
from lt_timm.cli.validate import parse_args
from lt_timm.errors import exit_on_user_error
from lt_timm.evaluation import run_validation


@exit_on_user_error
def main():
    utils.setup_default_logging()
    run_validation(parse_args())


if __name__ == '__main__':
    main()
