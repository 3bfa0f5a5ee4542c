"""Real processes stopped the way users and machines stop them: ``kill -9`` at every file operation of an epoch's
end, Ctrl-C and SIGTERM, a full disk (``RLIMIT_FSIZE``), a read-only folder, a DDP process that dies. Each time the
run folder must be one that ``--resume`` turns into exactly what the uninterrupted run wrote, and the user must read
one line that says what happened and how to go on (and following it must work).

The processes are children of one fork server (``tests/kill_harness.py``: torch and timm imported once), each
running the repository's real ``train.py`` main; the faults are the children's own (the product has no test hooks).
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, make_image_folder
from test_cli import RGB_FLAGS, one_thread_env, read_summary

TIME_COLUMNS = ('train_epoch_s', 'train_img_s', 'train_epoch_time', 'eval_time')  # train.py, train_detection.py
FLAGS = [*RGB_FLAGS, '-b', '6', '--epochs', '2', '--warmup-epochs', '0', '--lr', '0.05', '--seed', '1']


class Harness:
    """The fork server: ``run(argv, **options)`` runs train.py's main in a child (see tests/kill_harness.py) and
    returns ``(reply, stdout, stderr)``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen([PYTHON, str(REPO / 'tests' / 'kill_harness.py')], cwd=REPO,
                                     env=one_thread_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.n = 0

    def run(self, argv, **options):
        self.n += 1
        out, err = self.folder / f'{self.n}.out', self.folder / f'{self.n}.err'
        cmd = dict(argv=[str(a) for a in argv], out=str(out), err=str(err), **options)
        self.proc.stdin.write(json.dumps(cmd) + '\n')
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply, out.read_text(), err.read_text()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope='module')
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp('harness'))
    yield h
    h.close()


@pytest.fixture(scope='module')
def reference(harness, tmp_path_factory):
    """The uninterrupted run, its file operations traced: ``(data, run folder, operations)``."""
    root = tmp_path_factory.mktemp('reference')
    data = make_image_folder(root / 'd', classes=3, per_class=4)
    out, trace = root / 'out', root / 'trace.jsonl'
    reply, _, err = harness.run([*FLAGS, '--data-dir', data, '--output', out, '--experiment', 'r'],
                                fault=dict(watch=str(out), kill_at=-1, torn=False, trace=str(trace)))
    assert reply['code'] == 0, err[-3000:]
    ops = [json.loads(line) for line in trace.read_text().splitlines()]
    return data, out / 'r', ops


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)


def assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    """The same files, summary rows (timings aside), checkpoint epochs, metrics and weights as the reference."""
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
    strip = (lambda rows: [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rows])
    assert strip(read_summary(run_dir / 'summary.csv')) == strip(read_summary(ref_dir / 'summary.csv'))
    for ckpt in sorted(ref_dir.glob('*.pth.tar')):
        mine, ref = load(run_dir / ckpt.name), load(ckpt)
        assert (mine['epoch'], mine.get('metric')) == (ref['epoch'], ref.get('metric')), ckpt.name
        assert mine['state_dict'].keys() == ref['state_dict'].keys()
        assert all(torch.equal(mine['state_dict'][k], ref['state_dict'][k]) for k in ref['state_dict']), ckpt.name


