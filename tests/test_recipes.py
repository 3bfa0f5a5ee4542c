"""Every classification recipe in configs/ parses and passes train.py's checks, with the layout rules the paper needs."""
import glob
import os

import pytest
import yaml

import timm
import lt_timm.models  # noqa: F401  (registers the CIFAR and torchvision-V1 models)
from lt_timm.cli.checks import check_args
from lt_timm.cli.train import parse_args
from lt_timm.layout import rows_per_step
from conftest import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, 'configs', '*', '*.yaml')))
CLASSIFICATION = [r for r in RECIPES if os.sep + 'detection' + os.sep not in r]
LT_KEYS = {'aug_repeats', 'loss', 'lt_rho', 'lt_epoch', 'batch_size'}


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def test_every_table_has_recipes():
    names = {os.path.relpath(r, os.path.join(REPO, 'configs')) for r in CLASSIFICATION}
    for model in ('resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'densenet40'):  # Tables 1-2
        for method in ('ce', 'lt', 'lt_original'):
            assert f'cifar/{model}_{method}.yaml' in names
    for model in ('resnet20', 'resnet56'):  # Table 5's protocol on CIFAR-10
        for method in ('ce', 'ra', 'lt'):
            assert f'cifar/{model}_finetune_{method}.yaml' in names
    for model in ('resnet50', 'resnext50', 'mobilenetv2', 'efficientnet_b0', 'vit_b16'):  # Table 5
        for method in ('ce', 'lt'):
            assert f'imagenet/{model}_{method}.yaml' in names
    for method in ('ce', 'ra', 'lt'):  # Table 5's protocol on ImageNet images with EfficientNet-Lite0 (docs/imagenet.md)
        assert f'imagenet/efficientnet_lite0_{method}.yaml' in names


@pytest.mark.parametrize('path', CLASSIFICATION, ids=lambda p: os.path.relpath(p, REPO))
def test_recipe_parses_and_passes_checks(path):
    args, _ = parse_args(['-c', path, '--data-dir', '/nonexistent'])
    check_args(args)
    name = args.model.split('.')[0]
    assert timm.is_model(name), name
    if '.' in args.model:
        assert args.model in timm.list_pretrained(name), args.model
    m = int(args.aug_repeats)
    if m:
        rows = rows_per_step(args.batch_size, m, args.lt_epoch)
        mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
        step = 2 * m if mixup else m
        assert rows % step == 0, f'{rows} rows per step is not a multiple of {step}'
    if '/imagenet/' in path and 'efficientnet_lite0' not in path:  # the Lite0 recipes are the CPU-measured ones
        assert args.amp and args.amp_dtype == 'bfloat16'
    if '/cifar/' in path:
        assert args.train_crop_mode == 'pad' and args.train_crop_pad == 4 and args.hflip == 0.5
        assert args.color_jitter == 0 and args.smoothing == 0
        if args.loss == 'losstransform':
            assert m == 3


@pytest.mark.parametrize('path', [r for r in CLASSIFICATION if r.endswith('_lt.yaml')], ids=os.path.basename)
def test_twins_differ_only_in_the_method(path):
    """A recipe's CE (and RA / original) twins share every key but the LossTransform ones and the batch size."""
    lt = load(path)
    twins = [path.replace('_lt.yaml', f'_{t}.yaml') for t in ('ce', 'ra', 'lt_original')]
    twins = [t for t in twins if os.path.exists(t)]
    assert twins and path.replace('_lt.yaml', '_ce.yaml') in twins
    for twin in twins:
        other = load(twin)
        diff = {k for k in set(lt) | set(other) if lt.get(k) != other.get(k)}
        assert diff <= LT_KEYS, (twin, diff)
