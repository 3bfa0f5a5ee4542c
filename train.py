#!/usr/bin/env python3
"""Train an image classifier with timm + LossTransform.

    python train.py --data-dir DIR --model resnet50 --pretrained --loss losstransform --aug-repeats 3 -c configs/...yaml

timm's train.py flags and YAML recipes (-c) carry over; see ``python train.py --help``. The command line lives in
``lt_timm.cli.train``, the run in ``lt_timm.training`` (its loop: ``lt_timm.trainer.Trainer``).
"""
from timm import utils

from lt_timm.cli.train import parse_config
from lt_timm.errors import exit_on_user_error
from lt_timm.training import close_process_group, train


@exit_on_user_error
def main():
    utils.setup_default_logging()
    train(parse_config())
    close_process_group()  # DDP: the process group torn down before exit


if __name__ == '__main__':
    main()
