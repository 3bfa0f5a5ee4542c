"""timm parity: every option of timm's ``train.py`` / ``validate.py``, supported or refused, and why.

One table (:data:`PARITY`) drives three things:

* the parsers: options lt-timm does not support are still registered, with timm's flag names and defaults
  (:func:`add_refused_options`), so a timm command line or a timm ``args.yaml`` (``-c``) is recognised;
* the check after parsing (:func:`check_refused`): a refused option at its timm default is fine, any other value
  stops the run with one error naming the option and the alternative;
* the docs: ``python -m lt_timm.cli.parity_doc > docs/parity.md`` writes the parity table (a test keeps it up to
  date; :mod:`lt_timm.cli.parity_doc`).

The timm options themselves (flags, dest, default, type) are committed in :mod:`lt_timm.cli.timm_options`, extracted
from timm's scripts with ``python -m lt_timm.cli.parity_doc --extract path/to/train.py path/to/validate.py >
lt_timm/cli/timm_options.py`` (``ast`` only: timm's scripts are not part of the installed package).
"""
import argparse
from typing import Any, Dict, List, Optional, Tuple

from ..errors import UserError

__all__ = ['PARITY', 'DEFAULT_DIFFERS', 'COMPUTED_KEYS', 'timm_options', 'add_refused_options',
           'check_refused']


S, R = 'supported', 'refused'
_SCHED = 'scheduled image/batch sizes change the batch layout that grouped repeats rely on; use one --img-size and -b'
_NAFLEX = 'NaFlex variable-resolution sequence batches are not supported; use the standard loader (--img-size)'
_KD = ('knowledge distillation is not supported with LossTransform; train without a teacher, or use timm\'s own '
       'train.py for distillation')
_TS = 'TorchScript is not supported; use --torchcompile'
_ITER = 'tfds/wds/hfids datasets only, as in timm (refused for other datasets, where timm ignores it)'
_HF = 'hfds/hfids/tfds/wds datasets only, as in timm (refused for other datasets, where timm ignores it)'

