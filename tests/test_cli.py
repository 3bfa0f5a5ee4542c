"""End-to-end runs of train.py / validate.py on tiny real and generated images (no mocks)."""
import csv
import json
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

import timm
from conftest import PYTHON, REPO, cli_env, make_image_folder

MNIST_FLAGS = ['--model', 'test_resnet', '--in-chans', '1', '--img-size', '28', '--mean', '0.1307', '--std', '0.3081',
               '--device', 'cpu', '--val-split', 'val', '--workers', '0', '--log-interval', '5', '--no-plot']
RGB_FLAGS = ['--model', 'test_resnet', '--img-size', '32', '--device', 'cpu', '--val-split', 'val',
             '--workers', '0', '--log-interval', '5', '--no-plot']


def run(script, *args, check=True, timeout=300, env=None):
    p = subprocess.run([PYTHON, str(REPO / script), *map(str, args)], cwd=REPO, env=env or cli_env(),
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f'{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def one_thread_env() -> dict:
    """For CLI runs that overlap (see `start`): one OpenMP thread each, so that two runs do not fight over two cores.
    Runs whose numbers a test compares all get it (same thread count, same arithmetic)."""
    return dict(cli_env(), OMP_NUM_THREADS='1')


def start(script, *args, env=None):
    """`run` in the background: a CLI start is seconds of single-core import, so independent runs overlap (with
    `one_thread_env` unless told otherwise). Output goes to files (no pipe to fill up); `finish` waits and returns
    what `run` returns."""
    out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
    p = subprocess.Popen([PYTHON, str(REPO / script), *map(str, args)], cwd=REPO, env=env or one_thread_env(),
                         stdout=out, stderr=err, text=True)
    p.script, p.files = script, (out, err)
    return p


def finish(p, check=True, timeout=300):
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    out, err = p.files
    out.seek(0)
    err.seek(0)
    done = subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())
    out.close()
    err.close()
    if check and done.returncode != 0:
        raise AssertionError(f'{p.script} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}')
    return done


def read_summary(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_clean_failure(p, *needles):
    """Exit 2, one 'error:' line that names the problem, no traceback."""
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-2000:]
    assert 'Traceback' not in out, out[-2000:]
    err_lines = [ln for ln in p.stderr.splitlines() if ln.startswith('error: ')]
    assert len(err_lines) == 1, out[-2000:]
    for needle in needles:
        assert needle.lower() in out.lower(), (needle, out[-2000:])


