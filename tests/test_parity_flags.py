"""timm train.py / validate.py options that only change *how* a run goes (fast norm, loader type, random-erasing
split, saved batch images, device modules, eval size and crop, model dtype, compilation, DDP buffer handling):
each test checks the option's effect, with timm's own functions as the reference where there is one.

Runs in-process through the real entry points (``lt_timm.training.train`` / ``lt_timm.evaluation.run_validation``
/ the loader factory) to keep CI time low; the DDP check runs ``train`` in two gloo processes."""
import importlib.util
import logging
import math
import os
import random
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import timm
import timm.data
from timm.layers import is_fast_norm, set_fast_norm

import lt_timm.trainer as trainer_module
from lt_timm import evaluation
from lt_timm.builders import create_loaders, open_datasets
from lt_timm.cli.train import parse_args, parse_config, resolve
from lt_timm.cli.validate import parse_args as parse_validate_args
from lt_timm.evaluation import run_validation
from lt_timm.trainer import Trainer
from lt_timm.training import train
from conftest import make_image_folder

# Small images and a tiny BatchNorm model; --check-images none: the images are generated just above.
TRAIN_FLAGS = ['--model', 'test_resnet', '--img-size', '32', '--device', 'cpu', '--val-split', 'val', '--workers', '0',
               '--log-interval', '5', '--no-plot', '--check-images', 'none', '-b', '6', '--epochs', '1',
               '--warmup-epochs', '0']


@pytest.fixture(scope='module')
def data(tmp_path_factory, one_thread):
    """3 classes x 8 images of 32 px per split: 4 training batches of 6."""
    return make_image_folder(tmp_path_factory.mktemp('flags') / 'data')


@pytest.fixture
def restore_fast_norm():
    """--fast-norm flips a process-wide timm switch (as in timm's scripts): start with it off, put it back after."""
    before = is_fast_norm()
    set_fast_norm(False)
    yield
    set_fast_norm(before)


# ---------------------------------------------------------------------------------------------- train.py

