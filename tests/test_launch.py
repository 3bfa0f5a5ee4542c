"""lt_timm.launch: timm-style training scripts run unmodified with LossTransform.

The stand-ins under tests/stock_scripts/ have the hook points of timm's train.py (task API and the older
``train_one_epoch(..., loss_fn, ...)`` shape); they train a few steps of ``test_resnet`` on 12 generated 32x32
PNGs (one per class, so a target identifies its source image) and write what they trained with to
``evidence_rank{R}.json``.
"""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import yaml
from PIL import Image

import lt_timm
from lt_timm import launch
from lt_timm.layout import num_blocks, replica_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, 'tests', 'stock_scripts')
TASK = os.path.join(SCRIPTS, 'task_train.py')
LEGACY = os.path.join(SCRIPTS, 'legacy_train.py')
N_IMAGES = 12
M = 3


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """root/train/class_XX/img.png: one image per class, a base colour plus noise (so crops differ)."""
    root = tmp_path_factory.mktemp('lt_launch_data')
    rng = np.random.RandomState(0)
    for k in range(N_IMAGES):
        d = root / 'train' / f'class_{k:02d}'
        d.mkdir(parents=True)
        base = rng.randint(40, 215, size=3)
        pix = base[None, None, :] + rng.randint(-30, 31, size=(32, 32, 3))
        Image.fromarray(pix.astype(np.uint8)).save(d / 'img.png')
    return str(root)


@pytest.fixture(autouse=True)
def _restore_sys(monkeypatch):
    """load_script sets sys.argv and puts the script's folder on sys.path, as `python script.py` would."""
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))


def run_inprocess(script, argv, monkeypatch):
    """Load, patch and run a stand-in in this process, as ``python -m lt_timm.launch script argv`` does."""
    launch.run_script(script, [str(a) for a in argv])


def evidence(out_dir, rank=0):
    with open(os.path.join(out_dir, f'evidence_rank{rank}.json')) as f:
        return json.load(f)


def assert_grouped(batches, m=M):
    """Every batch is consecutive blocks of m replicas of one image (lt_timm.layout), distinct images per block."""
    assert batches
    for b in batches:
        groups = replica_groups(len(b), m).tolist()
        hard = not isinstance(b[0], list)
        rows = [tuple(r) if not hard else r for r in b]
        for g in set(groups):
            block = [rows[i] for i in range(len(rows)) if groups[i] == g]
            if hard:
                assert len(set(block)) == 1, f'block {g} mixes images: {b}'
            else:  # soft (mixup) targets: replicas keep identical targets
                assert np.allclose(np.array(block), np.array(block[0])), f'block {g} targets differ'
        if hard:
            assert len(set(b)) == num_blocks(len(b), m), f'an image fills more than one block: {b}'


def images_of(batches):
    return [set(b) for b in batches]


# --------------------------------------------------------------------------------------------- criteria

@pytest.mark.parametrize('script', ['task', 'legacy'])
@pytest.mark.parametrize('flags,base,distribution', [
    ([], 'CrossEntropyLoss', 'softmax'),
    (['--smoothing', '0.1'], 'LabelSmoothingCrossEntropy', 'softmax'),
    (['--mixup', '0.1', '--cutmix', '1.0'], 'SoftTargetCrossEntropy', 'softmax'),
    (['--mixup', '0.1', '--cutmix', '1.0', '--bce-loss'], 'BinaryCrossEntropy', 'bernoulli'),
])
def test_criterion_wrapped_and_batches_grouped(script, flags, base, distribution, data_root, tmp_path, monkeypatch,
                                               caplog):
    if script == 'legacy' and flags and flags[0] == '--mixup' and '--bce-loss' not in flags:
        flags = flags + ['--no-prefetcher']  # legacy run: mixup applied in the train loop (timm's Mixup)
    caplog.set_level(logging.INFO, logger='lt_timm.launch')
    out = tmp_path / 'out'
    run_inprocess(TASK if script == 'task' else LEGACY,
                  [data_root, '--loss', 'losstransform', '--aug-repeats', M, '--output', out] + flags, monkeypatch)
    ev = evidence(out)
    assert ev['criterion'] == 'LossTransform'
    assert ev['base_criterion'] == base
    assert f"distribution='{distribution}'" in ev['criterion_repr']
    assert ev['num_repeats'] == M and ev['rho'] == 1.0
    assert ev['last_consistency'] is not None and ev['last_consistency'] > 0
    assert ev['validate_criterion'] == 'CrossEntropyLoss'  # validation loss untouched
    assert_grouped(ev['batches'])
    text = caplog.text
    assert f'loss wrapped: LossTransform(base={base}' in text
    assert 'sampler: grouped repeats m=3, mode=v1' in text
    assert text.count('lt_timm.launch: patched') == 1


