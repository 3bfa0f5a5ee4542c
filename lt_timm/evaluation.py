"""What ``validate.py`` needs: timm-style validation plus view consistency, TTA and the Fig. 3 heatmap."""
import argparse
import csv
import json
import logging
import os
import time
from collections import OrderedDict
from contextlib import suppress
from functools import partial
from typing import List, Optional

import torch
from timm import utils
from timm.data import create_loader, create_transform, resolve_data_config

from .data import class_to_idx_of, load_folder_dataset, read_class_map
from .errors import UserError
from .metrics import view_statistics
from .plots import plot_view_heatmap
from .transforms import apply_cifar_augmentation
from .modeling import create_model, load_weights, read_checkpoint_args
from .training import validate

__all__ = ['build_validate_parser', 'run_validation']

_logger = logging.getLogger('validate')


def build_validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='lt-timm validation (timm validate.py flags + view consistency)')
    p.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (positional is *deprecated*, use --data-dir)')
    p.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    p.add_argument('--dataset', metavar='NAME', default='', help='dataset type + name (default: ImageFolder)')
    p.add_argument('--split', metavar='NAME', default='validation', help='dataset split (default: validation)')
    p.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file')
    p.add_argument('--input-img-mode', default=None, type=str, help='Dataset image conversion mode for input images.')
    p.add_argument('--model', '-m', metavar='NAME', default='resnet50', help='model architecture (default: resnet50)')
    p.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='path to latest checkpoint (default: none)')
    p.add_argument('--pretrained', dest='pretrained', action='store_true', help='use pre-trained model')
    p.add_argument('--pretrained-path', default=None, type=str, help='Load this checkpoint as if they were the pretrained weights.')
    p.add_argument('--num-classes', type=int, default=None, help='Number classes in dataset (default: from the dataset)')
    p.add_argument('--gp', default=None, type=str, metavar='POOL', help='Global pool type')
    p.add_argument('--img-size', default=None, type=int, metavar='N', help='Input image dimension, uses model default if empty')
    p.add_argument('--in-chans', type=int, default=None, metavar='N', help='Image input channels (default: None => 3)')
    p.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N', help='Input all image dimensions (d h w)')
    p.add_argument('--crop-pct', default=None, type=float, metavar='N', help='Input image center crop pct')
    p.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='Override mean pixel value of dataset')
    p.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='Override std deviation of dataset')
    p.add_argument('--interpolation', default='', type=str, metavar='NAME', help='Image resize interpolation type (overrides model)')
    p.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='mini-batch size (default: 256)')
    p.add_argument('-j', '--workers', default=4, type=int, metavar='N', help='number of data loading workers (default: 4)')
    p.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    p.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
    p.add_argument('--device', default='cuda', type=str, help='Device (accelerator) to use.')
    p.add_argument('--amp', action='store_true', default=False, help='use mixed precision')
    p.add_argument('--amp-dtype', default='float16', type=str, help='lower precision AMP dtype (default: float16)')
    p.add_argument('--results-file', default='', type=str, metavar='FILENAME', help='Output csv or json file for validation results')
    p.add_argument('--seed', type=int, default=42, help='random seed for the augmented views')
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
    return p


def _write_results(path: str, results: 'OrderedDict[str, object]') -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith('.json'):
        with open(path, 'w') as f:
            json.dump(results, f, indent=2)
    elif path.endswith('.csv'):
        with open(path, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(results))
            w.writeheader()
            w.writerow(results)
    else:
        raise UserError(f'--results-file {path} must end in .csv or .json.')