def test_train_validate_checkpoint_on_real_digits(mnist_small, tmp_path):
    out = tmp_path / 'out'
    p = run('train.py', '--data-dir', mnist_small, *MNIST_FLAGS, '-b', '24', '--epochs', '8', '--lr', '0.1',
            '--warmup-epochs', '0', '--smoothing', '0', '--hflip', '0', '--scale', '0.7', '1.0',
            '--loss', 'losstransform', '--aug-repeats', '3', '--output', out, '--experiment', 'lt',
            env=one_thread_env())  # as the two validate.py runs below, which overlap
    run_dir = out / 'lt'
    # timm's summary columns in timm's order, ours appended
    assert (run_dir / 'summary.csv').read_text().splitlines()[0].split(',') == [
        'epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr',
        'train_loss_base', 'train_loss_consistency', 'train_epoch_s', 'train_img_s']
    # timm's training log line, then the loss parts; its epoch mean is the summary's
    last = re.findall(r'Train: 7 \[\s*(\d+)/(\d+) \(\s*\d+%\)\]  Loss: (\S+) \((\S+)\)  Time: \S+s, +\S+/s  '
                      r'\(\S+s, +\S+/s\)  LR: \S+  Data: \S+ \(\S+\)  Base: (\S+) \((\S+)\)  '
                      r'Consistency: (\S+) \((\S+)\)', p.stdout + p.stderr)
    assert last and last[0][0] == '0' and int(last[-1][0]) + 1 == int(last[-1][1]), (p.stdout + p.stderr)[-3000:]
    now, mean, base_now, base_mean, cons_now, cons_mean = map(float, last[-1][2:])
    assert now == pytest.approx(base_now + cons_now, rel=2e-2) and mean == pytest.approx(base_mean + cons_mean, rel=2e-2)
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar'):
        assert (run_dir / name).exists(), name
    assert not (run_dir / 'tmp.pth.tar').exists()
    rows = read_summary(run_dir / 'summary.csv')
    assert [int(r['epoch']) for r in rows] == list(range(8))
    for r in rows:
        total, base, cons = float(r['train_loss']), float(r['train_loss_base']), float(r['train_loss_consistency'])
        assert cons > 0
        assert total == pytest.approx(base + 1.0 * cons, rel=1e-4)  # rho = 1
        assert float(r['train_img_s']) > 0 and float(r['train_epoch_s']) > 0
    assert mean == pytest.approx(float(rows[-1]['train_loss']), rel=5e-3)
    # It learned: 3 real digit classes, well above chance (33 %).
    assert max(float(r['eval_top1']) for r in rows) > 70.0

    # The checkpoint loads with timm's own factory and validate.py reproduces the best epoch's top-1 (and, in a
    # second validate.py run at the same time, the last epoch's).
    res, res_csv = tmp_path / 'val.json', tmp_path / 'val.csv'
    best_run = start('validate.py', '--data-dir', mnist_small, '--split', 'val', '--model', 'test_resnet',
                     '--checkpoint', run_dir / 'model_best.pth.tar', '--in-chans', '1', '--img-size', '28', '--mean',
                     '0.1307', '--std', '0.3081', '--device', 'cpu', '-j', '0', '--consistency', '4', '--tta', '4',
                     '--plot', tmp_path / 'fig3.png', '--results-file', res)
    last_run = start('validate.py', '--data-dir', mnist_small, '--split', 'val', '--model', 'test_resnet',
                     '--checkpoint', run_dir / 'last.pth.tar', '--in-chans', '1', '--img-size', '28', '--mean',
                     '0.1307', '--std', '0.3081', '--device', 'cpu', '-j', '0', '--results-file', res_csv)
    model = timm.create_model('test_resnet', num_classes=3, in_chans=1,
                              checkpoint_path=str(run_dir / 'model_best.pth.tar'))
    assert model.num_classes == 3
    finish(best_run)
    finish(last_run)
    r = json.loads(res.read_text())
    best = max(float(row['eval_top1']) for row in rows)
    assert r['top1'] == pytest.approx(best, abs=1e-3)
    timm_keys = ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size', 'crop_pct', 'interpolation']
    assert list(r)[:len(timm_keys)] == timm_keys  # timm validate.py's result keys, in its order, then ours
    assert r['top1_err'] == pytest.approx(100 - r['top1'], abs=1e-3) and r['img_size'] == 28
    assert 0 <= r['consistency_kl'] < 5 and 0 <= r['view_agreement'] <= 1 and 0 <= r['tta_top1'] <= 100
    assert (tmp_path / 'fig3.png').stat().st_size > 1000
    with open(res_csv) as f:
        row = next(csv.DictReader(f))
    assert float(row['top1']) == pytest.approx(float(rows[-1]['eval_top1']), abs=1e-3)


def test_yaml_config_round_trip(image_folder, tmp_path):
    """args.yaml written by a run, passed back with -c, gives the same arguments; flags override it."""
    from lt_timm.cli.train import parse_args
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text(yaml.safe_dump(dict(model='test_resnet', aug_repeats=3, loss='losstransform', lt_rho=0.5,
                                       lt_epoch='full', batch_size=12, mixup=0.1, cutmix=1.0, bce_loss=True)))
    args, text = parse_args(['-c', str(cfg), '--lt-rho', '2.0'])
    assert (args.loss, args.aug_repeats, args.lt_epoch, args.batch_size, args.bce_loss) == \
           ('losstransform', 3, 'full', 12, True)
    assert args.lt_rho == 2.0  # command line wins over the file
    saved = tmp_path / 'args.yaml'
    saved.write_text(text)
    again, _ = parse_args(['-c', str(saved)])
    assert vars(again) == vars(args)

    bad = tmp_path / 'bad.yaml'
    bad.write_text('aug_repeat: 3\n')
    p = run('train.py', '--data-dir', image_folder, '-c', bad, check=False)
    assert_clean_failure(p, 'unknown keys', 'aug_repeat')


def kill_after_first_checkpoint(cmd, run_dir: Path, timeout=240, env=None):
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / 'last.pth.tar').exists():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait()
    return proc.returncode