def test_kill_at_every_file_operation_of_an_epoch_end(harness, reference, tmp_path):
    """kill -9 before each file operation from epoch 0's checkpoint to the run's end, and in the middle of each
    write (a torn checkpoint, a torn summary row); then --resume: the folder ends as the uninterrupted run's."""
    data, ref_dir, ops = reference
    first = next(i for i, op in enumerate(ops) if op['path'] == 'tmp.pth.tar')
    points = [(i, False) for i in range(first, len(ops))] + \
             [(i, True) for i in range(first, len(ops)) if ops[i]['op'] == 'open']
    assert any(op['path'] == 'summary.csv' for op in ops[first:]) and len(points) >= 12
    for i, torn in points:
        out = tmp_path / f'kill{i}{"-torn" if torn else ""}'
        argv = [*FLAGS, '--data-dir', data, '--output', out, '--experiment', 'r']
        reply, _, _ = harness.run(argv, fault=dict(watch=str(out), kill_at=i, torn=torn, trace=str(out) + '.jsonl'))
        assert reply['signal'] == signal.SIGKILL, (i, ops[i])
        run_dir = out / 'r'
        if not (run_dir / 'last.pth.tar').exists():  # before epoch 0 was committed: nothing claims an epoch
            claims = [p.name for p in run_dir.glob('*.pth.tar') if p.name != 'tmp.pth.tar']
            assert not claims and not read_summary_rows_of(run_dir), (i, ops[i])
            continue
        reply, _, err = harness.run([*argv, '--resume', run_dir / 'last.pth.tar'])
        assert reply['code'] == 0, (i, ops[i], err[-2000:])
        assert_same_run(run_dir, ref_dir)


def read_summary_rows_of(run_dir: Path) -> list:
    path = run_dir / 'summary.csv'
    return read_summary(path) if path.exists() else []


# ---------------------------------------------------------------- one line, and following it works

def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith('error: ')]


def assert_one_line(reply, err: str, code: int, *needles) -> str:
    """Exit ``code``, no traceback, one ``error:`` line holding ``needles``; returns the line."""
    assert reply['code'] == code, err[-3000:]
    assert 'Traceback' not in err, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def printed_resume_args(line: str, run_dir: Path, script: str = 'train.py') -> list:
    """The arguments of the resume command the error line prints (after the script), checked to resume
    ``run_dir``."""
    command = shlex.split(line.split('to continue: ', 1)[1])
    assert command[:2] == ['python', script] and command[-2:] == ['--resume', str(run_dir / 'last.pth.tar')]
    return command[2:]


@pytest.mark.parametrize('name,code,said', [('SIGINT', 130, 'stopped by Ctrl-C (SIGINT)'),
                                            ('SIGTERM', 143, 'stopped by SIGTERM')])
def test_signal_stops_with_one_line_the_lock_released_and_a_resume_command_that_works(
        harness, reference, tmp_path, name, code, said):
    data, ref_dir, _ = reference
    ref3 = tmp_path / 'ref' / 'r'
    argv = [*FLAGS, '--epochs', '3', '--data-dir', data, '--experiment', 'r']
    harness.run([*argv, '--output', ref3.parent])
    run_dir = tmp_path / 'out' / 'r'
    reply, _, err = harness.run([*argv, '--output', run_dir.parent],
                                signal=dict(name=name, when_exists=str(run_dir / 'last.pth.tar')))
    line = assert_one_line(reply, err, code, said, 'the run folder is unlocked')
    assert not (run_dir / '.lock').exists()
    reply, _, err = harness.run(printed_resume_args(line, run_dir))
    assert reply['code'] == 0, err[-3000:]
    assert_same_run(run_dir, ref3)


def test_signal_stops_validate_with_one_line(harness, reference, tmp_path):
    """validate.py: Ctrl-C in the middle of its loop is one line and exit 130, nothing written."""
    data, ref_dir, _ = reference
    res = tmp_path / 'v.json'
    reply, _, err = harness.run(['--data-dir', data, '--split', 'val', '--model', 'test_resnet', '--img-size', '32',
                                 '--device', 'cpu', '-j', '0', '-b', '1', '--log-freq', '1', '--consistency', '64',
                                 '--checkpoint', ref_dir / 'last.pth.tar', '--results-file', res],
                                script='validate.py', signal=dict(name='SIGINT', when_logged='Test: ['))
    assert_one_line(reply, err, 130, 'stopped by Ctrl-C (SIGINT)', 'nothing was written')
    assert not res.exists()


