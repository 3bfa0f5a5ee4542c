"""timm parity: every timm train.py / validate.py option is recognised (supported or refused by name), timm's own
args.yaml loads with -c, and the supported options reach what they configure."""
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import timm
from lt_timm.errors import UserError
from lt_timm.cli.parity import COMPUTED_KEYS, DEFAULT_DIFFERS, PARITY, timm_options
from lt_timm.cli.parity_doc import render_markdown
from lt_timm.builders import (TRAIN_DATASET_OPTIONS, create_loaders, create_model_from, dataset_options,
                              open_datasets, prepare_model, resolve_eval_num_classes)
from lt_timm.cli.train import build_parser, parse_args, parse_config, resolve_dist_bn
from lt_timm.cli.validate import build_validate_parser
from lt_timm.cli.validate import parse_args as parse_validate_args
from lt_timm.config import LoopOptions, Ranks
from lt_timm.evaluation import load_eval_checkpoint
from lt_timm.trainer import Trainer
from lt_timm.training import create_optimizer, create_scheduler
from conftest import REPO, make_image_folder
from test_cli import RGB_FLAGS, assert_clean_failure, read_summary, run


def _actions(script):
    if script == 'train':
        config_parser, parser = build_parser()
        return {a.dest: a for p in (config_parser, parser) for a in p._actions}
    return {a.dest: a for a in build_validate_parser()._actions}


def test_docs_parity_table_is_up_to_date():
    assert (REPO / 'docs' / 'parity.md').read_text() == render_markdown(), \
        'regenerate with: python -m lt_timm.cli.parity_doc > docs/parity.md'


@pytest.mark.parametrize('script', ['train', 'validate'])
def test_every_timm_option_is_recognised_with_timm_names_and_defaults(script):
    actions = _actions(script)
    opts = timm_options()[script]
    assert len(opts) > (150 if script == 'train' else 50)
    assert {o['dest'] for o in opts} == set(PARITY[script]), 'every timm option is classified, nothing else'
    for o in opts:
        a = actions.get(o['dest'])
        assert a is not None, o['flags']
        assert set(o['flags']) <= set(a.option_strings) or (not a.option_strings and o['flags'] == [o['dest']])
        if (script, o['dest']) not in DEFAULT_DIFFERS:
            assert a.default == o['default'], (o['dest'], a.default, o['default'])
        status, note = PARITY[script][o['dest']]
        assert status in ('supported', 'refused') and (status == 'supported' or note)


def _timm_args_yaml(tmp_path: Path, **changes) -> Path:
    """An args.yaml as timm's train.py writes it (yaml.safe_dump of its namespace): every dest at timm's default."""
    cfg = {o['dest']: copy.deepcopy(o['default']) for o in timm_options()['train'] if o['dest'] != 'config'}
    cfg.update(dict.fromkeys(COMPUTED_KEYS[:2], False))
    cfg.update(changes)
    path = tmp_path / 'args.yaml'
    path.write_text(yaml.safe_dump(cfg, default_flow_style=False))
    return path


def test_timm_args_yaml_loads_with_c(tmp_path):
    path = _timm_args_yaml(tmp_path, model='test_resnet', grad_accum_steps=2, model_kwargs={'stem_width': 16},
                           lr_cycle_decay=0.3, dist_bn='broadcast', val_interval=3, aug_repeats=3.0)
    args, text = parse_args(['-c', str(path), '--lr-k-decay', '0.5'])
    assert (args.model, args.grad_accum_steps, args.model_kwargs, args.lr_cycle_decay, args.dist_bn,
            args.val_interval, args.aug_repeats, args.lr_k_decay) == \
           ('test_resnet', 2, {'stem_width': 16}, 0.3, 'broadcast', 3, 3, 0.5)
    assert not hasattr(args, 'prefetcher')  # a computed key of the saved namespace is not an option
    again, _ = parse_args(['-c', str(_write(tmp_path / 'ours.yaml', text))])  # our own args.yaml round-trips
    assert vars(again) == vars(args)

    with pytest.raises(UserError, match=r"unknown keys \['grad_acum_steps'\]"):
        parse_args(['-c', str(_timm_args_yaml(tmp_path, grad_acum_steps=2))])
    with pytest.raises(UserError, match='--naflex-loader is not supported.*NaFlex'):
        parse_args(['-c', str(_timm_args_yaml(tmp_path, naflex_loader=True))])
    with pytest.raises(UserError, match=r"--kd-model-name 'resnet50' is not supported.*distillation"):
        parse_args(['-c', str(_timm_args_yaml(tmp_path, kd_model_name='resnet50'))])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize('flags,needle', [
    (['--train-img-sizes', '32', '64'], '--train-img-sizes [32, 64] is not supported'),
    (['--torchscript'], '--torchscript is not supported'),
    (['--drop-connect', '0.1'], 'use --drop-path'),
    (['--tta', '2'], 'validate.py --tta'),
])
def test_refused_train_options_name_the_option(flags, needle):
    with pytest.raises(UserError, match=needle.replace('[', r'\[').replace(']', r'\]')):
        parse_args(['--data-dir', '/nonexistent', *flags])


