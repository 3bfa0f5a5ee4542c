#!/usr/bin/env python3
"""Stand-in for timm's current train.py shape (task API), written for lt_timm's launcher tests.

It has the hook points of timm's script — module-level ``config_parser``/``parser``, ``_parse_args`` with a
YAML ``-c`` config, ``create_loader`` imported from ``timm.data``, timm's criterion choice from
``--smoothing``/``--mixup``/``--cutmix``/``--bce-loss``, a ``ClassificationTask(model=..., criterion=...)``
and a ``main()`` — but trains only a few steps and writes ``evidence_rank{R}.json`` to ``--output``:
the criterion it trained with, the validation criterion, and the targets of every training batch.
It knows nothing about lt_timm.
"""
import argparse
import json
import logging
import os

import torch
import torch.nn as nn
import yaml
from timm import utils
from timm.data import create_dataset, create_loader, resolve_data_config, FastCollateMixup, Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.task import ClassificationTask, resume_task_checkpoint

_logger = logging.getLogger('train')

config_parser = parser = argparse.ArgumentParser(description='Training Config', add_help=False)
parser.add_argument('-c', '--config', default='', type=str, metavar='FILE', help='YAML config file')

parser = argparse.ArgumentParser(description='stand-in timm training script (task API)')
parser.add_argument('data', metavar='DIR')
parser.add_argument('--model', default='test_resnet', type=str)
parser.add_argument('--num-classes', type=int, default=None)
parser.add_argument('--class-map', default='', type=str)
parser.add_argument('--initial-checkpoint', default='', type=str)
parser.add_argument('--img-size', type=int, default=32)
parser.add_argument('-b', '--batch-size', type=int, default=12)
parser.add_argument('--epochs', type=int, default=1)
parser.add_argument('--lr', type=float, default=0.01)
parser.add_argument('--smoothing', type=float, default=0.)
parser.add_argument('--mixup', type=float, default=0.)
parser.add_argument('--cutmix', type=float, default=0.)
parser.add_argument('--mixup-mode', type=str, default='batch')
parser.add_argument('--bce-loss', action='store_true', default=False)
parser.add_argument('--aug-repeats', type=float, default=0)
parser.add_argument('--aug-splits', type=int, default=0)  # AugMix splits (unused by this stand-in)
parser.add_argument('--seed', type=int, default=42)
parser.add_argument('--device', default='cpu', type=str)
parser.add_argument('--dist-backend', default=None, type=str)
parser.add_argument('--workers', type=int, default=0)
parser.add_argument('--no-prefetcher', action='store_true', default=False)
parser.add_argument('--output', default='', type=str)
parser.add_argument('--resume', default='', type=str)
parser.add_argument('--start-epoch', default=None, type=int)


def _parse_args():
    args_config, remaining = config_parser.parse_known_args()
    if args_config.config:
        with open(args_config.config, 'r') as f:
            cfg = yaml.safe_load(f)
            parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    return args, args_text


def _set_loader_epoch(loader, epoch):
    if hasattr(loader.batch_sampler, 'set_epoch'):
        loader.batch_sampler.set_epoch(epoch)
    elif hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)


def main():
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args, args_text = _parse_args()
    args.prefetcher = not args.no_prefetcher
    device = utils.init_distributed_device(args)
    utils.random_seed(args.seed, args.rank)

    dataset_train = create_dataset('', root=args.data, split='train', is_training=True, class_map=args.class_map)
    num_classes = args.num_classes or len(dataset_train.reader.class_to_idx)
    model = create_model(args.model, num_classes=num_classes,
                         checkpoint_path=args.initial_checkpoint or None).to(device)  # as timm's train.py
    data_config = resolve_data_config(dict(input_size=(3, args.img_size, args.img_size)), model=model)

    mixup_active = args.mixup > 0 or args.cutmix > 0
    collate_fn = mixup_fn = None
    if mixup_active:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)

    loader_train = create_loader(
        dataset_train,
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        is_training=True,
        num_aug_repeats=args.aug_repeats,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=args.workers,
        distributed=args.distributed,
        collate_fn=collate_fn,
        use_prefetcher=args.prefetcher,
        device=device,
    )
    loader_eval = create_loader(
        create_dataset('', root=args.data, split='train', is_training=False, class_map=args.class_map),
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        is_training=False,
        num_workers=args.workers,
        distributed=False,
        use_prefetcher=args.prefetcher,
        device=device,
    )

    # the criterion, chosen from the flags as timm's train.py does
    if mixup_active:
        train_loss_fn = BinaryCrossEntropy() if args.bce_loss else SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = BinaryCrossEntropy(smoothing=args.smoothing) if args.bce_loss \
            else LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    validate_loss_fn = nn.CrossEntropyLoss()

    task = ClassificationTask(model=model, criterion=train_loss_fn, device=device, verbose=False)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=args.lr)
    resume_epoch = None
    if args.resume:
        resume_epoch = resume_task_checkpoint(task, args.resume, optimizer=optimizer, log_info=False)
    if args.distributed:
        task.prepare_distributed(device_ids=None)
    model = task.get_trainable_module()

    start_epoch = 0
    if args.start_epoch is not None:  # a specified start_epoch overrides the resume epoch, as in timm
        start_epoch = args.start_epoch
    elif resume_epoch is not None:
        start_epoch = resume_epoch
    batches, batch_epochs = [], []
    for epoch in range(start_epoch, args.epochs):
        _set_loader_epoch(loader_train, epoch)
        seen = train_one_epoch(epoch, model, loader_train, optimizer, args, task=task, mixup_fn=mixup_fn)
        batches += seen
        batch_epochs += [epoch] * len(seen)
        if args.output and args.rank == 0:
            os.makedirs(args.output, exist_ok=True)
            torch.save(dict(epoch=epoch, version=2, optimizer=optimizer.state_dict(), **task.get_checkpoint_state()),
                       os.path.join(args.output, f'checkpoint-{epoch}.pth.tar'))
    val_loss = validate(task.get_eval_model(), loader_eval, validate_loss_fn)

    crit = task.criterion
    base = getattr(crit, 'base_loss', None)
    evidence = dict(
        rank=args.rank, world_size=args.world_size, args=yaml.safe_load(args_text),
        criterion=type(crit).__name__, criterion_repr=repr(crit),
        base_criterion=type(base).__name__ if base is not None else None,
        rho=getattr(crit, 'rho', None), num_repeats=getattr(crit, 'num_repeats', None),
        last_consistency=float(crit.last_consistency) if getattr(crit, 'last_consistency', None) is not None else None,
        validate_criterion=type(validate_loss_fn).__name__, val_loss=val_loss, batches=batches,
        batch_epochs=batch_epochs, start_epoch=start_epoch,
    )
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, f'evidence_rank{args.rank}.json'), 'w') as f:
            json.dump(evidence, f)
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def train_one_epoch(epoch, model, loader, optimizer, args, task=None, mixup_fn=None):
    model.train()
    seen = []
    for input, target in loader:
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        loss = task(input, target)['loss']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(target.tolist())
        _logger.info(f'Train: {epoch} loss {loss.item():.4f}')
    return seen


def validate(model, loader, loss_fn):
    model.eval()
    with torch.no_grad():
        losses = [loss_fn(model(input), target).item() for input, target in loader]
    return sum(losses) / max(1, len(losses))


if __name__ == '__main__':
    main()
