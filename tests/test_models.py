"""CIFAR ResNets (option A) and DenseNet-40: architecture, and the published checkpoints through every door."""
import subprocess

import pytest
import torch
import torch.nn.functional as F

import timm
import lt_timm.models  # noqa: F401  (registers the models)
from lt_timm.models.cifar_resnet import CIFAR_RESNET_DEPTHS
from conftest import PYTHON, REPO, cli_env, make_image_folder

# Parameter counts of He et al. Table 6 / the published implementation (option A has no shortcut weights).
PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


def published_format(state_dict, path, best=91.7):
    """Write a checkpoint the way akamaster/pytorch_resnet_cifar10 did: DataParallel keys, best_prec1."""
    torch.save({'best_prec1': best, 'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}, path)
    return path


def reference_shortcut(x, planes):
    """The published option-A lambda, written independently of lt_timm."""
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), 'constant', 0)


@pytest.mark.parametrize('depth', CIFAR_RESNET_DEPTHS)
def test_option_a_parameter_count_and_shape(depth):
    model = timm.create_model(f'cifar_resnet{depth}')
    assert sum(p.numel() for p in model.parameters()) == PARAMS[depth]
    assert not any('shortcut' in name for name, _ in model.named_parameters())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)  # the published training's


def test_option_a_shortcut_matches_published_lambda():
    model = timm.create_model('cifar_resnet20')
    for stage, planes in ((2, 32), (3, 64)):
        block = getattr(model, f'layer{stage}')[0]
        x = torch.randn(3, planes // 2, 16, 16)
        assert torch.equal(block.shortcut(x), reference_shortcut(x, planes))


def test_densenet40():
    model = timm.create_model('cifar_densenet40', num_classes=100)
    assert abs(sum(p.numel() for p in model.parameters()) - 1.06e6) < 0.05e6  # Huang et al.: 1.0 M (10 classes)
    assert model.num_features == 16 + 3 * 12 * 12
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def _assert_same_weights(model, state_dict):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_dict[k]), k


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    src = timm.create_model('cifar_resnet20')
    for p in src.parameters():
        p.data.normal_()
    for name, buf in src.named_buffers():
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    path = published_format(src.state_dict(), tmp_path_factory.mktemp('ckpt') / 'resnet20-12fca82f.th')
    return src.state_dict(), path


def test_published_file_loads_through_create_model(published):
    state, path = published
    _assert_same_weights(timm.create_model('cifar_resnet20', checkpoint_path=str(path)), state)
    overlay = dict(file=str(path))
    _assert_same_weights(timm.create_model('cifar_resnet20', pretrained=True, pretrained_cfg_overlay=overlay), state)


def test_pretrained_uses_the_cached_download(published, tmp_path, monkeypatch):
    """--pretrained resolves the published URL; with the file in torch hub's cache no network is touched."""
    state, path = published
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    cfg = timm.models.get_pretrained_cfg('cifar_resnet20.akamaster_cifar10')
    assert cfg.url.endswith('/resnet20-12fca82f.th')
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    (tmp_path / 'hub' / 'checkpoints' / 'resnet20-12fca82f.th').write_bytes(path.read_bytes())
    _assert_same_weights(timm.create_model('cifar_resnet20', pretrained=True), state)


def test_wrong_depth_or_architecture_is_named(published, tmp_path):
    state, path = published
    with pytest.raises(ValueError, match='holds a CIFAR ResNet-20, not ResNet-56.*cifar_resnet20'):
        timm.create_model('cifar_resnet56', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    other = published_format(timm.create_model('test_resnet').state_dict(), tmp_path / 'other.th')
    with pytest.raises(ValueError, match='not a CIFAR ResNet'):
        timm.create_model('cifar_resnet20', pretrained=True, pretrained_cfg_overlay=dict(file=str(other)))


def run(script, *args):
    return subprocess.run([PYTHON, str(REPO / script), *map(str, args)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def test_published_file_through_the_clis(published, tmp_path):
    """validate.py --checkpoint and train.py --initial-checkpoint take the file as downloaded; a wrong depth fails clearly."""
    state, path = published
    data = make_image_folder(tmp_path / 'data', classes=10, per_class=3, splits=('train', 'test'))
    common = ['--data-dir', data, '--device', 'cpu', '-j', '0']
    p = run('validate.py', *common, '--split', 'test', '--model', 'cifar_resnet20', '--checkpoint', path, '-b', '8')
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Loaded state_dict from checkpoint" in p.stdout + p.stderr
    out = tmp_path / 'out'
    p = run('train.py', *common, '--val-split', 'test', '--model', 'cifar_resnet20', '--initial-checkpoint', path,
            '--epochs', '1', '--lr', '0', '--warmup-epochs', '0', '-b', '6', '--aug-repeats', '3', '--loss',
            'losstransform', '--train-crop-mode', 'pad', '--output', out, '--experiment', 'ft', '--no-plot')
    assert p.returncode == 0, p.stderr[-2000:]
    saved = timm.create_model('cifar_resnet20', checkpoint_path=str(out / 'ft' / 'last.pth.tar'))
    for k, v in saved.state_dict().items():  # lr 0: weights unchanged (BN running stats move)
        if 'running' not in k and 'num_batches' not in k:
            assert torch.equal(v, state[k]), k
    p = run('validate.py', *common, '--split', 'test', '--model', 'cifar_resnet32', '--checkpoint', path)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert 'error: the checkpoint holds a CIFAR ResNet-20, not ResNet-32; use --model cifar_resnet20' in p.stderr


TV = {'tv_mobilenet_v2': 'mobilenet_v2', 'tv_efficientnet_b0': 'efficientnet_b0', 'tv_vit_b_16': 'vit_b_16'}


@pytest.mark.parametrize('name', sorted(TV))
def test_torchvision_v1_models_match_torchvision(name):
    """Same parameter names and outputs as torchvision's builder (random init, no network)."""
    import torchvision
    torch.manual_seed(0)
    ref = getattr(torchvision.models, TV[name])().eval()
    model = timm.create_model(name).eval()
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    cfg = model.pretrained_cfg
    assert cfg['crop_pct'] == 224 / 256 and cfg['input_size'] == (3, 224, 224)
    head = timm.create_model(name, num_classes=10)
    assert head.get_classifier().out_features == 10 and head(x).shape == (2, 10)


def test_torchvision_v1_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    """--pretrained fetches torchvision's V1 file through timm's loader; a cached file needs no network."""
    import torchvision
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    torch.manual_seed(1)
    ref = torchvision.models.mobilenet_v2()
    url = timm.models.get_pretrained_cfg('tv_mobilenet_v2.tv_in1k').url
    assert url == torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / 'hub' / 'checkpoints' / url.rsplit('/', 1)[1])
    _assert_same_weights(timm.create_model('tv_mobilenet_v2', pretrained=True), ref.state_dict())
    adapted = timm.create_model('tv_mobilenet_v2', pretrained=True, num_classes=10)  # head re-initialised
    assert torch.equal(adapted.features[0][0].weight, ref.features[0][0].weight)
    assert adapted.get_classifier().out_features == 10