def killed_before_epoch_1_checkpoint(harness, reference, out: Path) -> Path:
    """A run folder as a kill leaves it just before epoch 1's checkpoint is written (epoch 0 committed)."""
    data, _, ops = reference
    i = [k for k, op in enumerate(ops) if op['path'] == 'tmp.pth.tar'][1]
    reply, _, _ = harness.run([*FLAGS, '--data-dir', data, '--output', out, '--experiment', 'r'],
                              fault=dict(watch=str(out), kill_at=i, torn=False, trace=str(out) + '.jsonl'))
    assert reply['signal'] == signal.SIGKILL
    return out / 'r'


def test_file_size_limit_keeps_the_last_checkpoint_and_no_partial_file(harness, reference, tmp_path):
    """RLIMIT_FSIZE below a checkpoint's size (as a full disk): one line naming the file and the limit, the
    previous last.pth.tar untouched, no tmp.pth.tar; raising the limit and resuming, as it says, ends the run as the
    uninterrupted one."""
    data, ref_dir, _ = reference
    run_dir = killed_before_epoch_1_checkpoint(harness, reference, tmp_path / 'out')
    last = run_dir / 'last.pth.tar'
    before = last.read_bytes()
    argv = [*FLAGS, '--data-dir', data, '--output', run_dir.parent, '--experiment', 'r', '--resume', last]
    reply, _, err = harness.run(argv, rlimit_fsize=len(before) // 3)
    assert_one_line(reply, err, 2, 'cannot write the checkpoint of epoch 1', 'File too large',
                    f'raise the file-size limit (ulimit -f), then --resume {last}', 'nothing of epoch 1 was saved')
    assert last.read_bytes() == before and not (run_dir / 'tmp.pth.tar').exists()
    assert not (run_dir / '.lock').exists()
    reply, _, err = harness.run(argv)
    assert reply['code'] == 0, err[-3000:]
    assert_same_run(run_dir, ref_dir)


def test_read_only_folder_is_one_line(harness, reference, tmp_path):
    """A folder the user cannot write (chmod 555; the run drops root, for which chmod does not apply)."""
    if os.geteuid() != 0 and os.access('/', os.W_OK):
        pytest.skip('cannot make a folder read-only for this user')
    root = Path(tempfile.mkdtemp(prefix='lt_ro_'))  # world-readable, unlike pytest's tmp_path
    try:
        root.chmod(0o755)
        data = shutil.copytree(reference[0], root / 'd')
        ro = root / 'ro'
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        user = 65534 if os.geteuid() == 0 else None
        reply, _, err = harness.run([*FLAGS, '--data-dir', data, '--output', ro / 'out', '--experiment', 'r'],
                                    user=user)
        assert_one_line(reply, err, 2, f'cannot make the run folder {ro / "out"}', 'Permission denied',
                        'pass a folder you can write to')
        assert not (ro / 'out').exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize('flags,needles', [
    (['--lr', '1e39'], ['--lr 1e+39 is larger than the largest float32 number (3.403e+38)', 'pass a smaller --lr']),
    (['--lr', '1e5', '--model-dtype', 'float16'], ['--lr 100000 is larger than the largest float16 number (6.55e+04)']),
    (['--lr', 'nan'], ['--lr must be a finite number >= 0, got nan']),
    (['--warmup-lr', '-1'], ['--warmup-lr must be a finite number >= 0, got -1.0']),
    # without --lr: timm's rule, --lr-base x 6 / 256 rows (linear for SGD); the error names --lr-base, not --lr
    (['--lr-base', '1e41'], ['--lr-base 1e+41 gives the learning rate 2.34375e+39 for a global batch of 6 (linear',
                             'pass a smaller --lr-base or --lr']),
    (['--lr-base', 'nan'], ['--lr-base must be a finite number >= 0, got nan']),
    (['--lr-base-size', '0'], ['--lr-base-size must be >= 1', 'got 0']),
])
def test_a_learning_rate_the_optimizer_cannot_apply_is_one_line(harness, reference, tmp_path, flags, needles):
    """torch's optimizers stop at the first step with a traceback ('value cannot be converted to type float without
    overflow') for an lr beyond the weights' dtype: one line before any folder is made; the advice (a smaller --lr),
    followed, trains."""
    data = reference[0]
    argv = [*FLAGS, '--data-dir', data, '--output', tmp_path / 'out', '--experiment', 'r']
    if flags[0].startswith('--lr-base'):
        i = argv.index('--lr')
        argv = argv[:i] + argv[i + 2:]
    reply, _, err = harness.run([*argv, *flags])
    assert_one_line(reply, err, 2, *needles)
    assert not (tmp_path / 'out').exists()
    if flags[:2] == ['--lr', '1e39']:
        reply, _, err = harness.run([*argv, '--lr', '0.1'])
        assert reply['code'] == 0, err[-3000:]
        assert [r['epoch'] for r in read_summary(tmp_path / 'out' / 'r' / 'summary.csv')] == ['0', '1']


# ---------------------------------------------------------------- DDP: a process that dies

def _rank_pid(parent: int, rank: int):
    """The pid of torchrun's worker ``rank`` (a child of ``parent``), from /proc."""
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
            env = (entry / 'environ').read_bytes().split(b'\0')
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f'RANK={rank}'.encode() in env:
            return int(entry.name)
    return None


def kill_rank_1_after_first_checkpoint(cmd: list, last: Path, logs: Path, cwd, env) -> str:
    """Run ``cmd`` (torchrun with 2 processes, ``--log-dir logs --redirects 3``); once ``last`` exists, kill -9 of
    process 1. Returns process 0's stderr, torchrun having exited non-zero."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None and proc.poll() is None, 'the run ended before process 1 could be killed'
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    return next(logs.glob('*/attempt_0/0/stderr.log')).read_text()


def printed_torchrun_command(err: str, head: list, last: Path, prefix: str = 'error: ') -> list:
    """The resume command of process 0's one line (after ``torchrun --nproc_per_node 2``), checked to start with
    ``head`` and to resume from ``last``."""
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    assert 'lost another process' in lines[0] or 'stopped by SIGTERM' in lines[0], lines[0]
    command = shlex.split(lines[0].split('to continue: ', 1)[1])
    assert command[:3] == ['torchrun', '--nproc_per_node', '2'] and command[3:3 + len(head)] == head, command
    assert command[-2:] == ['--resume', str(last)]
    return command[3:]


def follow_torchrun(args: list, logs: Path, cwd, env) -> str:
    """Run ``torchrun --nproc_per_node 2 ARGS`` as printed (``--standalone``: a free rendezvous port, as tests run
    side by side); returns process 0's stderr, the run having exited 0."""
    cmd = [PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--log-dir', str(logs),
           '--redirects', '3', *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
    err = next(logs.glob('*/attempt_0/0/stderr.log')).read_text()
    assert r.returncode == 0, err[-3000:]
    return err


def test_ddp_process_killed_leaves_one_line_on_the_other_saying_how_to_resume(reference, tmp_path):
    """torchrun, 2 gloo processes; kill -9 of process 1 after the first checkpoint: process 0 stops with one line
    (what happened, the torchrun command that resumes), exit status non-zero, the run folder unlocked; the printed
    command, followed, finishes the run (every epoch's row in summary.csv)."""
    data, run_dir = reference[0], tmp_path / 'out' / 'ddp'
    last, epochs = run_dir / 'last.pth.tar', 30  # 0.1 s an epoch: the run is still going when process 1 is killed
    argv = [*FLAGS, '--epochs', str(epochs), '--data-dir', str(data), '--output', str(run_dir.parent),
            '--experiment', 'ddp']
    cmd = [PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--log-dir',
           str(tmp_path / 'logs'), '--redirects', '3', str(REPO / 'train.py'), *argv]
    err = kill_rank_1_after_first_checkpoint(cmd, last, tmp_path / 'logs', REPO, one_thread_env())
    args = printed_torchrun_command(err, ['train.py'], last)
    assert load(last)['epoch'] >= 0 and not (run_dir / '.lock').exists()
    follow_torchrun(args, tmp_path / 'resumed', REPO, one_thread_env())
    assert [r['epoch'] for r in read_summary(run_dir / 'summary.csv')] == [str(e) for e in range(epochs)]
    assert load(last)['epoch'] == epochs - 1 and not (run_dir / '.lock').exists()


# ---------------------------------------------------------------- train_detection.py: the same guarantees

def detection_argv(root: Path, out: Path, *extra) -> list:
    return ['-c', root / 'cfg.yaml', '--data-dir', root / 'PennFudanPed', '--epochs', '2', '--device', 'cpu',
            '--no-plot', '--output', out, '--experiment', 'r', *extra]


@pytest.fixture(scope='module')
def detection_reference(harness, tmp_path_factory):
    """An uninterrupted 2-epoch detection run, its file operations traced: ``(root, run folder, operations)``."""
    from test_detection import TINY_CFG, write_pennfudan
    root = tmp_path_factory.mktemp('detection')
    write_pennfudan(str(root / 'PennFudanPed'), 5)
    (root / 'cfg.yaml').write_text(TINY_CFG + 'lt_epoch: full\n')
    out, trace = root / 'out', root / 'trace.jsonl'
    reply, _, err = harness.run(detection_argv(root, out), script='train_detection.py',
                                fault=dict(watch=str(out), kill_at=-1, torn=False, trace=str(trace)))
    assert reply['code'] == 0, err[-3000:]
    return root, out / 'r', [json.loads(line) for line in trace.read_text().splitlines()]


def test_detection_kill_at_every_file_operation_of_an_epoch_end(harness, detection_reference, tmp_path):
    """train_detection.py: kill -9 before each file operation of both epoch ends and in the middle of each write,
    then --resume: the same summary rows and checkpoint (weights included) as the uninterrupted run."""
    root, ref_dir, ops = detection_reference
    first = next(i for i, op in enumerate(ops) if op['path'].startswith('last.pth.tar.'))
    points = [(i, False) for i in range(first, len(ops))] + \
             [(i, True) for i in range(first, len(ops)) if ops[i]['op'] == 'open']
    assert [op['path'] for op in ops[first:] if op['op'] == 'open'] == [ops[first]['path'], 'summary.csv'] * 2
    for i, torn in points:
        out = tmp_path / f'kill{i}{"-torn" if torn else ""}'
        argv = detection_argv(root, out)
        reply, _, _ = harness.run(argv, script='train_detection.py',
                                  fault=dict(watch=str(out), kill_at=i, torn=torn, trace=str(out) + '.jsonl'))
        assert reply['signal'] == signal.SIGKILL, (i, ops[i])
        run_dir = out / 'r'
        if not (run_dir / 'last.pth.tar').exists():  # before epoch 0 was committed: nothing claims an epoch
            assert not read_summary_rows_of(run_dir), (i, ops[i])
            continue
        reply, _, err = harness.run([*argv, '--resume', run_dir / 'last.pth.tar'], script='train_detection.py')
        assert reply['code'] == 0, (i, ops[i], err[-2000:])
        assert_same_run(run_dir, ref_dir)


def test_detection_sigterm_is_one_line_and_its_resume_command_works(harness, detection_reference, tmp_path):
    root, ref_dir, _ = detection_reference
    run_dir = tmp_path / 'out' / 'r'
    reply, _, err = harness.run(detection_argv(root, run_dir.parent), script='train_detection.py',
                                signal=dict(name='SIGTERM', when_exists=str(run_dir / 'last.pth.tar')))
    line = assert_one_line(reply, err, 143, 'stopped by SIGTERM', 'the run folder is unlocked')
    assert not (run_dir / '.lock').exists()
    args = printed_resume_args(line, run_dir, 'train_detection.py')
    reply, _, err = harness.run(args, script='train_detection.py')
    assert reply['code'] == 0, err[-3000:]
    assert_same_run(run_dir, ref_dir)


def test_detection_file_size_limit_keeps_the_last_checkpoint(harness, detection_reference, tmp_path):
    root, ref_dir, ops = detection_reference
    out = tmp_path / 'out'
    second = [i for i, op in enumerate(ops) if op['path'].startswith('last.pth.tar.')][1]
    argv = detection_argv(root, out)
    harness.run(argv, script='train_detection.py',
                fault=dict(watch=str(out), kill_at=second, torn=False, trace=str(out) + '.jsonl'))
    last = out / 'r' / 'last.pth.tar'
    before = last.read_bytes()
    reply, _, err = harness.run([*argv, '--resume', last], script='train_detection.py',
                                rlimit_fsize=len(before) // 3)
    assert_one_line(reply, err, 2, 'cannot write the checkpoint of epoch 1', 'File too large',
                    f'raise the file-size limit (ulimit -f), then --resume {last}', 'nothing of epoch 1 was saved')
    assert last.read_bytes() == before and not list((out / 'r').glob('*.tmp'))
    reply, _, err = harness.run([*argv, '--resume', last], script='train_detection.py')
    assert reply['code'] == 0, err[-3000:]
    assert_same_run(out / 'r', ref_dir)


def detection_main(capsys, *argv):
    """train_detection.py's main in this process: (exit status, its one error line or '')."""
    from lt_timm.cli.detection import main
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) <= 1 and 'Traceback' not in err, err[-3000:]
    return code, lines[0] if lines else ''


def test_detection_resume_compares_the_experiment_and_the_data(detection_reference, tmp_path, capsys, one_thread):
    """One error naming each changed option (not --lr, which a resumed run may lower, nor --epochs: the step
    schedule does not depend on it) or the data; following 'drop these flags' resumes; args.yaml is the run's."""
    from test_detection import write_pennfudan
    root, ref_dir, _ = detection_reference
    run_dir = tmp_path / 'r'
    shutil.copytree(ref_dir, run_dir)
    last, args_yaml = run_dir / 'last.pth.tar', (run_dir / 'args.yaml').read_text()
    base = ['-c', root / 'cfg.yaml', '--data-dir', root / 'PennFudanPed', '--device', 'cpu', '--no-plot',
            '--resume', last]
    code, line = detection_main(capsys, *base, '--lt-rho', '0.5', '--aug-repeats', '3', '--seed', '1')
    assert code == 2 and '--lt-rho 0.5 (the run: 1.0)' in line and '--aug-repeats 3 (the run: 2)' in line
    assert '--seed 1 (the run: 42)' in line and 'Drop these flags' in line and 'a new run (without --resume)' in line
    write_pennfudan(str(tmp_path / 'more'), 6)
    code, line = detection_main(capsys, *base, '--data-dir', tmp_path / 'more')
    assert code == 2 and "data is not the run's: 4 training images (the run: 3)" in line
    code, line = detection_main(capsys, *base, '--epochs', '3', '--lr', '0.01', '--workers', '0')
    assert code == 0, line
    rows = read_summary(run_dir / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1', '2'] and float(rows[2]['lr']) == pytest.approx(0.001)
    assert (run_dir / 'args.yaml').read_text() == args_yaml
    record = (run_dir / 'args-resume-2.yaml').read_text()
    assert record.startswith('# resumed at epoch 2 with: --lr 0.01 (the run: 0.02)')


@pytest.mark.parametrize('content,needle', [('model: [maskrcnn\n', 'not valid YAML'),
                                            ('model: !!python/object/apply:os.system ["true"]\n', 'not valid YAML')])
def test_detection_bad_yaml_is_one_line(tmp_path, capsys, content, needle):
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text(content)
    code, line = detection_main(capsys, '-c', cfg, '--data-dir', tmp_path, '--output', tmp_path / 'out')
    assert code == 2 and str(cfg) in line and needle in line
    assert not (tmp_path / 'out').exists()


def test_detection_divergence_advice_followed_resumes(detection_reference, tmp_path, capsys, one_thread):
    """'lower --lr or --clip-grad, then --resume last.pth.tar', followed: accepted, and the run finishes."""
    root, _, _ = detection_reference
    out = tmp_path / 'out'
    argv = [*detection_argv(root, out), '-b', '2', '--clip-grad', '0', '--lr-steps', '1', '--lr-gamma', '1e32']
    code, line = detection_main(capsys, *argv)  # epoch 1's lr 2e30: its second step's loss is not finite
    last = out / 'r' / 'last.pth.tar'
    assert code == 2 and 'diverged' in line and f'then --resume {last}' in line and 'lower --lr' in line
    code, line = detection_main(capsys, *argv, '--lr', '1e-34', '--resume', last)  # epoch 1's lr: 0.01
    assert code == 0, line
    assert [r['epoch'] for r in read_summary(out / 'r' / 'summary.csv')] == ['0', '1']


def test_detection_ddp_process_killed_leaves_one_line_saying_how_to_resume(tmp_path):
    """train_detection.py under torchrun (2 gloo processes, the tiny PennFudan of tests/test_detection.py): kill -9
    of process 1 after the first checkpoint: one line on process 0, the folder unlocked; the printed command,
    followed, finishes the run."""
    from test_detection import TINY_CFG, write_pennfudan
    write_pennfudan(str(tmp_path / 'PennFudanPed'), 5)
    (tmp_path / 'cfg.yaml').write_text(TINY_CFG + 'lt_epoch: full\n')
    run_dir, epochs = tmp_path / 'out' / 'r', 12  # 0.3 s an epoch
    last = run_dir / 'last.pth.tar'
    argv = detection_argv(tmp_path, run_dir.parent, '-b', '2')  # 3 images x 2 replicas: 1 step of 2 rows a process
    argv[argv.index('--epochs') + 1] = epochs
    cmd = [PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--log-dir',
           str(tmp_path / 'logs'), '--redirects', '3', str(REPO / 'train_detection.py'), *map(str, argv)]
    err = kill_rank_1_after_first_checkpoint(cmd, last, tmp_path / 'logs', REPO, one_thread_env())
    args = printed_torchrun_command(err, ['train_detection.py'], last)
    assert not (run_dir / '.lock').exists()
    follow_torchrun(args, tmp_path / 'resumed', REPO, one_thread_env())
    assert [r['epoch'] for r in read_summary(run_dir / 'summary.csv')] == [str(e) for e in range(epochs)]
    assert load(last)['epoch'] == epochs - 1 and not (run_dir / '.lock').exists()


def test_detection_learning_rate_the_optimizer_cannot_apply_is_one_line(tmp_path, capsys):
    """train_detection.py --lr 1e39 without warmup: torch's SGD stopped with an overflow traceback at the first
    step; now one line, before any folder."""
    from test_detection import TINY_CFG, write_pennfudan
    write_pennfudan(str(tmp_path / 'PennFudanPed'), 5)
    (tmp_path / 'cfg.yaml').write_text(TINY_CFG + 'lt_epoch: full\n')
    code, line = detection_main(capsys, *detection_argv(tmp_path, tmp_path / 'out', '--warmup-iters', '0',
                                                        '--lr-steps', '5', '--lr', '1e39'))
    assert code == 2 and '--lr 1e+39 is larger than the largest float32 number' in line, line
    assert 'pass a smaller --lr' in line and not (tmp_path / 'out').exists()