# dest -> (status, note); one entry per dest of timm's train.py / validate.py parsers.
PARITY: Dict[str, Dict[str, Tuple[str, str]]] = {
    'train': {
        'config': (S, 'YAML of dest names, timm\'s own args.yaml included; unknown keys are refused by name'),
        'data': (S, ''), 'data_dir': (S, ''), 'dataset': (S, ''), 'train_split': (S, ''), 'val_split': (S, ''),
        'train_num_samples': (S, _ITER), 'val_num_samples': (S, _ITER),
        'dataset_download': (S, ''), 'class_map': (S, ''), 'input_img_mode': (S, ''),
        'input_key': (S, _HF), 'target_key': (S, _HF),
        'dataset_trust_remote_code': (S, 'hfds/hfids datasets only'),
        'model': (S, ''), 'pretrained': (S, ''), 'pretrained_path': (S, ''), 'initial_checkpoint': (S, ''),
        'resume': (S, 'exact resume: data order and augmentation seeds follow (seed, epoch)'),
        'no_resume_opt': (S, ''), 'num_classes': (S, 'default: from the dataset'), 'gp': (S, ''),
        'img_size': (S, ''), 'in_chans': (S, ''), 'input_size': (S, ''), 'crop_pct': (S, ''), 'mean': (S, ''),
        'std': (S, ''), 'interpolation': (S, ''), 'batch_size': (S, 'rows per step; with --aug-repeats m the m '
                                                                    'replicas of an image share a batch'),
        'validation_batch_size': (S, ''), 'channels_last': (S, ''),
        'fuser': (R, 'TorchScript fuser; lt-timm does not script models: use --torchcompile'),
        'grad_accum_steps': (S, 'loss / N, one optimizer step per N micro-batches (DDP no_sync), lr scaled by '
                                'batch x world x N; each micro-batch is a whole grouped batch'),
        'grad_checkpointing': (S, ''), 'fast_norm': (S, ''), 'model_kwargs': (S, ''),
        'head_init_scale': (S, ''), 'head_init_bias': (S, ''),
        'torchcompile_mode': (S, ''), 'torchcompile': (S, 'compiles the model and the loss'),
        'torchscript': (R, _TS),
        'device': (S, 'falls back to the CPU with a warning when CUDA is missing'), 'amp': (S, ''),
        'amp_dtype': (S, ''), 'model_dtype': (S, 'not with --amp, as in timm'), 'no_ddp_bb': (S, ''),
        'synchronize_step': (S, 'torch.cuda.synchronize() after each optimizer step on CUDA; no effect on CPU'),
        'local_rank': (S, 'accepted for torch.distributed.launch; the rank comes from the environment, as in timm'),
        'device_modules': (S, ''),
        'opt': (S, ''), 'opt_eps': (S, ''), 'opt_betas': (S, ''), 'momentum': (S, ''), 'weight_decay': (S, ''),
        'clip_grad': (S, ''), 'clip_mode': (S, ''), 'layer_decay': (S, ''), 'layer_decay_min_scale': (S, ''),
        'layer_decay_no_opt_scale': (S, ''), 'opt_kwargs': (S, ''),
        'sched': (S, ''), 'sched_on_updates': (S, ''), 'lr': (S, ''), 'lr_base': (S, ''), 'lr_base_size': (S, ''),
        'lr_base_scale': (S, ''), 'lr_noise': (S, ''), 'lr_noise_pct': (S, ''), 'lr_noise_std': (S, ''),
        'lr_cycle_mul': (S, ''), 'lr_cycle_decay': (S, ''), 'lr_cycle_limit': (S, ''), 'lr_k_decay': (S, ''),
        'warmup_lr': (S, ''), 'min_lr': (S, ''), 'epochs': (S, ''), 'epoch_repeats': (S, _ITER),
        'start_epoch': (S, ''), 'decay_milestones': (S, ''), 'decay_epochs': (S, ''), 'warmup_epochs': (S, ''),
        'warmup_prefix': (S, ''), 'cooldown_epochs': (S, ''), 'patience_epochs': (S, ''), 'decay_rate': (S, ''),
        'no_aug': (S, ''), 'train_crop_mode': (S, 'also "pad": CIFAR pad-and-crop (--train-crop-pad)'),
        'scale': (S, ''), 'ratio': (S, ''), 'hflip': (S, ''), 'vflip': (S, ''), 'color_jitter': (S, ''),
        'color_jitter_prob': (S, ''), 'grayscale_prob': (S, ''), 'gaussian_blur_prob': (S, ''), 'aa': (S, ''),
        'aug_repeats': (S, 'grouped: all m replicas of an image in one batch on one rank (timm spreads them over '
                           'ranks and needs DDP); works in one process too'),
        'aug_splits': (S, 'not together with --aug-repeats'), 'jsd_loss': (S, 'same as --loss jsd'),
        'bce_loss': (S, ''), 'bce_sum': (S, ''), 'bce_target_thresh': (S, ''), 'bce_pos_weight': (S, ''),
        'reprob': (S, ''), 'remode': (S, ''), 'recount': (S, ''), 'resplit': (S, ''),
        'mixup': (S, 'use --mixup-mode batch with --aug-repeats'), 'cutmix': (S, ''), 'cutmix_minmax': (S, ''),
        'mixup_prob': (S, ''), 'mixup_switch_prob': (S, ''), 'mixup_mode': (S, ''), 'mixup_off_epoch': (S, ''),
        'smoothing': (S, ''), 'train_interpolation': (S, ''), 'drop': (S, ''),
        'drop_connect': (R, 'deprecated in timm (ignored there); use --drop-path'),
        'drop_path': (S, ''), 'drop_block': (S, ''),
        'bn_momentum': (S, ''), 'bn_eps': (S, ''), 'sync_bn': (S, 'SyncBatchNorm before DDP; turns --dist-bn off'),
        'dist_bn': (S, 'BatchNorm statistics reduced (or broadcast) over ranks after every epoch, as in timm'),
        'split_bn': (S, 'needs --aug-splits > 1 or --resplit, as in timm'),
        'model_ema': (S, ''), 'model_ema_force_cpu': (S, ''), 'model_ema_decay': (S, ''), 'model_ema_warmup': (S, ''),
        'seed': (S, ''), 'worker_seeding': (S, ''), 'log_interval': (S, ''),
        'val_interval': (S, 'skipped epochs write no summary row and no checkpoint, as in timm'),
        'recovery_interval': (S, 'recovery-*.pth.tar every N optimizer steps, as in timm'),
        'checkpoint_hist': (S, ''), 'workers': (S, ''), 'save_images': (S, ''), 'pin_mem': (S, ''),
        'no_prefetcher': (S, ''), 'output': (S, 'an existing run folder is never overwritten'), 'experiment': (S, ''),
        'eval_metric': (S, ''),
        'tta': (R, 'timm\'s train.py never feeds test-time-augmented batches to it; use validate.py --tta N'),
        'use_multi_epochs_loader': (S, 'not with --aug-repeats'),
        'log_wandb': (S, 'wandb stays optional: a warning when it is not installed, as in timm'),
        'wandb_project': (S, ''), 'wandb_tags': (S, ''), 'wandb_resume_id': (S, ''),
        'train_img_sizes': (R, _SCHED), 'train_batch_sizes': (R, _SCHED), 'train_size_probs': (R, _SCHED),
        'train_size_schedule': (R, _SCHED), 'train_size_schedule_spread': (R, _SCHED),
        'train_size_random_mix': (R, _SCHED), 'train_batches_per_epoch': (R, _SCHED),
        'variable_batch_loss_scale': (R, _SCHED),
        'naflex_loader': (R, _NAFLEX), 'naflex_train_seq_lens': (R, _NAFLEX), 'naflex_max_seq_len': (R, _NAFLEX),
        'naflex_patch_sizes': (R, _NAFLEX), 'naflex_patch_size_probs': (R, _NAFLEX),
        'naflex_loss_scale': (R, _NAFLEX), 'naflex_patchify_channels_first': (R, _NAFLEX),
        'kd_model_name': (R, _KD), 'kd_distill_type': (R, _KD), 'kd_loss_type': (R, _KD),
        'distill_loss_weight': (R, _KD), 'task_loss_weight': (R, _KD), 'kd_temperature': (R, _KD),
        'kd_student_feature_dim': (R, _KD), 'kd_teacher_feature_dim': (R, _KD), 'kd_token_distill_type': (R, _KD),
    },
    'validate': {
        'data': (S, ''), 'data_dir': (S, ''), 'dataset': (S, ''), 'split': (S, ''), 'num_samples': (S, _ITER),
        'dataset_download': (S, ''), 'class_map': (S, 'default: the training run\'s class map beside --checkpoint'),
        'input_key': (S, _HF), 'input_img_mode': (S, ''), 'target_key': (S, _HF),
        'dataset_trust_remote_code': (S, 'hfds/hfids datasets only'),
        'model': (S, ''), 'pretrained': (S, ''), 'workers': (S, ''), 'batch_size': (S, ''), 'img_size': (S, ''),
        'in_chans': (S, ''), 'input_size': (S, ''), 'use_train_size': (S, ''), 'crop_pct': (S, ''),
        'crop_mode': (S, ''), 'crop_border_pixels': (S, ''), 'mean': (S, ''), 'std': (S, ''),
        'interpolation': (S, ''), 'num_classes': (S, 'default: from the run\'s class map or the dataset'),
        'gp': (S, ''), 'log_freq': (S, ''), 'checkpoint': (S, ''),
        'num_gpu': (R, 'no DataParallel: one process, one device (--device)'),
        'test_pool': (S, ''), 'no_prefetcher': (S, ''), 'pin_mem': (S, ''), 'channels_last': (S, ''),
        'device': (S, ''), 'amp': (S, ''), 'amp_dtype': (S, ''), 'model_dtype': (S, 'not with --amp'),
        'tf_preprocessing': (R, 'TensorFlow preprocessing is not supported; use timm\'s transforms (the default)'),
        'use_ema': (S, 'refused when the checkpoint has no EMA weights (timm silently uses the plain ones)'),
        'fuser': (R, 'TorchScript fuser; lt-timm does not script models: use --torchcompile'),
        'fast_norm': (S, ''), 'reparam': (S, ''), 'model_kwargs': (S, ''), 'torchcompile_mode': (S, ''),
        'torchscript': (R, _TS), 'torchcompile': (S, ''),
        'aot_autograd': (R, 'removed functorch AOT path; use --torchcompile aot_eager'),
        'results_file': (S, ''), 'results_format': (S, 'default: json for a .json --results-file, else csv'),
        'real_labels': (R, 'ImageNet-ReaL relabelling is not wired in; use timm\'s validate.py for ReaL accuracy'),
        'valid_labels': (R, 'label subsets (ImageNet-A/R) are not wired in; use timm\'s validate.py for them'),
        'retry': (R, 'batch-size halving on out-of-memory is not done; lower -b instead'),
        'seed': (S, 'also seeds the --consistency/--tta views'),
        'metrics_avg': (R, 'precision/recall/F1 are not computed; top-1/top-5/loss and the view-consistency '
                           'metrics are'),
        'naflex_loader': (R, _NAFLEX), 'naflex_max_seq_len': (R, _NAFLEX),
    },
}