def test_killed_run_resumes_exactly(image_folder, tmp_path):
    """A run killed after its first checkpoint, resumed with --resume, ends where an uninterrupted run ends."""
    common = [*RGB_FLAGS, '-b', '12', '--epochs', '4', '--lr', '0.05', '--warmup-epochs', '1', '--no-aug',
              '--loss', 'losstransform', '--aug-repeats', '3', '--model-ema', '--model-ema-decay', '0.9',
              '--seed', '3', '--output', tmp_path]
    env = one_thread_env()  # all three runs: the uninterrupted one runs alongside the one that is killed
    straight_run = start('train.py', '--data-dir', image_folder, *common, '--experiment', 'straight', env=env)

    cmd = [PYTHON, str(REPO / 'train.py'), '--data-dir', str(image_folder), *map(str, common), '--experiment', 'killed']
    rc = kill_after_first_checkpoint(cmd, tmp_path / 'killed', env=env)
    ckpt = tmp_path / 'killed' / 'last.pth.tar'
    assert ckpt.exists()
    done = torch.load(ckpt, map_location='cpu', weights_only=False)['epoch']  # loads: written atomically
    assert rc != 0 or done == 3
    run('train.py', '--data-dir', image_folder, *common, '--experiment', 'killed', '--resume', ckpt, env=env)
    finish(straight_run)
    straight = read_summary(tmp_path / 'straight' / 'summary.csv')
    resumed = {int(r['epoch']): r for r in read_summary(tmp_path / 'killed' / 'summary.csv')}
    assert sorted(resumed)[-1] == 3
    for row in straight:
        e = int(row['epoch'])
        if e > done:
            for key in ('train_loss', 'train_loss_consistency', 'eval_loss', 'eval_top1', 'eval_noema_loss', 'lr'):
                assert float(resumed[e][key]) == pytest.approx(float(row[key]), rel=1e-4, abs=1e-6), (e, key)


@pytest.mark.parametrize('extra,needles', [
    (['--data-dir', '/nonexistent/data'], ['/nonexistent/data', 'does not exist']),
    (['--model', 'no_such_model_xyz'], ['unknown --model', 'no_such_model_xyz']),
    (['--aug-repeats', '16', '-b', '8'], ['--aug-repeats 16', 'batch size 8']),
    (['--loss', 'losstransform', '--aug-repeats', '0'], ['--aug-repeats >= 2']),
    (['--loss', 'losstransform', '--aug-repeats', '3', '--lt-rho', '-1'], ['--lt-rho']),
    (['--resume', '/nonexistent/last.pth.tar'], ['not found']),
])
def test_bad_flags_fail_clearly(image_folder, tmp_path, extra, needles, in_process):
    """train.py's main in this process (same door, exit 2, one error line); the other tests here run the process."""
    args = ['--data-dir', image_folder, *RGB_FLAGS, '-b', '12', '--epochs', '1', '--output', tmp_path,
            '--experiment', 'bad'] + extra
    p = in_process('train.py', *args, check=False)
    assert_clean_failure(p, *needles)
    assert not list(tmp_path.rglob('*.pth.tar'))


def test_unknown_loss_lists_choices(image_folder):
    p = run('train.py', '--data-dir', image_folder, '--loss', 'nope', check=False)
    assert p.returncode == 2
    assert 'losstransform' in p.stderr and 'nope' in p.stderr


def test_corrupt_image_names_the_file(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=6)
    bad = data / 'train' / 'class1' / 'broken.png'
    bad.write_bytes(b'this is not a png')
    # One batch of all 19 training images, so the broken file is always read; in a loader worker process.
    p = run('train.py', '--data-dir', data, *RGB_FLAGS, '-b', '19', '--epochs', '1', '--workers', '2',
            '--output', tmp_path / 'out', check=False)
    assert_clean_failure(p, 'broken.png', 'corrupt')
    assert not list((tmp_path / 'out').rglob('*.pth.tar'))


def test_incompatible_checkpoint(image_folder, tmp_path):
    other = timm.create_model('test_resnet', num_classes=7)
    ckpt = tmp_path / 'other.pth'
    torch.save({'state_dict': other.state_dict()}, ckpt)
    train_run = start('train.py', '--data-dir', image_folder, *RGB_FLAGS, '-b', '12', '--epochs', '1',
                      '--initial-checkpoint', ckpt, '--output', tmp_path / 'out')
    validate_run = start('validate.py', '--data-dir', image_folder, '--split', 'val', '--model', 'test_resnet',
                         '--checkpoint', ckpt, '--device', 'cpu', '-j', '0')
    assert_clean_failure(finish(train_run, check=False), 'does not fit', 'other.pth')
    assert_clean_failure(finish(validate_run, check=False), 'does not fit')


