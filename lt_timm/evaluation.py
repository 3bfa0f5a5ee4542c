"""What ``validate.py`` runs: timm-style validation plus view consistency, TTA and the Fig. 3 heatmap, from a
:class:`~lt_timm.config.ValidateConfig` and the builders ``train.py`` uses (:mod:`lt_timm.builders`)."""
import csv
import json
import logging
import os
import time
from collections import OrderedDict
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm import utils
from timm.data import create_loader, create_transform, resolve_data_config
from timm.layers import apply_test_time_pool, set_fast_norm
from timm.utils.model import reparameterize_model

from .accuracy import validate
from .builders import (VALIDATE_DATASET_OPTIONS, autocast_and_scaler, create_model_from, dataset_options, open_dataset,
                       resolve_eval_num_classes)
from .config import ValidateConfig
from .data import class_to_idx_of, read_class_map
from .errors import UserError, os_error_message
from .metrics import view_statistics
from .modeling import checkpoint_problem, load_weights, read_checkpoint, read_checkpoint_args
from .plots import plot_view_heatmap
from .transforms import apply_cifar_augmentation

__all__ = ['run_validation', 'load_eval_checkpoint', 'run_class_map', 'present_labels']

_logger = logging.getLogger('validate')


def run_validation(config: ValidateConfig) -> 'OrderedDict[str, object]':
    """Validate the model on ``--split`` (timm's metrics and result keys), then the augmented views' consistency /
    TTA / heatmap; logs the results and writes ``--results-file``."""
    if config.fast_norm:
        set_fast_norm()
    device = torch.device(config.precision.device)
    root = _data_root(config)
    run_map = run_class_map(config.checkpoint)
    if run_map and not config.data.class_map:
        _logger.info(f'Using the class map of the training run ({len(run_map)} classes) beside {config.checkpoint}.')
    dataset = _eval_dataset(config, root, run_map)
    num_classes = resolve_eval_num_classes(config.model.num_classes, run_map, dataset)
    model, data_config, test_time_pool = _eval_model(config, num_classes, device)
    autocast, _ = autocast_and_scaler(config.precision, device)
    loader = _eval_loader(config, dataset, data_config, test_time_pool, device)
    present = present_labels(dataset, num_classes)
    start = time.time()
    metrics = validate(model, loader, device, prefetcher=config.prefetcher,
                       channels_last=config.precision.channels_last, autocast=autocast, log_freq=config.log_freq,
                       input_dtype=config.precision.model_dtype, present=present)
    results = _results(config, metrics, model, data_config, len(dataset) / (time.time() - start))
    if present is not None:
        results.update(top1_present=round(metrics['top1_present'], 4), classes_present=len(present))
    if config.views.num_views:
        views = _eval_dataset(config, root, run_map, seed_first=True)
        results.update(_view_results(config, model, views, data_config, run_map or class_to_idx_of(dataset), device,
                                     autocast))
    _logger.info('--result\n' + json.dumps(results, indent=4))
    if config.results_file:
        try:
            _write_results(config.results_file, results, _results_format(config))
        except OSError as e:
            raise _cannot_write(e, config.results_file, '--results-file') from None
    return results


def _data_root(config: ValidateConfig) -> str:
    root = config.data.root
    if not root or (not config.data.dataset and not os.path.isdir(root)):
        raise UserError(f'dataset folder {root} does not exist; pass it with --data-dir DIR.')
    return root


def run_class_map(checkpoint: str) -> Optional[Dict[str, int]]:
    """The training run's class map (saved by train.py in the checkpoint's args and beside it): validation keeps
    the labels of training."""
    if not checkpoint:
        return None
    saved = read_checkpoint_args(checkpoint) if os.path.isfile(checkpoint) else None
    return getattr(saved, 'class_to_idx', None) or read_class_map(os.path.dirname(os.path.abspath(checkpoint)))


def present_labels(dataset, num_classes: int) -> Optional[torch.Tensor]:
    """The labels a folder dataset's images carry, when they are fewer than the model's classes (an ImageNet subset
    read through ImageNet's 1000-class map), else None."""
    samples = getattr(getattr(dataset, 'reader', None), 'samples', None)
    if not samples:
        return None
    labels = sorted({int(t) for _, t in samples})
    return torch.tensor(labels) if len(labels) < num_classes else None


def _eval_dataset(config: ValidateConfig, root: str, run_map, seed_first: bool = False):
    """The ``--split`` dataset (labels: ``--class-map``, else the run's); ``seed_first``: the views' copy, the RNGs
    seeded from ``--seed`` first."""
    extra = dataset_options(config.data.dataset, config.data.extras, VALIDATE_DATASET_OPTIONS, False)
    if seed_first:
        utils.random_seed(config.seed)
    return open_dataset(config.data, root, config.split, False, extra, class_map=config.data.class_map or run_map,
                        allow_root=True)


