"""CIFAR-100 through ``--dataset torch/cifar100`` (torchvision's reader), offline, on a synthetic file.

The file is written in torchvision's format (``cifar-100-python/{train,test,meta}``: pickled dicts with ``data``
as uint8 rows of 3 x 32 x 32 channel planes, ``fine_labels``, ``coarse_labels``; ``meta`` with
``fine_label_names``). torchvision also checks each file's md5 against the real CIFAR-100's, which a synthetic file
cannot pass: the tests marked so replace torchvision's ``check_integrity`` by a test that the file exists, and
nothing else. ``test_torchvision_refuses_the_synthetic_file`` shows that this md5 check is the only thing bypassed.
"""
import pickle

import numpy as np
import pytest

import torchvision.datasets.cifar as tv_cifar
from lt_timm.data import class_to_idx_of, load_folder_dataset

CLASSES = [f'class_{i:03d}' for i in range(100)]


def write_cifar100(root, n_train=40, n_test=20, seed=0):
    """A synthetic CIFAR-100 in torchvision's on-disk format; returns (train images HWC, train labels)."""
    rng = np.random.default_rng(seed)
    folder = root / 'cifar-100-python'
    folder.mkdir(parents=True)
    out = {}
    for split, n in (('train', n_train), ('test', n_test)):
        labels = rng.integers(0, 100, n)
        planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        entry = {'filenames': [f'{split}_{i}.png' for i in range(n)], 'batch_label': f'{split} batch',
                 'fine_labels': labels.tolist(), 'coarse_labels': (labels // 5).tolist(),
                 'data': planes.reshape(n, 3072)}
        with open(folder / split, 'wb') as f:
            pickle.dump(entry, f)
        out[split] = (planes.transpose(0, 2, 3, 1), labels)
    with open(folder / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': CLASSES, 'coarse_label_names': [f'super_{i}' for i in range(20)]}, f)
    return out


@pytest.fixture
def no_md5_check(monkeypatch):
    """Bypasses only torchvision's md5 check of the synthetic files: a file must still exist."""
    monkeypatch.setattr(tv_cifar, 'check_integrity', lambda fpath, md5=None: __import__('os').path.isfile(fpath))


def test_reader_gives_the_files_images_and_labels(tmp_path, no_md5_check):
    data = write_cifar100(tmp_path)
    for split, train in (('train', True), ('test', False)):
        ds = load_folder_dataset('torch/cifar100', str(tmp_path), split, is_training=train)
        images, labels = data[split]
        assert len(ds) == len(labels)
        for i in (0, len(ds) - 1):
            img, target = ds[i]
            assert img.size == (32, 32) and img.mode == 'RGB'
            assert np.array_equal(np.asarray(img), images[i]) and target == labels[i]
        assert class_to_idx_of(ds) == {name: i for i, name in enumerate(CLASSES)}  # the run's class map


def test_train_cli_runs_table2_cifar100_recipe(tmp_path, in_process, no_md5_check):
    """The Table 2 CIFAR-100 recipe (original batching, T(CCE)) trains on the synthetic file, m and -b shrunk."""
    write_cifar100(tmp_path / 'c100')
    p = in_process('train.py', '-c', 'configs/cifar/table2_cifar100_resnet20_lt120.yaml', '--data-dir',
                   tmp_path / 'c100', '--epochs', '1', '-b', '4', '--aug-repeats', '4', '--workers', '0',
                   '--device', 'cpu', '--no-plot', '--log-interval', '5', '--output', tmp_path / 'out',
                   '--experiment', 'c100')
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert 'mode original, 10 batches/epoch' in log, log[-2000:]
    summary = (tmp_path / 'out' / 'c100' / 'summary.csv').read_text().splitlines()
    assert len(summary) == 2 and summary[0].startswith('epoch,train_loss,eval_loss,eval_top1')


def test_torchvision_refuses_the_synthetic_file(tmp_path, in_process):
    """Without the bypass, torchvision's md5 check rejects the synthetic file: one clear error, exit 2."""
    write_cifar100(tmp_path / 'c100')
    p = in_process('train.py', '-c', 'configs/cifar/table2_cifar100_resnet20_lt120.yaml', '--data-dir',
                   tmp_path / 'c100', '--epochs', '1', '--workers', '0', '--device', 'cpu', '--output',
                   tmp_path / 'out', check=False)
    assert p.returncode == 2 and 'error:' in p.stderr and 'corrupted' in p.stderr, p.stderr[-2000:]