def test_loss_ce_leaves_timm_criterion(data_root, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    run_inprocess(TASK, [data_root, '--aug-repeats', M, '--smoothing', '0.1', '--output', out], monkeypatch)
    ev = evidence(out)
    assert ev['criterion'] == 'LabelSmoothingCrossEntropy' and ev['base_criterion'] is None
    assert_grouped(ev['batches'])  # --aug-repeats alone still groups replicas (one process too)


# --------------------------------------------------------------------------------------------- YAML

def test_yaml_lt_keys(data_root, tmp_path, monkeypatch):
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text(yaml.safe_dump(dict(
        loss='losstransform', aug_repeats=M, lt_rho=0.25, lt_epoch='full', lt_detach=True, smoothing=0.1)))
    out = tmp_path / 'yaml'
    run_inprocess(LEGACY, ['-c', cfg, data_root, '--output', out], monkeypatch)
    ev = evidence(out)
    assert ev['criterion'] == 'LossTransform' and ev['base_criterion'] == 'LabelSmoothingCrossEntropy'
    assert ev['rho'] == 0.25 and 'detach_consensus=True' in ev['criterion_repr']
    assert len(ev['batches']) == N_IMAGES * M // 12  # 'full': every image m times per epoch
    assert_grouped(ev['batches'])
    assert sorted(set().union(*images_of(ev['batches']))) == list(range(N_IMAGES))

    # command-line flags override the YAML, as for timm's own keys
    out2 = tmp_path / 'yaml_cli'
    run_inprocess(TASK, ['-c', cfg, data_root, '--lt-rho', '0.5', '--lt-epoch', 'v1', '--output', out2], monkeypatch)
    ev = evidence(out2)
    assert ev['rho'] == 0.5 and len(ev['batches']) == 1


@pytest.mark.parametrize('argv,match', [
    (['--loss', 'losstransform'], 'needs --aug-repeats >= 2'),
    (['--loss', 'losstransform', '--aug-repeats', '3', '-b', '2'], 'larger than the batch size'),
    (['-c', '{bad_yaml}', '--aug-repeats', '3'], "--loss 'bogus' is not supported"),
    (['--loss', 'losstransform', '--aug-repeats', '3', '--aug-splits', '3'], 'cannot be combined with --aug-repeats'),
])
def test_bad_flags_fail_before_training(argv, match, data_root, tmp_path, monkeypatch, capsys):
    bad_yaml = tmp_path / 'bad.yaml'
    bad_yaml.write_text('loss: bogus\n')
    argv = [a.format(bad_yaml=bad_yaml) for a in argv]
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        run_inprocess(TASK, [data_root, '--output', out] + argv, monkeypatch)
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------------- missing hooks

_HOOK_SCRIPT = {
    'imports': 'import argparse\nfrom timm.data import create_loader\n',
    'task': 'from timm.task import ClassificationTask\n',
    'parser': "parser = argparse.ArgumentParser()\nparser.add_argument('--aug-repeats', type=float, default=0)\n",
    'train': 'def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args):\n    pass\n',
    'main': 'def main():\n    open(MARKER, "w").write("trained")\n',
}


def _hook_script(tmp_path, drop=(), extra='', replace=None):
    parts = dict(_HOOK_SCRIPT, **(replace or {}))
    src = ''.join(v for k, v in parts.items() if k not in drop) + extra
    marker = tmp_path / 'trained.txt'
    path = tmp_path / 'hooks_train.py'
    path.write_text(f'MARKER = {str(marker)!r}\n' + src)
    return str(path), marker


@pytest.mark.parametrize('case,drop,replace,extra,match', [
    ('no parser', ('parser',), None, '', 'module-level `parser`'),
    ('no --aug-repeats', (), {'parser': 'parser = argparse.ArgumentParser()\n'}, '', '`--aug-repeats` option'),
    ('no create_loader', (), {'imports': 'import argparse\n'}, '', 'module-global `create_loader`'),
    ('no main', ('main',), None, '', '`main()`'),
    ('no criterion hook', ('task',), {'train': 'def train_one_epoch(epoch, model, loader, optimizer, args):\n'
                                               '    pass\n'}, '', 'criterion hook'),
    ('--loss clash', (), None, "parser.add_argument('--loss', default='ce')\n", 'already defines --loss'),
])
def test_missing_hook_is_a_clear_error(case, drop, replace, extra, match, tmp_path):
    path, marker = _hook_script(tmp_path, drop, extra, replace)
    module = launch.load_script(path, [])
    with pytest.raises(launch.LaunchError) as e:
        lt_timm.patch_timm_train(module)
    assert match in str(e.value)
    assert f'timm {timm.__version__}' in str(e.value)
    assert getattr(module, '_lt_timm_state', None) is None  # nothing patched
    assert not marker.exists()


def test_patch_api_on_complete_hook_script(tmp_path):
    path, _ = _hook_script(tmp_path)
    module = launch.load_script(path, [])
    state = lt_timm.patch_timm_train(module)
    assert state.task_classes == ['ClassificationTask'] and state.train_one_epoch_loss_fn
    assert module.ClassificationTask.__name__ == 'ClassificationTask'
    assert issubclass(module.ClassificationTask, timm.task.ClassificationTask)
    with pytest.raises(launch.LaunchError, match='already patched'):
        lt_timm.patch_timm_train(module)


def test_cli_missing_hook_exits_nonzero_without_training(tmp_path):
    path, marker = _hook_script(tmp_path, replace={'imports': 'import argparse\n'})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    r = subprocess.run([sys.executable, '-m', 'lt_timm.launch', path, '--aug-repeats', '3', '--loss', 'losstransform'],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 2, r.stderr
    assert 'create_loader' in r.stderr and f'timm {timm.__version__}' in r.stderr
    assert 'RuntimeWarning' not in r.stderr
    assert not marker.exists()


def test_unpatched_task_path_refuses_to_train(data_root, tmp_path, monkeypatch):
    """A task built through a path the launcher cannot patch (timm.task.X(...)) is caught before the first step."""
    src = open(TASK).read()
    src = src.replace('task = ClassificationTask(', 'task = timm.task.ClassificationTask(')
    src = src.replace('import yaml\n', 'import yaml\nimport timm.task\n')
    path = tmp_path / 'sneaky_train.py'
    path.write_text(src)
    out = tmp_path / 'out'
    with pytest.raises(launch.LaunchError, match='not LossTransform'):
        run_inprocess(str(path), [data_root, '--loss', 'losstransform', '--aug-repeats', M, '--output', out],
                      monkeypatch)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- DDP

def test_torchrun_two_process_ddp(data_root, tmp_path):
    out = tmp_path / 'ddp'
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'lt_timm.launch', TASK, data_root, '--device', 'cpu', '--loss', 'losstransform',
           '--aug-repeats', str(M), '-b', '6', '--epochs', '2', '--output', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev0, ev1 = evidence(out, 0), evidence(out, 1)
    assert ev0['world_size'] == ev1['world_size'] == 2
    for ev in (ev0, ev1):
        assert ev['criterion'] == 'LossTransform' and ev['base_criterion'] == 'CrossEntropyLoss'
        assert_grouped(ev['batches'])
    assert len(ev0['batches']) == len(ev1['batches']) == 2  # v1: 6 samples per rank per epoch, 2 epochs
    for b0, b1 in zip(ev0['batches'], ev1['batches']):
        assert not set(b0) & set(b1), 'ranks trained on the same image in one step'
    assert 'world_size=2' in r.stdout + r.stderr