def load_eval_checkpoint(model: nn.Module, path: str, use_ema: bool, model_name: str, num_classes: int) -> None:
    """The checkpoint's weights (``use_ema``: its EMA weights, refused when it has none), via timm's loader."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} not found; check the path.')
    if use_ema:
        try:
            content = read_checkpoint(path)
        except Exception as e:
            raise UserError(checkpoint_problem(path, e, f'--model {model_name}')) from e
        if not (isinstance(content, dict) and any(k in content for k in ('state_dict_ema', 'model_ema'))):
            raise UserError(f'--use-ema: checkpoint {path} has no EMA weights (state_dict_ema); train with '
                            f'--model-ema, or drop --use-ema.')
    load_weights(model, path, f'--model {model_name} with {num_classes} classes', use_ema=use_ema)


def _eval_model(config: ValidateConfig, num_classes: int, device: torch.device):
    """The model (checkpoint, reparameterisation, test-time pool, device, dtype, channels-last, compile); returns it,
    timm's data config and whether test-time pooling is on."""
    model = create_model_from(config.model, num_classes, training=False)
    if config.checkpoint:
        load_eval_checkpoint(model, config.checkpoint, config.use_ema, config.model.model, num_classes)
    if config.reparam:
        model = reparameterize_model(model)
    data_config = resolve_data_config(dict(config.data_config_args), model=model,
                                      use_test_size=not config.use_train_size)
    test_time_pool = False
    if config.test_pool:
        model, test_time_pool = apply_test_time_pool(model, data_config, use_test_size=not config.use_train_size)
    model.to(device=device, dtype=config.precision.model_dtype).eval()
    if config.precision.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.torchcompile:
        model = torch.compile(model, backend=config.torchcompile, mode=config.torchcompile_mode)
    return model, data_config, test_time_pool


def _eval_loader(config: ValidateConfig, dataset, data_config, test_time_pool: bool, device: torch.device):
    """timm's evaluation loader, as timm's validate.py builds it."""
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=config.data.batch_size, is_training=False,
        use_prefetcher=config.prefetcher, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=config.data.workers,
        crop_pct=1.0 if test_time_pool else data_config['crop_pct'], crop_mode=data_config['crop_mode'],
        crop_border_pixels=config.crop_border_pixels, pin_memory=config.pin_mem,
        img_dtype=config.precision.model_dtype or torch.float32, device=device,
        persistent_workers=config.data.workers > 0)


def _results(config: ValidateConfig, metrics, model: nn.Module, data_config, img_per_sec: float) -> OrderedDict:
    """timm validate.py's result keys, in its order, then lt-timm's."""
    return OrderedDict(
        model=config.model.model, top1=round(metrics['top1'], 4), top1_err=round(100 - metrics['top1'], 4),
        top5=round(metrics['top5'], 4), top5_err=round(100 - metrics['top5'], 4),
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 2), img_size=data_config['input_size'][-1],
        crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'],
        checkpoint=config.checkpoint, split=config.split, loss=round(metrics['loss'], 6),
        img_per_sec=round(img_per_sec, 2))


def _view_results(config: ValidateConfig, model: nn.Module, views, data_config, class_to_idx, device: torch.device,
                  autocast) -> OrderedDict:
    """``--consistency`` / ``--tta`` / ``--plot``: N augmented views per image (the training transform)."""
    v = config.views
    num_views = v.num_views
    views.transform = create_transform(
        data_config['input_size'], is_training=True, scale=v.scale, hflip=v.hflip, color_jitter=v.color_jitter,
        auto_augment=v.aa, interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'])
    if v.train_crop_mode == 'pad':
        views.transform = apply_cifar_augmentation(views.transform, data_config['input_size'],
                                                   pad_crop=v.train_crop_pad)
    stats = view_statistics(model, views, num_views, batch_images=max(1, config.data.batch_size // num_views),
                            num_workers=config.data.workers, device=device, max_images=v.consistency_images,
                            keep_probs=v.plot_images if v.plot else 0, amp_autocast=autocast)
    results = OrderedDict()
    if v.consistency:
        results.update(consistency_views=num_views, consistency_images=stats.num_images,
                       consistency_kl=round(stats.consistency_kl, 6), view_agreement=round(stats.view_agreement, 6),
                       all_views_agree=round(stats.all_views_agree, 6))
    if v.tta:
        results.update(tta_views=num_views, tta_top1=round(stats.tta_top1, 4))
    if v.plot:
        classes = sorted(class_to_idx, key=class_to_idx.get) if class_to_idx else None
        try:
            plot_view_heatmap(stats.probs, v.plot, class_names=classes,
                              title=f'{config.model.model}: predictions of {num_views} augmented views')
        except OSError as e:
            raise _cannot_write(e, v.plot, '--plot') from None
        results['plot'] = v.plot
    return results


def _results_format(config: ValidateConfig) -> str:
    return config.results_format or ('json' if config.results_file.endswith('.json') else 'csv')


def _cannot_write(e: OSError, path: str, flag: str) -> UserError:
    return UserError((os_error_message(e, f'cannot write {flag} {path}', flag=flag)
                      or f'cannot write {flag} {path} ({e.strerror}): pass another {flag}') + '.')


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
