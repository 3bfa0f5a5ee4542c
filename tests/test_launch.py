"""lt_timm.launch: timm-style training scripts run unmodified with LossTransform.

The stand-ins under tests/stock_scripts/ have the hook points of timm's train.py (task API and the older
``train_one_epoch(..., loss_fn, ...)`` shape); they train a few steps of ``test_resnet`` on 12 generated 32x32
PNGs (one per class, so a target identifies its source image) and write what they trained with to
``evidence_rank{R}.json`` (and a checkpoint per epoch, for ``--resume``). Edited variants of them (plausible upstream
edits: renamed functions, ``timm.task.X`` / ``timm.data.create_loader`` attribute paths, ``create_classification_loss``,
losses or loaders built elsewhere) are made at run time by text substitution (:func:`variant`).
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

import torch
from torch.utils.data import dataloader as torch_dataloader

import lt_timm
from lt_timm import launch, launch_state
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend (20x slower on a loaded 2-core machine)
    yield
    torch.set_num_threads(threads)
    launch_state.deactivate()  # a test that patched without running leaves its hooks installed


def variant(tmp_path, script, subs, name='edited_train.py'):
    """A copy of a stand-in with text substitutions ``[(old, new), ...]`` (each ``old`` must occur)."""
    src = open(script).read()
    for old, new in subs:
        assert old in src, f'{old!r} not in {script}'
        src = src.replace(old, new)
    path = tmp_path / name
    path.write_text(src)
    return str(path)


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
    via = 'ClassificationTask.criterion' if script == 'task' else 'train_one_epoch(loss_fn)'
    epoch_from = 'set_epoch() by the script' if script == 'task' else 'train_one_epoch(epoch=)'
    assert text.count('first optimizer step verified') == 1
    assert (f'first optimizer step verified: criterion LossTransform via {via}, base loss {base} '
            f'(selected by --smoothing' in text)
    assert (f'm=3, rho=1.0, targets {"soft, equal per image" if "--mixup" in flags else "equal per image"}, '
            f'epoch mode v1, sampler RepeatedAugBatchSampler (grouped: 12 rows = 4 images x 3, world_size=1, '
            f'seed=42, epoch 0 from {epoch_from})') in text


def test_loss_ce_leaves_timm_criterion(data_root, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger='lt_timm.launch')
    out = tmp_path / 'out'
    run_inprocess(TASK, [data_root, '--aug-repeats', M, '--smoothing', '0.1', '--output', out], monkeypatch)
    ev = evidence(out)
    assert ev['criterion'] == 'LabelSmoothingCrossEntropy' and ev['base_criterion'] is None
    assert_grouped(ev['batches'])  # --aug-repeats alone still groups replicas (one process too)
    assert ('first optimizer step verified: criterion not wrapped (ClassificationTask.criterion = '
            'LabelSmoothingCrossEntropy) (--loss ce), m=3, epoch mode v1, sampler RepeatedAugBatchSampler'
            ) in caplog.text


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


# --------------------------------------------------------------------------------------------- patch-time errors

_HOOK_SCRIPT = {
    'imports': 'import argparse\nimport torch\nfrom timm.data import create_loader\n',
    'task': 'from timm.task import ClassificationTask\n',
    'parser': "parser = argparse.ArgumentParser()\nparser.add_argument('--aug-repeats', type=float, default=0)\n",
    'train': 'def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args):\n    pass\n',
    'main': 'def main():\n    args = parser.parse_args()\n    open(MARKER, "w").write("done")\n',
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
    ('no main', ('main',), None, '', '`main()`'),
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
    assert launch_state.active() is None
    assert not marker.exists()


def test_patch_installs_hooks_and_close_restores_them(tmp_path):
    import timm.models
    import timm.task.task
    from torch.optim import optimizer as torch_optimizer
    originals = (timm.data.create_loader, timm.data.loader.create_loader, timm.models.resume_checkpoint,
                 timm.task.resume_task_checkpoint, torch_dataloader._BaseDataLoaderIter.__next__)
    n_hooks = len(torch_optimizer._global_optimizer_pre_hooks), len(torch_optimizer._global_optimizer_post_hooks)
    path, _ = _hook_script(tmp_path)
    module = launch.load_script(path, [])
    state = lt_timm.patch_timm_train(module)
    assert timm.data.create_loader is not originals[0] and timm.data.loader.create_loader is timm.data.create_loader
    assert module.create_loader is timm.data.create_loader  # the script's own global too
    assert timm.models.resume_checkpoint is not originals[2]
    assert '__setattr__' in vars(timm.task.task.TrainingTask)
    assert state.train_functions == state.loss_fn_functions == ['train_one_epoch']
    assert len(torch_optimizer._global_optimizer_pre_hooks) == n_hooks[0] + 1
    assert 'parse_known_args' in vars(module.parser)  # the flags hook wraps the script's parser
    with pytest.raises(launch.LaunchError, match='already patched'):
        lt_timm.patch_timm_train(module)
    state.close()
    assert (timm.data.create_loader, timm.data.loader.create_loader, timm.models.resume_checkpoint,
            timm.task.resume_task_checkpoint, torch_dataloader._BaseDataLoaderIter.__next__) == originals
    assert '__setattr__' not in vars(timm.task.task.TrainingTask)
    assert 'parse_known_args' not in vars(module.parser)  # argparse's own method again
    assert (len(torch_optimizer._global_optimizer_pre_hooks), len(torch_optimizer._global_optimizer_post_hooks)) \
        == n_hooks
    assert launch_state.active() is None


# --------------------------------------------------------------------------------------------- upstream edits

_TASK_ATTR = [('import yaml\n', 'import yaml\nimport timm.task\n'),
              ('task = ClassificationTask(', 'task = timm.task.ClassificationTask(')]
_TASK_RENAMED = [('def train_one_epoch(', 'def run_epoch('), ('seen = train_one_epoch(', 'seen = run_epoch(')]
_TASK_TIMM_DATA = [('import yaml\n', 'import yaml\nimport timm.data\n'),
                   ('loader_train = create_loader(', 'loader_train = timm.data.create_loader(')]

EDITS = {  # name -> (stand-in, substitutions, flags, base loss, hook that wrapped it)
    'train_one_epoch renamed, timm.task.ClassificationTask': (
        TASK, _TASK_ATTR + _TASK_RENAMED, ['--smoothing', '0.1'], 'LabelSmoothingCrossEntropy',
        'ClassificationTask.criterion'),
    'train loader from timm.data.create_loader': (
        TASK, _TASK_TIMM_DATA, [], 'CrossEntropyLoss', 'ClassificationTask.criterion'),
    'task criterion_kwargs (create_classification_loss)': (
        TASK, [('task = ClassificationTask(model=model, criterion=train_loss_fn,',
                'task = ClassificationTask(model=model, criterion_kwargs=dict(smoothing=args.smoothing),')],
        ['--smoothing', '0.1'], 'LabelSmoothingCrossEntropy', 'ClassificationTask.criterion'),
    'create_classification_loss, train function renamed': (
        LEGACY, [('import yaml\n', 'import yaml\nimport timm.loss\n'),
                 ('    validate_loss_fn = nn.CrossEntropyLoss()\n',
                  '    train_loss_fn = timm.loss.create_classification_loss(smoothing=args.smoothing)\n'
                  '    validate_loss_fn = nn.CrossEntropyLoss()\n'),
                 ('def train_one_epoch(', 'def fit_epoch('), ('seen = train_one_epoch(', 'seen = fit_epoch(')],
        ['--smoothing', '0.1'], 'LabelSmoothingCrossEntropy', 'fit_epoch(loss_fn)'),
    'timm.data.loader.create_loader under another name': (
        LEGACY, [('import yaml\n', 'import yaml\nfrom timm.data.loader import create_loader as build_loader\n'),
                 ('loader_train = create_loader(', 'loader_train = build_loader(')],
        ['--mixup', '0.1', '--cutmix', '1.0', '--bce-loss'], 'BinaryCrossEntropy', 'train_one_epoch(loss_fn)'),
}


@pytest.mark.parametrize('edit', list(EDITS))
def test_upstream_edits_still_train_with_losstransform(edit, data_root, tmp_path, monkeypatch, caplog):
    script, subs, flags, base, via = EDITS[edit]
    caplog.set_level(logging.INFO, logger='lt_timm.launch')
    out = tmp_path / 'out'
    run_inprocess(variant(tmp_path, script, subs),
                  [data_root, '--loss', 'losstransform', '--aug-repeats', M, '--output', out] + flags, monkeypatch)
    ev = evidence(out)
    assert ev['criterion'] == 'LossTransform' and ev['base_criterion'] == base
    assert ev['last_consistency'] is not None and ev['last_consistency'] > 0
    assert_grouped(ev['batches'])
    assert (f'first optimizer step verified: criterion LossTransform via {via}, base loss {base} (selected by'
            in caplog.text)


REFUSALS = {  # name -> (stand-in, substitutions, flags, what the error says)
    'loss computed outside the hooks': (
        LEGACY, [('loss = loss_fn(output, target)', 'loss = nn.functional.cross_entropy(output, target)')], [],
        'no LossTransform ran on this batch'),
    'train loader built without num_aug_repeats': (
        TASK, [('num_aug_repeats=args.aug_repeats,', 'num_aug_repeats=0,')], [],
        "batch sampler BatchSampler(RandomSampler), not from lt_timm's grouped sampler"),
    'validation loss trained as the training loss': (
        LEGACY, [('optimizer, train_loss_fn, args', 'optimizer, validate_loss_fn, args')], ['--smoothing', '0.1'],
        'LossTransform wraps CrossEntropyLoss, but the script\'s flags (--smoothing 0.1) select '
        'LabelSmoothingCrossEntropy'),
    'loss on part of the batch': (
        TASK, [("loss = task(input, target)['loss']", "loss = task(input[:6], target[:6])['loss']")], [],
        'LossTransform got 6 rows but the grouped sampler yields 12 rows per step'),
}


@pytest.mark.parametrize('edit', list(REFUSALS))
def test_unhooked_paths_refuse_before_the_first_step(edit, data_root, tmp_path, monkeypatch):
    script, subs, flags, match = REFUSALS[edit]
    out = tmp_path / 'out'
    with pytest.raises(launch.LaunchError) as e:
        run_inprocess(variant(tmp_path, script, subs),
                      [data_root, '--loss', 'losstransform', '--aug-repeats', M, '--output', out] + flags, monkeypatch)
    assert match in str(e.value)
    assert 'before the first optimizer step, so nothing was trained' in str(e.value)
    assert not out.exists()  # no checkpoint, no evidence
    assert launch_state.active() is None


def test_refused_step_exits_nonzero_from_the_cli(data_root, tmp_path):
    path = variant(tmp_path, TASK, [('num_aug_repeats=args.aug_repeats,', 'num_aug_repeats=0,')])
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    r = subprocess.run([sys.executable, '-m', 'lt_timm.launch', path, data_root, '--aug-repeats', '3', '--loss',
                        'losstransform', '--output', str(out)],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith('lt_timm.launch: error:')]
    assert len(errors) == 1 and 'grouped sampler' in errors[0] and f'timm {timm.__version__}' in errors[0]
    assert 'RuntimeWarning' not in r.stderr
    assert not out.exists()


def test_run_without_a_verified_step_is_an_error(tmp_path):
    path, marker = _hook_script(tmp_path)
    with pytest.raises(launch.LaunchError, match='finished without an optimizer step'):
        launch.run_script(path, ['--loss', 'losstransform', '--aug-repeats', '3'])
    assert marker.exists()  # main() ran; it just never trained
    launch.run_script(path, ['--aug-repeats', '3'])  # --loss ce: nothing to verify


def test_training_data_not_from_a_dataloader_is_refused(tmp_path):
    path, marker = _hook_script(tmp_path, replace={'main': (
        'def main():\n'
        '    args = parser.parse_args()\n'
        '    model = torch.nn.Linear(4, 3)\n'
        '    opt = torch.optim.SGD(model.parameters(), lr=0.1)\n'
        '    torch.nn.functional.cross_entropy(model(torch.randn(6, 4)), torch.zeros(6).long()).backward()\n'
        '    opt.step()\n'
        '    open(MARKER, "w").write("trained")\n')})
    with pytest.raises(launch.LaunchError, match='no torch DataLoader batch at all'):
        launch.run_script(path, ['--loss', 'losstransform', '--aug-repeats', '3'])
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- epoch / resume

_NO_EPOCH_PARAM = [('def train_one_epoch(epoch, model', 'def train_one_epoch(ep, model'),
                   ("_logger.info(f'Train: {epoch} loss", "_logger.info(f'Train: {ep} loss")]


@pytest.mark.parametrize('script,subs,resume,source', [
    (TASK, [], 'resume', 'set_epoch() by the script'),  # timm master: _set_loader_epoch every epoch
    (LEGACY, [], 'resume', 'train_one_epoch(epoch=)'),  # timm <= 1.0.28: set_epoch only when distributed
    (LEGACY, _NO_EPOCH_PARAM, 'resume', 'resume_checkpoint() return value'),
    (LEGACY, _NO_EPOCH_PARAM, 'start-epoch', '--start-epoch'),
], ids=['task', 'legacy', 'legacy-no-epoch-arg', 'legacy-start-epoch'])
def test_resume_continues_the_sampler_order(script, subs, resume, source, data_root, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger='lt_timm.launch')
    path = variant(tmp_path, script, subs)
    common = [data_root, '--loss', 'losstransform', '--aug-repeats', M, '--epochs', 3]
    full = tmp_path / 'full'
    run_inprocess(path, common + ['--output', full], monkeypatch)
    ev = evidence(full)
    assert ev['batch_epochs'] == [0, 1, 2]  # v1, 12 images, -b 12: one step per epoch
    assert len({tuple(b) for b in ev['batches']}) == 3  # each epoch its own order
    caplog.clear()
    again = tmp_path / 'resumed'
    how = ['--resume', full / 'checkpoint-1.pth.tar'] if resume == 'resume' else ['--start-epoch', 2]
    run_inprocess(path, common + how + ['--output', again], monkeypatch)
    ev2 = evidence(again)
    assert ev2['start_epoch'] == 2 and ev2['batch_epochs'] == [2]
    assert ev2['batches'] == ev['batches'][2:]  # epoch 2's order, not a replay of epoch 0's
    assert f'epoch 2 from {source})' in caplog.text


def test_resume_with_unknown_epoch_is_refused(data_root, tmp_path, monkeypatch):
    path = variant(tmp_path, LEGACY, _NO_EPOCH_PARAM + [(
        'resume_epoch = resume_checkpoint(model, args.resume, optimizer=optimizer, log_info=False)',
        'ckpt = torch.load(args.resume, weights_only=False)\n'
        '        model.load_state_dict(ckpt["state_dict"])\n'
        '        resume_epoch = ckpt["epoch"] + 1')])
    common = [data_root, '--loss', 'losstransform', '--aug-repeats', M]
    run_inprocess(path, common + ['--epochs', 1, '--output', tmp_path / 'first'], monkeypatch)
    out = tmp_path / 'out'
    with pytest.raises(launch.LaunchError, match='could not tell which epoch the run resumes at'):
        run_inprocess(path, common + ['--epochs', 2, '--resume', tmp_path / 'first' / 'checkpoint-0.pth.tar',
                                      '--output', out], monkeypatch)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- DDP

def test_torchrun_two_process_ddp(data_root, tmp_path):
    """The issue's edits under DDP: timm.data.create_loader, timm.task.ClassificationTask, renamed train function."""
    path = variant(tmp_path, TASK, _TASK_ATTR + _TASK_RENAMED + _TASK_TIMM_DATA)
    out = tmp_path / 'ddp'
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'lt_timm.launch', path, data_root, '--device', 'cpu', '--loss', 'losstransform',
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
    logs = r.stdout + r.stderr
    assert 'world_size=2' in logs
    assert logs.count('first optimizer step verified: criterion LossTransform via ClassificationTask.criterion') == 1