def run_validation(args: argparse.Namespace) -> 'OrderedDict[str, object]':
    if args.results_file and not args.results_file.endswith(('.csv', '.json')):
        raise UserError(f'--results-file {args.results_file} must end in .csv or .json.')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        _logger.warning('CUDA is not available: validating on the CPU (pass --device cpu to silence this).')
        args.device = 'cpu'
    device = torch.device(args.device)
    args.prefetcher = not args.no_prefetcher
    args.distributed, args.world_size, args.rank = False, 1, 0
    root = args.data_dir or args.data
    if not root or (not args.dataset and not os.path.isdir(root)):
        raise UserError(f'dataset folder {root} does not exist; pass it with --data-dir DIR.')
    in_chans = args.in_chans or (args.input_size[0] if args.input_size is not None else 3)
    # The run's class map (saved by train.py beside its checkpoints) keeps the labels of training.
    run_map = None
    if args.checkpoint:
        saved = read_checkpoint_args(args.checkpoint) if os.path.isfile(args.checkpoint) else None
        run_map = getattr(saved, 'class_to_idx', None) or read_class_map(os.path.dirname(os.path.abspath(args.checkpoint)))
    if run_map and not args.class_map:
        _logger.info(f'Using the class map of the training run ({len(run_map)} classes) beside {args.checkpoint}.')
    data_opts = dict(class_map=args.class_map or run_map, input_img_mode=args.input_img_mode or
                     ('RGB' if in_chans == 3 else 'L'), batch_size=args.batch_size, seed=args.seed)
    dataset = load_folder_dataset(args.dataset, root, args.split, False, **data_opts)
    if args.num_classes is None:
        args.num_classes = len(run_map or class_to_idx_of(dataset)) or None
        if args.num_classes is None:
            raise UserError('cannot infer the number of classes; pass --num-classes.')
    model = create_model(args.model, args.num_classes, in_chans, pretrained=args.pretrained,
                         pretrained_path=args.pretrained_path, global_pool=args.gp)
    if args.checkpoint:
        load_weights(model, args.checkpoint, f'--model {args.model} with {args.num_classes} classes')
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(vars(args), model=model)
    amp_autocast = suppress
    if args.amp:
        amp_autocast = partial(torch.autocast, device_type=device.type,
                               dtype=torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16)

    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        use_prefetcher=args.prefetcher, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, crop_pct=data_config['crop_pct'], device=device,
        persistent_workers=args.workers > 0)
    start = time.time()
    metrics = validate(model, loader, args, device, amp_autocast)
    elapsed = time.time() - start
    results = OrderedDict(
        model=args.model, checkpoint=args.checkpoint, split=args.split, top1=round(metrics['top1'], 4),
        top5=round(metrics['top5'], 4), loss=round(metrics['loss'], 6), img_per_sec=round(len(dataset) / elapsed, 2),
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 4), img_size=data_config['input_size'][-1])

    num_views = max(args.consistency, args.tta, 2 if args.plot else 0)
    if num_views:
        utils.random_seed(args.seed)
        views = load_folder_dataset(args.dataset, root, args.split, False, **data_opts)
        views.transform = create_transform(
            data_config['input_size'], is_training=True, scale=args.scale, hflip=args.hflip,
            color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=data_config['interpolation'],
            mean=data_config['mean'], std=data_config['std'])
        if args.train_crop_mode == 'pad':
            views.transform = apply_cifar_augmentation(views.transform, data_config['input_size'], pad_crop=args.train_crop_pad)
        stats = view_statistics(model, views, num_views, batch_images=max(1, args.batch_size // num_views),
                                num_workers=args.workers, device=device, max_images=args.consistency_images,
                                keep_probs=args.plot_images if args.plot else 0, amp_autocast=amp_autocast)
        if args.consistency:
            results.update(consistency_views=num_views, consistency_images=stats.num_images,
                           consistency_kl=round(stats.consistency_kl, 6), view_agreement=round(stats.view_agreement, 6),
                           all_views_agree=round(stats.all_views_agree, 6))
        if args.tta:
            results.update(tta_views=num_views, tta_top1=round(stats.tta_top1, 4))
        if args.plot:
            class_to_idx = run_map or class_to_idx_of(dataset)
            classes = sorted(class_to_idx, key=class_to_idx.get) if class_to_idx else None
            plot_view_heatmap(stats.probs, args.plot, class_names=classes,
                              title=f'{args.model}: predictions of {num_views} augmented views')
            results['plot'] = args.plot
    _logger.info('--result\n' + json.dumps(results, indent=4))
    if args.results_file:
        _write_results(args.results_file, results)
    return results
