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
SCHEDULE_KEYS = {'epochs', 'decay_milestones'}
RANDAUGMENT = 'rand-m9-n2-inc1'
TABLE1_MODELS = {'resnet20': 'cifar_resnet20', 'resnet44': 'cifar_resnet44', 'resnet110': 'cifar_resnet110'}
TABLE1_OPTIONS = {'': {}, '_cutout': {'cutout': 16}, '_cutmix': {'cutmix': 1.0, 'mixup_prob': 0.5},
                  '_mixup': {'mixup': 1.0}}
TABLE2_MODELS = ('resnet20', 'resnet44', 'resnet110', 'densenet40')
TABLE3_MODELS = {'efficientnet_b0': 'tf_efficientnet_b0.aa_in1k', 'mobilenetv2': 'tf_mobilenetv2_100.keras_in1k',
                 'nasnetamobile': 'nasnetamobile.keras_in1k'}


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
    for model in TABLE1_MODELS:  # Table 1: default augmentation and each optional one
        for option in TABLE1_OPTIONS:
            for method in ('ce', 'lt'):
                assert f'cifar/table1_{model}{option}_{method}.yaml' in names
    for dataset in ('cifar10', 'cifar100'):  # Table 2 / Fig. 2: 120-epoch LT next to the full-schedule CE
        for model in TABLE2_MODELS:
            methods = ('lt120',) if dataset == 'cifar10' and model != 'densenet40' else ('ce', 'lt', 'lt120')
            for method in methods:
                assert f'cifar/table2_{dataset}_{model}_{method}.yaml' in names
    for model in TABLE3_MODELS:  # Table 3
        for method in ('ce', 'lt'):
            assert f'imagenet/table3_{model}_{method}.yaml' in names


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
        assert args.hflip == 0.5 and args.color_jitter == 0 and args.smoothing == 0
        if os.path.basename(path).startswith('table'):  # the paper's Tables 1-2: RandAugment + flip, no crop, m = 32
            assert args.aa == RANDAUGMENT and not args.train_crop_mode
            assert tuple(args.scale) == (1.0, 1.0) and tuple(args.ratio) == (1.0, 1.0)
            assert args.loss == 'ce' and m == 0 or (args.loss == 'losstransform' and m == 32
                                                    and args.lt_epoch == 'original')
        else:  # He et al.'s pad-and-crop + flip, m = 3
            assert args.train_crop_mode == 'pad' and args.train_crop_pad == 4 and not args.aa
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


def twin_of_lt120(path):
    """The CE recipe a 120-epoch LT recipe is compared with (Table 1's default CE for the CIFAR-10 ResNets)."""
    base = os.path.basename(path)
    if base.startswith('table2_cifar10_') and 'densenet40' not in base:
        model = base[len('table2_cifar10_'):-len('_lt120.yaml')]
        return os.path.join(os.path.dirname(path), f'table1_{model}_ce.yaml')
    return path.replace('_lt120.yaml', '_ce.yaml')


@pytest.mark.parametrize('path', [r for r in CLASSIFICATION if r.endswith('_lt120.yaml')], ids=os.path.basename)
def test_120_epoch_variants_differ_in_method_and_schedule_only(path):
    """Fig. 2 / Table 2: the LT run is the CE recipe with T(CCE), m = 32 and 120 epochs (/10 at 60 and 90)."""
    lt, ce = load(path), load(twin_of_lt120(path))
    diff = {k for k in set(lt) | set(ce) if lt.get(k) != ce.get(k)}
    assert diff <= LT_KEYS | SCHEDULE_KEYS, diff
    assert lt['epochs'] == 120 and lt['decay_milestones'] == [60, 90]
    assert ce['epochs'] == (300 if 'densenet40' in path else 182)
    full = path.replace('_lt120.yaml', '_lt.yaml')
    if os.path.exists(full):  # the full-schedule LT run beside it
        assert load(full)['epochs'] == ce['epochs']