# ---------------------------------------------------------------- evaluation scripts (timm's validate.py shape)

_EVAL_PARTS = dict(_HOOK_SCRIPT, parser="parser = argparse.ArgumentParser()\nparser.add_argument('--checkpoint')\n")


def test_evaluation_script_runs_unpatched(tmp_path, capsys):
    """No ``--aug-repeats``, no function taking an optimizer: the script's ``main()`` runs as it is (no hook
    installed), with lt_timm's models registered."""
    path, marker = _hook_script(tmp_path, drop=('train',), replace=_EVAL_PARTS)
    create_loader = timm.data.create_loader
    assert launch.is_evaluation_script(launch.load_script(path, []))
    assert launch.main([path, '--checkpoint', 'x.pth']) == 0
    assert marker.read_text() == 'done'
    assert launch_state.active() is None and timm.data.create_loader is create_loader
    assert timm.is_model('cifar_resnet20')  # lt_timm's registrations are there for the script


@pytest.mark.parametrize('flags', [['--loss', 'losstransform'], ['--lt-rho=2']])
def test_evaluation_script_refuses_losstransform_flags(flags, tmp_path, capsys):
    path, marker = _hook_script(tmp_path, drop=('train',), replace=_EVAL_PARTS)
    assert launch.main([path, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'evaluates and trains nothing' in err[0] and flags[0].split('=')[0] in err[0]
    assert not marker.exists()


def test_evaluation_script_that_steps_an_optimizer_is_refused(tmp_path, capsys):
    """A script misread as an evaluation script cannot train unhooked: its first optimizer step stops the run."""
    main = ('def main():\n    import torch\n    w = torch.nn.Parameter(torch.ones(2))\n'
            '    opt = torch.optim.SGD([w], lr=0.1)\n    w.sum().backward()\n    opt.step()\n'
            '    open(MARKER, "w").write(str(w.tolist()))\n')
    path, marker = _hook_script(tmp_path, drop=('train',), replace=dict(_EVAL_PARTS, main=main))
    assert launch.main([path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'steps an optimizer' in err[0] and 'nothing was trained' in err[0]
    assert not marker.exists()
    w = torch.nn.Parameter(torch.ones(1))
    torch.optim.SGD([w], lr=1.0).step()  # the guard is gone after the run
