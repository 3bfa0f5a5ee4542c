"""``python -m lt_timm.launch``'s own failures are one line (``lt_timm.launch: error: ...``): a ``-c`` YAML the
script cannot read (a syntax error, a ``!!python`` tag that must not run), lt-timm's sampler refusing the data, an odd
batch under mixup (before any folder), a real SIGTERM (143, with the command that resumes the run, which works), and a
DDP process killed under torchrun (one line on the other, with the torchrun command that resumes, which works).
"""
import os
import shlex
from argparse import Namespace
import signal
import subprocess
import sys
import time

import pytest
import torch

from lt_timm import launch
from lt_timm.cli.checks import check_lr_base
from lt_timm.errors import UserError
from test_launch import TASK, data_root, evidence, variant  # noqa: F401  (data_root: the module's fixture)
from test_reliability_kill import follow_torchrun, kill_rank_1_after_first_checkpoint, printed_torchrun_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['--device', 'cpu', '--loss', 'losstransform', '--aug-repeats', '3', '-b', '6']


@pytest.fixture(autouse=True)
def one_thread_and_sys_restored(monkeypatch):
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith('lt_timm.launch: error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize('content,needles', [
    ('loss: [losstransform\n', ['line 2', 'not valid YAML']),
    ('loss: !!python/object/apply:os.mkdir ["{marker}"]\n', ['not valid YAML', '!!python are refused']),
])
def test_bad_yaml_under_the_launcher_is_one_line(data_root, tmp_path, capsys, content, needles):
    marker = tmp_path / 'ran'
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text(content.format(marker=marker))
    code = launch.main([TASK, data_root, '-c', str(cfg), *COMMON, '--output', str(tmp_path / 'out')])
    line = one_error_line(capsys)
    assert code == 2 and str(cfg) in line and all(n in line for n in needles), line
    assert not marker.exists() and not (tmp_path / 'out').exists()


def test_sampler_refusal_under_the_launcher_is_one_line(data_root, tmp_path, capsys):
    code = launch.main([TASK, data_root, *COMMON[:-1], '24', '--output', str(tmp_path / 'out')])
    line = one_error_line(capsys)
    assert code == 2 and 'too few for one batch of 24' in line and 'lower -b/--batch-size' in line


