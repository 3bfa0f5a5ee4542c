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
from typing import Optional

import torch
from timm import utils
from timm.data import create_loader, create_transform, resolve_data_config

from timm.layers import apply_test_time_pool, set_fast_norm
from timm.utils.model import reparameterize_model

from .cli.validate import build_validate_parser
from .data import class_to_idx_of, read_class_map
from .errors import UserError
from .metrics import view_statistics
from .cli.parity import check_refused
from .plots import plot_view_heatmap
from .transforms import apply_cifar_augmentation
from .modeling import checkpoint_problem, load_weights, read_checkpoint, read_checkpoint_args
from .training import (create_model_from_args, dataset_options, open_dataset, resolve_model_dtype, validate,
                       _ITERABLE, _KEYED, _HF)

VALIDATE_DATASET_OPTIONS = (
    ('--num-samples', 'num_samples', 'num_samples', _ITERABLE, 'eval'),
    ('--input-key', 'input_key', 'input_key', _KEYED, 'both'),
    ('--target-key', 'target_key', 'target_key', _KEYED, 'both'),
    ('--dataset-trust-remote-code', 'dataset_trust_remote_code', 'trust_remote_code', _HF, 'both'),
)

__all__ = ['build_validate_parser', 'run_validation', 'resolve_eval_num_classes']

_logger = logging.getLogger('validate')


def _results_format(args: argparse.Namespace) -> str:
    return args.results_format or ('json' if args.results_file.endswith('.json') else 'csv')


def _write_results(path: str, results: 'OrderedDict[str, object]', fmt: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == 'json':
        with open(path, 'w') as f:
            json.dump(results, f, indent=2)
    else:
        with open(path, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(results))
            w.writeheader()
            w.writerow(results)


def resolve_eval_num_classes(num_classes: Optional[int], run_map, dataset) -> int:
    """--num-classes, else the training run's class map, else the dataset's classes (any dataset: folder, torch/,
    hfds/ ...; a dataset without a ``reader`` included)."""
    if num_classes is not None:
        return num_classes
    n = len(run_map or class_to_idx_of(dataset))
    if not n:
        raise UserError(f'cannot infer the number of classes of this {type(dataset).__name__}; pass --num-classes.')
    return n


def _load_checkpoint(model, args: argparse.Namespace) -> None:
    """The checkpoint's weights (``--use-ema``: its EMA weights, refused when it has none), via timm's loader."""
    path = args.checkpoint
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} not found; check the path.')
    if args.use_ema:
        try:
            content = read_checkpoint(path)
        except Exception as e:
            raise UserError(checkpoint_problem(path, e, f'--model {args.model}')) from e
        if not (isinstance(content, dict) and any(k in content for k in ('state_dict_ema', 'model_ema'))):
            raise UserError(f'--use-ema: checkpoint {path} has no EMA weights (state_dict_ema); train with '
                            f'--model-ema, or drop --use-ema.')
    load_weights(model, path, f'--model {args.model} with {args.num_classes} classes', use_ema=args.use_ema)


def run_validation(args: argparse.Namespace) -> 'OrderedDict[str, object]':
    check_refused(args, 'validate')
    model_dtype = resolve_model_dtype(args)
    if args.fast_norm:
        set_fast_norm()
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
                     ('RGB' if in_chans == 3 else 'L'), batch_size=args.batch_size, seed=args.seed,
                     download=args.dataset_download)
    extra = dataset_options(args, VALIDATE_DATASET_OPTIONS, False)
    dataset = open_dataset(args, root, args.split, False, extra, **data_opts)
    args.num_classes = resolve_eval_num_classes(args.num_classes, run_map, dataset)
    model = create_model_from_args(args, args.num_classes, in_chans, training=False)
    if args.checkpoint:
        _load_checkpoint(model, args)
    if args.reparam:
        model = reparameterize_model(model)
    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size)
    test_time_pool = False
    if args.test_pool:
        model, test_time_pool = apply_test_time_pool(model, data_config, use_test_size=not args.use_train_size)
    model.to(device=device, dtype=model_dtype).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    amp_autocast = suppress
    if args.amp:
        if model_dtype not in (None, torch.float32):
            raise UserError('--model-dtype cannot be combined with --amp; use one of them.')
        amp_autocast = partial(torch.autocast, device_type=device.type,
                               dtype=torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16)

    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        use_prefetcher=args.prefetcher, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, crop_pct=1.0 if test_time_pool else data_config['crop_pct'],
        crop_mode=data_config['crop_mode'], crop_border_pixels=args.crop_border_pixels, pin_memory=args.pin_mem,
        img_dtype=model_dtype or torch.float32, device=device, persistent_workers=args.workers > 0)
    start = time.time()
    metrics = validate(model, loader, args, device, amp_autocast, log_freq=args.log_freq, input_dtype=model_dtype)
    elapsed = time.time() - start
    results = OrderedDict(  # timm validate.py's keys, in its order, then lt-timm's
        model=args.model, top1=round(metrics['top1'], 4), top1_err=round(100 - metrics['top1'], 4),
        top5=round(metrics['top5'], 4), top5_err=round(100 - metrics['top5'], 4),
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 2), img_size=data_config['input_size'][-1],
        crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'],
        checkpoint=args.checkpoint, split=args.split, loss=round(metrics['loss'], 6),
        img_per_sec=round(len(dataset) / elapsed, 2))

    num_views = max(args.consistency, args.tta, 2 if args.plot else 0)
    if num_views:
        utils.random_seed(args.seed)
        views = open_dataset(args, root, args.split, False, extra, **data_opts)
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
        _write_results(args.results_file, results, _results_format(args))
    return results