def test_train_fast_norm_save_images_device_modules_wandb(data, tmp_path, monkeypatch, caplog, restore_fast_norm):
    """One real in-process training run with --fast-norm, --save-images, --device-modules, --synchronize-step,
    --use-multi-epochs-loader, --resplit and --log-wandb: each takes effect (or is accepted, see below) and the run
    completes."""
    probe = 'lt_timm_probe_device_module'
    (tmp_path / f'{probe}.py').write_text('IMPORTED_BY = "--device-modules"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(probe, None)
    has_wandb = importlib.util.find_spec('wandb') is not None
    flags = ['--data-dir', str(data), *TRAIN_FLAGS, '--output', str(tmp_path / 'out'), '--experiment', 'flags',
             '--fast-norm', '--save-images', '--device-modules', probe,
             # torch.cuda.synchronize() after each optimizer step on CUDA; on the CPU it is a no-op, so this run can
             # only show that timm's flag is accepted and training goes on.
             '--synchronize-step',
             '--use-multi-epochs-loader', '--resplit', '--reprob', '0.5']
    if not has_wandb:  # never install wandb for this; without it, timm warns and trains on
        flags.append('--log-wandb')
    args, text = parse_args(flags)
    try:
        with caplog.at_level(logging.WARNING):
            result = train(resolve(args, text))
        assert is_fast_norm()  # timm's switch: norm layers created from now on take the fast path
        assert sys.modules[probe].IMPORTED_BY == '--device-modules'
    finally:
        sys.modules.pop(probe, None)
    assert math.isfinite(result['top1']) and math.isfinite(result['loss'])
    if not has_wandb:
        assert "You've requested to log metrics to wandb but package not found" in caplog.text
    # timm: the batch of every --log-interval step (5: batches 0 and 3, the last) as one JPEG grid (padding 0)
    run_dir = tmp_path / 'out' / 'flags'
    saved = sorted(p.name for p in run_dir.glob('train-batch-*.jpg'))
    assert saved == ['train-batch-0.jpg', 'train-batch-3.jpg']
    for name in saved:
        with Image.open(run_dir / name) as im:
            assert im.format == 'JPEG' and im.size == (6 * 32, 32)  # torchvision's grid: 8 per row, 6 images
            lo, hi = im.convert('L').getextrema()
            assert hi - lo > 50  # real image content, not a blank frame


def _loader_args(data, *flags):
    return parse_config(['--data-dir', str(data), *TRAIN_FLAGS, *flags])


def _train_loader(config):
    train_ds, eval_ds, _ = open_datasets(config.data, config.ranks)
    cfg = timm.data.resolve_data_config(dict(config.data_config_args),
                                        model=timm.create_model('test_resnet', num_classes=3))
    loader, _ = create_loaders(config.loader, train_ds, eval_ds, cfg, None, torch.device('cpu'))
    return loader


def test_use_multi_epochs_loader_is_timms_loader(data):
    """--use-multi-epochs-loader: timm's MultiEpochsDataLoader (behind the prefetcher); refused with --aug-repeats,
    whose grouped batch order changes every epoch."""
    loader = _train_loader(_loader_args(data, '--use-multi-epochs-loader'))
    assert isinstance(loader.loader, timm.data.loader.MultiEpochsDataLoader)
    assert not isinstance(_train_loader(_loader_args(data)).loader, timm.data.loader.MultiEpochsDataLoader)
    with pytest.raises(ValueError, match='--use-multi-epochs-loader is not supported with --aug-repeats'):
        _train_loader(_loader_args(data, '--use-multi-epochs-loader', '--aug-repeats', '3'))


@pytest.mark.parametrize('resplit', [True, False])
def test_resplit_keeps_the_first_split_clean(data, resplit):
    """--resplit (no --aug-splits): as timm, random erasing (prefetcher, per batch) spares the first half of each
    batch. --remode const erases to 0, a value normalised pixels never take (the ImageNet mean is not an integer)."""
    args = _loader_args(data, '--reprob', '1.0', '--remode', 'const', *(['--resplit'] if resplit else []))
    loader = _train_loader(args)
    random.seed(0)
    torch.manual_seed(0)
    x, _ = next(iter(loader))
    erased = [(img == 0).sum().item() > 0 for img in x]
    assert len(erased) == 6 and all(erased[3:])
    assert erased[:3] == ([False] * 3 if resplit else [True] * 3)


# ---------------------------------------------------------------------------------------------- validate.py

# test_resnet has no test size; give it one (as pretrained configs do) so that --use-train-size matters.
_OVERLAY = "pretrained_cfg_overlay={'input_size': (3, 32, 32), 'test_input_size': (3, 40, 40)}"


def _validate(data, ckpt, *flags, monkeypatch):
    """run_validation as validate.py runs it; returns its results and the (model, loader) it validated."""
    seen = {}
    real = evaluation.validate

    def record(model, loader, *a, **k):  # observe only: the real validation runs
        seen.update(model=model, loader=loader)
        return real(model, loader, *a, **k)

    monkeypatch.setattr(evaluation, 'validate', record)
    config = parse_validate_args([
        '--data-dir', str(data), '--split', 'val', '--model', 'test_resnet', '--checkpoint', str(ckpt),
        '--model-kwargs', _OVERLAY, '--device', 'cpu', '-j', '0', '-b', '8', '--log-freq', '0', *flags])
    return run_validation(config), seen['model'], seen['loader']


def test_validate_train_size_border_crop_dtype_compile_fast_norm(data, tmp_path, monkeypatch, restore_fast_norm):
    overlay = dict(input_size=(3, 32, 32), test_input_size=(3, 40, 40))
    ref_model = timm.create_model('test_resnet', num_classes=3, pretrained_cfg_overlay=overlay)
    ckpt = tmp_path / 'model.pth.tar'
    torch.save({'state_dict': ref_model.state_dict()}, ckpt)
    flags = ['--use-train-size', '--crop-border-pixels', '2', '--model-dtype', 'bfloat16']
    compiled, c_model, c_loader = _validate(data, ckpt, *flags, '--fast-norm', '--torchcompile', 'eager',
                                            monkeypatch=monkeypatch)
    assert is_fast_norm()
    plain, p_model, p_loader = _validate(data, ckpt, *flags, monkeypatch=monkeypatch)

    # --use-train-size: timm's data config without the test size (which it would use otherwise)
    train_cfg = timm.data.resolve_data_config({}, model=ref_model, use_test_size=False)
    assert timm.data.resolve_data_config({}, model=ref_model, use_test_size=True)['input_size'] == (3, 40, 40)
    assert compiled['img_size'] == plain['img_size'] == train_cfg['input_size'][-1] == 32
    # --crop-border-pixels: the eval transform is timm's, trimmed by that border
    reference = timm.data.create_transform(**train_cfg, crop_border_pixels=2, use_prefetcher=True)
    assert 'TrimBorder' in repr(reference)
    assert repr(c_loader.dataset.transform) == repr(p_loader.dataset.transform) == repr(reference)
    # --model-dtype: weights and images in bfloat16, finite results
    for model, loader in ((c_model, c_loader), (p_model, p_loader)):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert loader.img_dtype == torch.bfloat16
    for r in (compiled, plain):
        assert all(math.isfinite(r[k]) for k in ('top1', 'top5', 'loss'))
    # --torchcompile (eager backend on CPU): the compiled model gives the uncompiled one's results
    assert isinstance(c_model, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(p_model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled['top1'] == plain['top1'] and compiled['top5'] == plain['top5']
    assert compiled['loss'] == pytest.approx(plain['loss'], rel=1e-3)


# ---------------------------------------------------------------------------------------------- DDP (gloo, CPU)

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _bn_worker(rank, world_size, ports, data, out_dir):
    """One rank: train.py's train() twice (--dist-bn reduce, then off with --no-ddp-bb), recording the DDP wrapper
    it trained, its BatchNorm buffers at the end of the epoch (this rank's own) and as handed to validation (after
    --dist-bn, before any forward)."""
    os.environ.update(MASTER_ADDR='127.0.0.1', RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    seen = {}
    real_validate, real_epoch = trainer_module.validate, Trainer.train_epoch

    def record_validate(model, *a, **k):  # observe only: called after the epoch's --dist-bn, before any forward
        seen.setdefault('bn', {n: b.detach().clone() for n, b in model.named_buffers() if 'running_' in n})
        return real_validate(model, *a, **k)

    def record_epoch(trainer, epoch, *a, **k):  # observe only: the real epoch runs; then its own BatchNorm statistics
        metrics = real_epoch(trainer, epoch, *a, **k)
        seen['ddp'] = ddp = trainer.task.get_trainable_module()
        seen['own'] = {n: b.detach().clone() for n, b in ddp.named_buffers() if 'running_' in n}
        return metrics

    trainer_module.validate, Trainer.train_epoch = record_validate, record_epoch
    for (name, flags), port in zip((('reduce', []), ('off', ['--dist-bn', '', '--no-ddp-bb'])), ports):
        seen.clear()
        os.environ['MASTER_PORT'] = str(port)
        args, text = parse_args(['--data-dir', data, *TRAIN_FLAGS, '--output', out_dir, '--experiment', name, *flags])
        train(resolve(args, text))
        ddp = seen['ddp']
        torch.save(dict(own=seen['own'], bn=seen['bn'], ddp=type(ddp).__name__,
                        broadcast_buffers=ddp.broadcast_buffers), os.path.join(out_dir, f'{name}{rank}.pt'))
        torch.distributed.destroy_process_group()


def test_dist_bn_reduce_equalises_batchnorm_statistics_over_ranks(data, tmp_path):
    """Two gloo processes, different images per rank: with --dist-bn reduce (default) both ranks' BatchNorm running
    mean/var are the mean of the ranks' own after the epoch (timm's distribute_bn); with --dist-bn '' (timm's off)
    each rank keeps its own, which differ. --no-ddp-bb reaches DDP (broadcast_buffers off)."""
    # fork, as DataLoader workers: the children start with torch, timm and lt_timm imported (spawn re-imports: ~10 s)
    mp.start_processes(_bn_worker, args=(2, (_free_port(), _free_port()), str(data), str(tmp_path)), nprocs=2,
                       start_method='fork')
    got = {(name, r): torch.load(tmp_path / f'{name}{r}.pt') for name in ('reduce', 'off') for r in range(2)}
    for name, broadcast in (('reduce', True), ('off', False)):
        for r in range(2):
            assert got[name, r]['ddp'] == 'DistributedDataParallel'
            assert got[name, r]['broadcast_buffers'] is broadcast
    bn0, bn1 = got['reduce', 0]['bn'], got['reduce', 1]['bn']
    assert len(bn0) > 4 and bn0.keys() == bn1.keys()
    assert any(not torch.all(v == 0) for k, v in bn0.items() if 'running_mean' in k)  # trained, not the init
    own0, own1 = got['reduce', 0]['own'], got['reduce', 1]['own']
    assert any(not torch.allclose(own0[k], own1[k]) for k in own0)  # the ranks saw different images
    for k in bn0:
        assert torch.equal(bn0[k], bn1[k]), k
        torch.testing.assert_close(bn0[k], (own0[k] + own1[k]) / 2, msg=k)  # reduce: the mean, not rank 0's
    off0, off1 = got['off', 0]['bn'], got['off', 1]['bn']
    for r, off in enumerate((off0, off1)):
        assert all(torch.equal(off[k], got['off', r]['own'][k]) for k in off)  # untouched
    assert any(not torch.allclose(off0[k], off1[k]) for k in off0)