def test_refused_options_exit_2_on_the_command_line(tmp_path):
    p = run('train.py', '--data-dir', tmp_path, '--kd-model-name', 'resnet18', check=False)
    assert_clean_failure(p, '--kd-model-name', 'distillation')
    p = run('validate.py', '--data-dir', tmp_path, '--retry', check=False)
    assert_clean_failure(p, '--retry', 'lower -b')


# ---------------------------------------------------------------- supported options reach what they configure

def _config(*flags):
    """train.py's settings for these flags, parsed and resolved as train.py does (no data is read)."""
    return parse_config(['--data-dir', '/nonexistent', '--model', 'test_resnet', *map(str, flags)])


def test_model_flags_reach_the_model():
    c = _config('--model-kwargs', 'stem_width=16', '--drop-block', '0.2', '--head-init-scale', '0.0',
                '--head-init-bias', '0.5', '--grad-checkpointing')
    model = prepare_model(c.model, create_model_from(c.model, 3), torch.device('cpu'), None)
    assert model.conv1[0].out_channels == 16
    assert any(type(m).__name__ == 'DropBlock2d' for m in model.modules())
    head = model.get_classifier()
    assert torch.all(head.weight == 0) and torch.all(head.bias == 0.5)
    assert model.grad_checkpointing

    c = _config('--model', 'test_efficientnet', '--bn-momentum', '0.2', '--bn-eps', '0.001',
                '--model-dtype', 'bfloat16')
    model = prepare_model(c.model, create_model_from(c.model, 3), torch.device('cpu'), c.precision.model_dtype)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.2 and m.eps == 0.001 for m in bns)
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match='--model-dtype bfloat16 cannot be combined with --amp'):
        _config('--model-dtype', 'bfloat16', '--amp')

    c = _config('--sync-bn')  # converted before DDP, and --dist-bn turned off, as timm (no data: a meta device)
    ddp = dataclasses.replace(c.ranks, distributed=True)
    model = prepare_model(c.model, create_model_from(c.model, 3), torch.device('meta'), None, ddp)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) and \
        resolve_dist_bn(c.loop.dist_bn, c.model.sync_bn, ddp.distributed) == ''
    with pytest.raises(UserError, match='--sync-bn needs GPU processes'):
        prepare_model(c.model, create_model_from(c.model, 3), torch.device('cpu'), None, ddp)
    with pytest.raises(UserError, match='--split-bn needs --aug-splits'):
        prepare_model(_config('--split-bn').model, create_model_from(_config().model, 3), torch.device('cpu'), None)


def test_optimizer_and_scheduler_flags():
    c = _config('--opt', 'adamw', '--opt-kwargs', 'amsgrad=True', '--lr', '0.1', '--sched', 'cosine',
                '--lr-cycle-decay', '0.3', '--lr-cycle-limit', '2', '--lr-k-decay', '0.5', '--lr-noise', '0.5',
                '--lr-noise-pct', '0.2', '--lr-noise-std', '0.7', '--epochs', '10')
    opt = create_optimizer(nn.Linear(2, 2), c.optim)
    assert opt.defaults['amsgrad'] is True
    sched, _ = create_scheduler(opt, c.optim, updates_per_epoch=1, start_epoch=0)
    assert (sched.cycle_decay, sched.cycle_limit, sched.k_decay, sched.noise_pct, sched.noise_std) == \
           (0.3, 2, 0.5, 0.2, 0.7)