# Supported options whose lt-timm default is not timm's, on purpose.
DEFAULT_DIFFERS: Dict[Tuple[str, str], str] = {
    ('validate', 'model'): 'resnet50 (as train.py) instead of dpn92',
    ('validate', 'results_format'): 'from the --results-file extension (.json: json), else csv',
}

# Keys a timm or lt-timm run namespace may hold beyond the parser's dests (computed at run time); -c ignores them.
COMPUTED_KEYS = ('prefetcher', 'distributed', 'world_size', 'rank', 'class_to_idx')


def timm_options() -> Dict[str, List[Dict[str, Any]]]:
    """The committed list of timm's options: ``{'train': [...], 'validate': [...]}`` (flags, dest, default, ...)."""
    from .timm_options import TIMM_OPTIONS
    return TIMM_OPTIONS


def _type(name: Optional[str]):
    return {'int': int, 'float': float, 'str': str, None: None}[name]


def add_refused_options(parser: argparse.ArgumentParser, script: str) -> None:
    """Register every refused timm option that ``parser`` lacks, with timm's flags, dest and default."""
    known = {a.dest for a in parser._actions}
    group = parser.add_argument_group('timm options lt-timm does not support',
                                      'Accepted at their timm default (e.g. in a timm args.yaml); any other value '
                                      'stops with the reason. See docs/parity.md.')
    for opt in timm_options()[script]:
        status, note = PARITY[script][opt['dest']]
        if status != R or opt['dest'] in known:
            continue
        kw: Dict[str, Any] = dict(dest=opt['dest'], default=opt['default'], help=f'not supported: {note}')
        if opt['action'] in ('store_true', 'store_false'):
            kw['action'] = opt['action']
        else:
            for key in ('nargs', 'const', 'choices'):
                if opt.get(key) is not None:
                    kw[key] = opt[key]
            if opt.get('type'):
                kw['type'] = _type(opt['type'])
        group.add_argument(*opt['flags'], **kw)


def check_refused(args: argparse.Namespace, script: str) -> None:
    """Stop with the option's name and the alternative when a refused timm option is not at its timm default."""
    for opt in timm_options()[script]:
        status, note = PARITY[script][opt['dest']]
        if status != R or not hasattr(args, opt['dest']):
            continue
        value = getattr(args, opt['dest'])
        if value != opt['default'] and not (_unset(value) and _unset(opt['default'])):
            flag = next((f for f in opt['flags'] if f.startswith('--')), opt['flags'][0])
            given = flag if isinstance(value, bool) else f'{flag} {value!r}'
            keep = 'drop it' if isinstance(value, bool) else f'leave it at timm\'s default {opt["default"]!r}'
            raise UserError(f'{given} is not supported by lt-timm ({script}.py): {note}; {keep} (see docs/parity.md).')


def _unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (list, str, dict)) and not value)