@pytest.mark.parametrize('model', TABLE1_MODELS)
@pytest.mark.parametrize('option', TABLE1_OPTIONS)
def test_table1_recipes_are_the_papers(model, option):
    """Table 1: He et al.'s schedule, -b 128 images, m = 32 under the original batching (4,096 rows per step),
    RandAugment + flip by default, one optional augmentation each; "ResNet-40 #params=0.66M" is cifar_resnet44."""
    for method in ('ce', 'lt'):
        path = os.path.join(REPO, 'configs', 'cifar', f'table1_{model}{option}_{method}.yaml')
        args, _ = parse_args(['-c', path, '--data-dir', '/nonexistent'])
        assert args.model == TABLE1_MODELS[model] and args.num_classes == 10 and args.batch_size == 128
        assert (args.opt, args.lr, args.momentum, args.weight_decay) == ('sgd', 0.1, 0.9, 1e-4)
        assert (args.epochs, args.decay_milestones, args.decay_rate) == (182, [91, 136], 0.1)
        for key, value in TABLE1_OPTIONS[option].items():
            assert getattr(args, key) == value
        others = {'cutout': 0, 'cutmix': 0.0, 'mixup': 0.0}
        assert all(getattr(args, k) == v for k, v in others.items() if k not in TABLE1_OPTIONS[option])
        if method == 'lt':
            assert rows_per_step(args.batch_size, args.aug_repeats, args.lt_epoch) == 128 * 32
    if model == 'resnet44':
        params = sum(p.numel() for p in timm.create_model('cifar_resnet44', num_classes=10).parameters())
        assert round(params / 1e6, 2) == 0.66


def test_pad_crop_alternative_overrides_randaugment():
    """The documented alternative to RandAugment: He et al.'s pad-and-crop from the command line."""
    path = os.path.join(REPO, 'configs', 'cifar', 'table1_resnet20_lt.yaml')
    args, _ = parse_args(['-c', path, '--data-dir', '/x', '--aa', '', '--train-crop-mode', 'pad'])
    check_args(args)
    assert not args.aa and args.train_crop_mode == 'pad' and args.train_crop_pad == 4


def test_scale_and_ratio_one_crop_nothing():
    """scale = ratio = 1 turns timm's random-resized crop into the identity on a 32x32 image (no crop)."""
    import numpy as np
    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    crop = RandomResizedCropAndInterpolation(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), interpolation='bilinear')
    for _ in range(5):
        assert np.array_equal(np.asarray(crop(img)), np.asarray(img))


@pytest.mark.parametrize('model', TABLE3_MODELS)
def test_table3_recipes_are_the_papers(model):
    """Table 3: "SGD with a momentum of 0.9, a constant learning rate of 0.001, and 30 epochs. We use a batch size
    of 128 and set m for up to 4", TensorFlow-trained weights."""
    for method in ('ce', 'lt'):
        path = os.path.join(REPO, 'configs', 'imagenet', f'table3_{model}_{method}.yaml')
        args, _ = parse_args(['-c', path, '--data-dir', '/nonexistent'])
        assert args.model == TABLE3_MODELS[model] and args.pretrained and args.num_classes == 1000
        assert (args.opt, args.momentum, args.lr, args.sched, args.epochs, args.batch_size) == \
            ('sgd', 0.9, 0.001, 'constant', 30, 128)
        assert args.aa == RANDAUGMENT and args.hflip == 0.5 and not args.mixup and not args.cutmix
        if method == 'lt':
            assert (args.aug_repeats, args.lt_epoch, args.loss) == (4, 'original', 'losstransform')
        else:
            assert (args.aug_repeats, args.loss) == (0, 'ce')


@pytest.mark.parametrize('path', [r for r in CLASSIFICATION if load(r).get('aa', '').startswith('rand')],
                         ids=lambda p: os.path.relpath(p, REPO))
def test_randaugment_ops_run_at_every_reachable_magnitude(path):
    """Every RandAugment op of a recipe runs at the largest magnitude it draws (with timm's magnitude noise, mstd:
    up to 5 standard deviations above M, clipped at 10). At level 10 PosterizeIncreasing keeps 0 bits, which
    Pillow >= 13 refuses ("bits must be between or equal to 1 and 8") mid-run: rand-m9-mstd0.5-inc1 gets there
    about once in 700 images, so the paper's recipes use a fixed magnitude (RandAugment's own form)."""
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    aa = load(path)['aa']
    transform = rand_augment_transform(aa, dict(translate_const=14, img_mean=(124, 116, 104)))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for op in transform.ops:
        reachable = min(op.magnitude + 5 * op.magnitude_std, op.magnitude_max or 10)
        op.magnitude, op.magnitude_std, op.prob = reachable, 0, 1.0
        op(img)