def test_augmentation_flags_reach_the_train_transform(tmp_path):
    data = make_image_folder(tmp_path / 'd')
    c = _config('--data-dir', data, '--val-split', 'val', '--img-size', '32', '--workers', '0', '-b', '6',
                '--grayscale-prob', '0.5', '--gaussian-blur-prob', '0.3', '--color-jitter-prob', '0.8',
                '--worker-seeding', 'part', '--aug-repeats', '3', '--no-prefetcher')
    train_ds, eval_ds, _ = open_datasets(c.data, c.ranks)
    cfg = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    loader, _ = create_loaders(c.loader, train_ds, eval_ds, cfg, None, torch.device('cpu'))
    text = repr(loader.dataset.transform)
    assert 'RandomGrayscale(p=0.5)' in text and 'GaussianBlur' in text and 'RandomApply' in text
    assert loader.worker_init_fn.keywords['worker_seeding'] == 'part'


def test_dataset_options_apply_where_timm_uses_them():
    flags = ('--train-num-samples', '100', '--epoch-repeats', '2', '--val-num-samples', '10')
    data = _config(*flags).data
    with pytest.raises(UserError, match='--train-num-samples applies to tfds/wds/hfids datasets only'):
        dataset_options(data.dataset, data.extras, TRAIN_DATASET_OPTIONS, True)
    data = _config(*flags, '--dataset', 'wds/shards').data
    assert dataset_options(data.dataset, data.extras, TRAIN_DATASET_OPTIONS, True) == dict(num_samples=100, repeats=2.0)
    assert dataset_options(data.dataset, data.extras, TRAIN_DATASET_OPTIONS, False) == dict(num_samples=10)


def test_num_classes_of_a_dataset_without_reader():
    """torch/ datasets (torchvision) have no timm reader: the class count comes from their class_to_idx."""
    from lt_timm.data import class_to_idx_of

    class TorchStyle(torch.utils.data.Dataset):
        class_to_idx = {'cat': 0, 'dog': 1, 'eel': 2}

        def __len__(self):
            return 3

    assert class_to_idx_of(TorchStyle()) == TorchStyle.class_to_idx
    assert resolve_eval_num_classes(None, None, TorchStyle()) == 3
    assert resolve_eval_num_classes(7, None, TorchStyle()) == 7
    with pytest.raises(UserError, match='pass --num-classes'):
        resolve_eval_num_classes(None, None, torch.utils.data.TensorDataset(torch.zeros(2, 1)))


def test_use_ema_without_ema_weights_is_refused(tmp_path):
    model = timm.create_model('test_resnet', num_classes=3)
    ckpt = tmp_path / 'plain.pth.tar'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    c = parse_validate_args(['--model', 'test_resnet', '--checkpoint', str(ckpt), '--use-ema'])
    with pytest.raises(UserError, match='no EMA weights'):
        load_eval_checkpoint(model, c.checkpoint, c.use_ema, c.model.model, 3)
    load_eval_checkpoint(model, c.checkpoint, False, c.model.model, 3)


# ---------------------------------------------------------------- gradient accumulation

class _Steps:
    def __init__(self):
        self.updates = []

    def step_update(self, num_updates, metric=None):
        self.updates.append(num_updates)


def _accumulated_epoch(batch, accum, seed=0):
    """One epoch over the same 24 samples (no BatchNorm, no dropout): -b batch with --grad-accum-steps accum."""
    from timm.task import ClassificationTask
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(24, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    task = ClassificationTask(model=model, criterion=nn.CrossEntropyLoss(), device=torch.device('cpu'), verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    steps = []
    real_step = opt.step
    opt.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    loop = LoopOptions(mixup_off_epoch=0, prefetcher=False, ranks=Ranks(distributed=False, world_size=1, rank=0),
                       grad_accum_steps=accum, channels_last=False, check_loss_every_step=False,
                       clip_grad=None, clip_mode='norm', log_interval=50, synchronize_step=False,
                       save_images=False, recovery_interval=0)
    loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, 24, batch)]
    sched = _Steps()
    metrics = Trainer(task, opt, loader, torch.device('cpu'), loop, lr_scheduler=sched).train_epoch(0)
    return model, len(steps), sched.updates, metrics