def test_odd_batch_with_mixup_under_the_launcher_is_refused_before_any_folder(data_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        launch.main([TASK, data_root, *COMMON[:-1], '9', '--mixup', '0.2', '--output', str(tmp_path / 'out')])
    assert e.value.code == 2 and 'need an even number of rows per step' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_learning_rate_beyond_float32_under_the_launcher_is_refused_before_any_folder(data_root, tmp_path, capsys):
    """timm's script with --lr 1e39 stopped at the first optimizer step with torch's overflow traceback."""
    with pytest.raises(SystemExit) as e:
        launch.main([TASK, data_root, *COMMON, '--lr', '1e39', '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err
    assert '--lr 1e+39 is larger than the largest float32 number' in err and 'pass a smaller --lr' in err
    assert not (tmp_path / 'out').exists()


def test_learning_rate_from_lr_base_beyond_float32_under_the_launcher_is_refused(data_root, tmp_path, capsys):
    """timm's script without --lr scales --lr-base to the global batch (6 / 256 here, linear for SGD): 1e41 gives
    2.3e39, past float32 (torch's overflow traceback at the first step); 1e40 gives 2.3e38, which float32 holds."""
    script = variant(tmp_path, TASK, [(
        "parser.add_argument('--lr', type=float, default=0.01)",
        "parser.add_argument('--lr', type=float, default=None)\n"
        "parser.add_argument('--lr-base', type=float, default=0.1)\n"
        "parser.add_argument('--lr-base-size', type=int, default=256)\n"
        "parser.add_argument('--lr-base-scale', type=str, default='')")])
    with pytest.raises(SystemExit) as e:
        launch.main([script, data_root, *COMMON, '--lr-base', '1e41', '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err
    assert '--lr-base 1e+41 gives the learning rate 2.34375e+39 for a global batch of 6 (linear scaling)' in err
    assert not (tmp_path / 'out').exists()
    sgd = dict(lr=None, lr_base=1e40, batch_size=6, lr_base_size=256, lr_base_scale='', opt='sgd')
    check_lr_base(Namespace(**sgd))  # 2.3e38 < 3.4e38: not refused
    check_lr_base(Namespace(**dict(sgd, lr=0.1, lr_base=1e41)))  # --lr given: --lr-base is not used
    check_lr_base(Namespace(**dict(sgd, lr_base=3e39)))  # linear: 7e37
    with pytest.raises(UserError, match=r'gives the learning rate 4.59.*e\+38 .*\(sqrt scaling\)'):
        check_lr_base(Namespace(**dict(sgd, lr_base=3e39, opt='adamw')))  # timm's sqrt rule for ada*: 4.6e38
    with pytest.raises(UserError, match='--lr-base must be a finite number'):
        check_lr_base(Namespace(**dict(sgd, lr_base=float('nan'))))


def saving_as_timm(tmp_path) -> str:
    """The stand-in, saving as timm's script does: tmp.pth.tar, then last.pth.tar (process 0 only)."""
    return variant(tmp_path, TASK, [(
        "os.path.join(args.output, f'checkpoint-{epoch}.pth.tar'))",
        "os.path.join(args.output, 'tmp.pth.tar'))\n"
        "            os.replace(os.path.join(args.output, 'tmp.pth.tar'), os.path.join(args.output, 'last.pth.tar'))")])


def launcher_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    env.pop('LT_TIMM_DEBUG', None)
    return env


def test_sigterm_under_the_launcher_says_how_to_resume_and_that_works(data_root, tmp_path, capsys):
    """A stand-in that saves as timm's script does (tmp, then last.pth.tar); SIGTERM after its first checkpoint."""
    script = saving_as_timm(tmp_path)
    out = tmp_path / 'out'
    argv = [script, data_root, *COMMON, '--epochs', '200', '--output', str(out)]
    env = launcher_env()
    proc = subprocess.Popen([sys.executable, '-m', 'lt_timm.launch', *argv], cwd=str(tmp_path), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / 'last.pth.tar').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    lines = [ln for ln in err.splitlines() if ln.startswith('lt_timm.launch: error: ')]
    assert proc.returncode == 143 and len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    assert 'stopped by SIGTERM' in lines[0]
    command = shlex.split(lines[0].split('to continue: ', 1)[1])
    assert command[:3] == ['python', '-m', 'lt_timm.launch'] and command[-2:] == ['--resume', str(out / 'last.pth.tar')]
    resumed = command[3:]
    resumed[resumed.index('--epochs') + 1] = str(torch.load(out / 'last.pth.tar', weights_only=False)['epoch'] + 2)
    assert launch.main(resumed) == 0  # one more epoch: the printed command resumes the run


def test_ctrl_c_of_a_resumed_run_before_its_first_save_resumes_from_the_resume_file(data_root, tmp_path, capsys,
                                                                                    monkeypatch):
    """A run started with --resume FILE and stopped before it saved anything: the command resumes from FILE (it
    said 'no checkpoint was saved yet: start again'); under torchrun only process 0 says it (every process gets the
    Ctrl-C)."""
    first = tmp_path / 'first'
    assert launch.main([saving_as_timm(tmp_path), data_root, *COMMON, '--epochs', '1', '--output', str(first)]) == 0
    script = variant(tmp_path, saving_as_timm(tmp_path), [(
        '        seen = train_one_epoch(', '        if args.resume:\n            raise KeyboardInterrupt\n'
                                        '        seen = train_one_epoch(')], name='interrupted.py')
    argv = [script, data_root, *COMMON, '--epochs', '3', '--output', str(tmp_path / 'second'),
            '--resume', str(first / 'last.pth.tar')]
    capsys.readouterr()
    assert launch.main(argv) == 130
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith('lt_timm.launch: error: ')]
    assert len(lines) == 1 and 'stopped by Ctrl-C (SIGINT)' in lines[0], lines
    command = shlex.split(lines[0].split('to continue: ', 1)[1])
    assert command == ['python', '-m', 'lt_timm.launch', *argv[:-2], '--resume', str(first / 'last.pth.tar')]
    monkeypatch.setenv('RANK', '1')
    assert launch.main(argv) == 130
    assert 'lt_timm.launch: error' not in capsys.readouterr().err


def test_ddp_process_killed_under_the_launcher_says_how_to_resume_and_that_works(data_root, tmp_path):
    """torchrun -m lt_timm.launch, 2 gloo processes; kill -9 of process 1 after the first checkpoint: process 0 stops
    with one line (what happened, the torchrun command that resumes), torchrun exits non-zero; the printed command,
    followed, resumes from the checkpoint's next epoch and trains to the last one on both processes."""
    script, out, epochs = saving_as_timm(tmp_path), tmp_path / 'out', 60  # 0.05 s an epoch: still going at the kill
    last = out / 'last.pth.tar'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--log-dir',
           str(tmp_path / 'logs'), '--redirects', '3', '-m', 'lt_timm.launch', script, data_root, *COMMON,
           '--epochs', str(epochs), '--output', str(out)]
    err = kill_rank_1_after_first_checkpoint(cmd, last, tmp_path / 'logs', str(tmp_path), launcher_env())
    args = printed_torchrun_command(err, ['-m', 'lt_timm.launch', script], last, prefix='lt_timm.launch: error: ')
    saved = torch.load(last, weights_only=False)['epoch']
    follow_torchrun(args, tmp_path / 'resumed', str(tmp_path), launcher_env())
    for rank in (0, 1):
        ev = evidence(out, rank)
        assert ev['world_size'] == 2 and ev['start_epoch'] == saved + 1 and ev['batch_epochs'][-1] == epochs - 1
    assert torch.load(last, weights_only=False)['epoch'] == epochs - 1
