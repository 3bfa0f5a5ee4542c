"""setup.cfg's lower bound on timm is a true one: train.py and validate.py run end to end on that exact version.

scripts/test.sh installs it (without dependencies) into .cache/timm-min; the test runs the CLIs with it first on
the path, so they import the old timm against the venv's torch.
"""
import json
import os
import re
import subprocess

import pytest

from conftest import PYTHON, REPO, cli_env, make_image_folder

MIN_DIR = REPO / '.cache' / 'timm-min'


def declared_minimum() -> str:
    return re.search(r'timm>=([0-9.]+)', (REPO / 'setup.cfg').read_text()).group(1)


@pytest.mark.skipif(not MIN_DIR.is_dir(), reason='scripts/test.sh installs the minimum timm into .cache/timm-min')
def test_train_and_validate_on_the_oldest_supported_timm(tmp_path):
    assert (MIN_DIR / f'timm-{declared_minimum()}.ok').exists(), 'rerun scripts/test.sh: .cache/timm-min is stale'
    env = cli_env()
    env['PYTHONPATH'] = f'{MIN_DIR}{os.pathsep}{env["PYTHONPATH"]}'
    data = make_image_folder(tmp_path / 'd')

    def run(*args):
        p = subprocess.run([PYTHON, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    version = run('-c', 'import timm; print(timm.__version__)').stdout.strip()
    assert version == declared_minimum()
    run(REPO / 'train.py', '--data-dir', data, '--model', 'test_resnet', '--img-size', '32', '--device', 'cpu',
        '-b', '12', '--epochs', '2', '--aug-repeats', '3', '--loss', 'losstransform', '--mixup', '0.2',
        '--workers', '0', '--no-plot', '--output', tmp_path / 'out', '--experiment', 'old')
    res = tmp_path / 'v.json'
    run(REPO / 'validate.py', '--data-dir', data, '--split', 'val', '--model', 'test_resnet', '--img-size', '32',
        '--checkpoint', tmp_path / 'out' / 'old' / 'last.pth.tar', '--device', 'cpu', '-j', '0',
        '--results-file', res)
    assert 0 <= json.loads(res.read_text())['top1'] <= 100