def test_grad_accumulation_steps_like_the_large_batch():
    big, big_steps, big_updates, big_m = _accumulated_epoch(12, 1)
    acc, acc_steps, acc_updates, acc_m = _accumulated_epoch(6, 2)
    plain, plain_steps, _, _ = _accumulated_epoch(6, 1)
    assert (big_steps, acc_steps, plain_steps) == (2, 2, 4)  # half the optimizer steps of -b 6 alone
    assert big_updates == acc_updates == [1, 2]  # the scheduler counts optimizer steps
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert acc_m['loss'] == pytest.approx(big_m['loss'], rel=1e-6)  # logged loss: not divided by N
    assert any(not torch.allclose(p, q) for p, q in zip(big.parameters(), plain.parameters()))
    _, odd_steps, odd_updates, _ = _accumulated_epoch(6, 3)  # 4 micro-batches: 3 + a last, shorter 1
    assert odd_steps == 2 and odd_updates == [1, 2]


def test_train_cli_accumulation_val_interval_recovery_wandb(tmp_path):
    """One short run: --grad-accum-steps halves the optimizer steps, --val-interval 2 validates (and checkpoints)
    epochs 1 and 2 only, --recovery-interval writes recovery checkpoints, --log-wandb without wandb warns."""
    data = make_image_folder(tmp_path / 'd')
    p = run('train.py', '--data-dir', data, *RGB_FLAGS, '-b', '6', '--epochs', '3', '--warmup-epochs', '0',
            '--grad-accum-steps', '2', '--val-interval', '2', '--recovery-interval', '1', '--log-wandb',
            '--aug-repeats', '3', '--loss', 'losstransform', '--model-ema', '--model-ema-decay', '0.5',
            '--model-kwargs', 'stem_width=16', '--output', tmp_path / 'out', '--experiment', 'acc')
    out = p.stdout + p.stderr
    assert '4 batches/epoch x 2 accumulated = 2 optimizer steps/epoch' in out
    assert 'effective global batch size (12)' in out  # lr scaled by batch x world x accumulation, as timm
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert 'wandb but package not found' in out
    run_dir = tmp_path / 'out' / 'acc'
    rows = read_summary(run_dir / 'summary.csv')
    assert [int(r['epoch']) for r in rows] == [1, 2]
    assert not (run_dir / 'checkpoint-0.pth.tar').exists() and list(run_dir.glob('recovery-*.pth.tar'))
    saved = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert saved['grad_accum_steps'] == 2 and saved['model_kwargs'] == {'stem_width': 16}

    # validate.py: --use-ema reads the EMA weights, --results-format json, --log-freq, --model-kwargs, --test-pool
    res = tmp_path / 'v.txt'
    p = run('validate.py', '--data-dir', data, '--split', 'val', '--model', 'test_resnet', '--img-size', '32',
            '--checkpoint', run_dir / 'last.pth.tar', '--device', 'cpu', '-j', '0', '-b', '8', '--use-ema',
            '--model-kwargs', 'stem_width=16', '--log-freq', '1', '--test-pool', '--reparam',
            '--results-file', res, '--results-format', 'json')
    assert 'Test: [   2/2]' in p.stdout + p.stderr and ' * Acc@1 ' in p.stdout + p.stderr
    r = json.loads(res.read_text())
    assert r['top1'] == pytest.approx(float(rows[-1]['eval_top1']), abs=1e-3)


def test_options_common_to_train_and_validate_are_defined_once():
    """One parser source: every supported option that timm's train.py and validate.py define alike (same flags,
    default, type, nargs, action) comes from lt_timm.cli.flags.SHARED_OPTIONS, and both our parsers build it the
    same."""
    from lt_timm.cli.flags import SHARED_OPTIONS
    tr = {o['dest']: o for o in timm_options()['train']}
    va = {o['dest']: o for o in timm_options()['validate']}
    alike = {d for d in tr if d in va and tr[d] == va[d]}
    supported = {d for d in alike if PARITY['train'][d][0] == 'supported' and PARITY['validate'][d][0] == 'supported'}
    shared = {(kw.get('dest') or flags[-1].lstrip('-').replace('-', '_')) for flags, kw in SHARED_OPTIONS.values()}
    assert shared == supported, (sorted(supported - shared), sorted(shared - supported))
    train_actions = {a.dest: a for a in build_parser()[1]._actions}
    val_actions = {a.dest: a for a in build_validate_parser()._actions}
    fields = ('option_strings', 'default', 'type', 'nargs', 'const', 'choices', 'help', 'metavar')
    for d in supported:
        assert [getattr(train_actions[d], f) for f in fields] == [getattr(val_actions[d], f) for f in fields], d