def test_nan_loss_stops_with_message(image_folder, tmp_path):
    p = run('train.py', '--data-dir', image_folder, *RGB_FLAGS, '-b', '12', '--epochs', '3', '--lr', '1e30',
            '--warmup-epochs', '0', '--output', tmp_path / 'out', '--experiment', 'nan', check=False)
    assert_clean_failure(p, 'diverged', '--lr')
    assert not list((tmp_path / 'out').rglob('tmp.pth.tar'))


def test_rsb_recipe_bce_mixup_cutmix_under_losstransform(image_folder, tmp_path, in_process):
    """ResNet-strikes-back style: BCE + mixup 0.1 / cutmix 1.0 + RandAugment + repeats 3, T(L) on top (train.py's
    main in this process)."""
    in_process('train.py', '--data-dir', image_folder, *RGB_FLAGS, '-b', '12', '--epochs', '1', '--bce-loss',
               '--bce-target-thresh', '0.2', '--mixup', '0.1', '--cutmix', '1.0', '--aa', 'rand-m7-mstd0.5-inc1',
               '--smoothing', '0', '--aug-repeats', '3', '--loss', 'losstransform', '--output', tmp_path,
               '--experiment', 'rsb')
    rows = read_summary(tmp_path / 'rsb' / 'summary.csv')
    assert float(rows[0]['train_loss_consistency']) > 0
    text = (tmp_path / 'rsb' / 'args.yaml').read_text()
    assert 'bce_loss: true' in text and 'loss: losstransform' in text


def test_torchrun_two_processes_gloo(image_folder, tmp_path):
    env = cli_env()
    p = subprocess.run(
        [PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         str(REPO / 'train.py'), '--data-dir', str(image_folder), *RGB_FLAGS, '-b', '6', '--epochs', '1',
         '--loss', 'losstransform', '--aug-repeats', '3', '--grad-accum-steps', '2', '--output', str(tmp_path),
         '--experiment', 'ddp'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert 'distributed mode' in out and 'process 1/2' in out
    # timm's defaults under DDP: BatchNorm statistics reduced over ranks each epoch; accumulation syncs once per step
    assert 'Distributing BatchNorm running means and vars after every epoch (--dist-bn reduce)' in out
    assert 'x 2 accumulated = 1 optimizer steps/epoch' in out
    rows = read_summary(tmp_path / 'ddp' / 'summary.csv')
    assert len(rows) == 1 and float(rows[0]['train_loss_consistency']) > 0


def test_jsd_peer_runs_with_aug_splits(image_folder, tmp_path):
    """The AugMix JSD peer (timm JsdCrossEntropy over --aug-splits) trains through the same CLI."""
    jsd_run = start('train.py', '--data-dir', image_folder, *RGB_FLAGS, '-b', '12', '--epochs', '1', '--loss', 'jsd',
                    '--aug-splits', '3', '--output', tmp_path, '--experiment', 'jsd')
    refused_run = start('train.py', '--data-dir', image_folder, *RGB_FLAGS, '--loss', 'jsd')
    finish(jsd_run)
    assert 'loss: jsd' in (tmp_path / 'jsd' / 'args.yaml').read_text()
    assert len(read_summary(tmp_path / 'jsd' / 'summary.csv')) == 1
    assert_clean_failure(finish(refused_run, check=False), '--aug-splits')


def test_torchcompile_trains_the_same_run_and_saves_loadable_weights(image_folder, tmp_path):
    """--torchcompile compiles model and loss (timm's flag; the cheap aot_eager backend runs forward and backward
    through the captured graphs on CPU): same losses and accuracy as eager, checkpoint without '_orig_mod.' keys."""
    common = [*RGB_FLAGS, '-b', '12', '--epochs', '1', '--warmup-epochs', '0', '--loss', 'losstransform',
              '--aug-repeats', '3', '--output', tmp_path]
    eager_run = start('train.py', '--data-dir', image_folder, *common, '--experiment', 'eager')
    comp_run = start('train.py', '--data-dir', image_folder, *common, '--experiment', 'compiled',
                     '--torchcompile', 'aot_eager')
    finish(eager_run)
    comp = finish(comp_run)
    assert 'Compiling model and loss with backend=aot_eager' in comp.stdout + comp.stderr
    (a,), (b,) = read_summary(tmp_path / 'eager' / 'summary.csv'), read_summary(tmp_path / 'compiled' / 'summary.csv')
    for key in ('train_loss', 'train_loss_consistency', 'eval_loss'):
        assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), key
    model = timm.create_model('test_resnet', num_classes=3, checkpoint_path=str(tmp_path / 'compiled' / 'last.pth.tar'))
    assert model is not None
