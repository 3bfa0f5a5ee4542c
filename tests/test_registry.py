"""Loss registry: create_loss follows timm's train.py criterion rules; losstransform wraps them."""
import itertools

import pytest
import torch
import torch.nn as nn
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import lt_timm.registry as registry
from lt_timm import LossTransform, create_loss, is_registered, list_losses, register_loss


def timm_train_py_rule(smoothing, mixup_active, bce_loss):
    """timm train.py's '# setup loss function' block (no --jsd-loss), transcribed.

    One deliberate difference, per lt_timm's design: with --bce-loss but neither smoothing nor mixup,
    stock train.py falls through to nn.CrossEntropyLoss (it ignores --bce-loss there); lt_timm honours
    --bce-loss and uses BinaryCrossEntropy.
    """
    if mixup_active:
        return (BinaryCrossEntropy, 0.) if bce_loss else (SoftTargetCrossEntropy, None)
    if smoothing:
        return (BinaryCrossEntropy, smoothing) if bce_loss else (LabelSmoothingCrossEntropy, smoothing)
    return (BinaryCrossEntropy, 0.) if bce_loss else (nn.CrossEntropyLoss, None)


def _smoothing_of(crit):
    if isinstance(crit, BinaryCrossEntropy):
        return crit.smoothing
    if isinstance(crit, LabelSmoothingCrossEntropy):
        return crit.smoothing
    return None


FLAG_GRID = list(itertools.product([0., 0.1, 0.3], [False, True], [False, True]))


@pytest.mark.parametrize('smoothing,mixup_active,bce_loss', FLAG_GRID)
def test_ce_and_losstransform_follow_timm_rules(smoothing, mixup_active, bce_loss):
    cls, expected_smoothing = timm_train_py_rule(smoothing, mixup_active, bce_loss)
    ce = create_loss('ce', smoothing=smoothing, mixup_active=mixup_active, bce_loss=bce_loss)
    assert type(ce) is cls
    if expected_smoothing is not None:
        assert _smoothing_of(ce) == pytest.approx(expected_smoothing)

    lt = create_loss('losstransform', smoothing=smoothing, mixup_active=mixup_active, bce_loss=bce_loss,
                     aug_repeats=3, rho=0.7, detach_consensus=True, reverse_kl=True)
    assert isinstance(lt, LossTransform)
    assert type(lt.base_loss) is cls
    if expected_smoothing is not None:
        assert _smoothing_of(lt.base_loss) == pytest.approx(expected_smoothing)
    assert lt.num_repeats == 3 and lt.rho == 0.7 and lt.detach_consensus and lt.reverse_kl
    assert lt.distribution == ('bernoulli' if bce_loss else 'softmax')

    # the wrapper computes base(x, y) + rho * consistency with that base
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen)
    y = torch.softmax(torch.randn(6, 5, generator=gen), 1) if mixup_active else torch.randint(0, 5, (6,), generator=gen)
    out = lt(x, y)
    torch.testing.assert_close(out, lt.base_loss(x, y) + 0.7 * lt.consistency(x))
    torch.testing.assert_close(lt.last_base, ce(x, y))


def test_bce_options_passed_through():
    crit = create_loss('ce', bce_loss=True, smoothing=0.1, bce_target_thresh=0.2, bce_sum=True, bce_pos_weight=2.0)
    assert isinstance(crit, BinaryCrossEntropy)
    assert crit.smoothing == 0.1 and crit.target_threshold == 0.2 and crit.sum_classes
    assert torch.equal(crit.pos_weight, torch.tensor(2.0))
    lt = create_loss('losstransform', bce_loss=True, mixup_active=True, bce_target_thresh=0.2, aug_repeats=2)
    assert isinstance(lt.base_loss, BinaryCrossEntropy)
    assert lt.base_loss.smoothing == 0. and lt.base_loss.target_threshold == 0.2


def test_bce_and_jsd_factories():
    b = create_loss('bce', smoothing=0.1)
    assert isinstance(b, BinaryCrossEntropy) and b.smoothing == 0.1
    assert create_loss('bce', smoothing=0.1, mixup_active=True).smoothing == 0.
    j = create_loss('jsd', jsd_splits=3, smoothing=0.1)
    assert isinstance(j, JsdCrossEntropy) and j.num_splits == 3
    with pytest.raises(ValueError, match='--aug-splits >= 2'):
        create_loss('jsd', jsd_splits=1)
    with pytest.raises(ValueError, match='mixup'):
        create_loss('jsd', jsd_splits=3, mixup_active=True)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        create_loss('focal')
    msg = str(exc.value)
    assert "'focal'" in msg
    for name in ('ce', 'bce', 'jsd', 'losstransform'):
        assert name in msg


def test_unknown_option_rejected():
    with pytest.raises(TypeError, match='smothing'):
        create_loss('ce', smothing=0.1)


@pytest.mark.parametrize('repeats', [0, 1])
def test_losstransform_needs_repeats(repeats):
    with pytest.raises(ValueError, match=r'--aug-repeats >= 2'):
        create_loss('losstransform', aug_repeats=repeats)


def test_losstransform_rejects_negative_rho():
    with pytest.raises(ValueError, match='rho'):
        create_loss('losstransform', aug_repeats=2, rho=-1.0)


def test_list_losses():
    names = list_losses()
    assert {'ce', 'bce', 'jsd', 'losstransform'} <= set(names)
    assert names == sorted(names)
    assert all(is_registered(n) for n in names) and not is_registered('nope')


@pytest.fixture
def clean_registry():
    before = dict(registry._loss_factories)
    yield
    registry._loss_factories.clear()
    registry._loss_factories.update(before)


def test_register_loss_adds_and_rejects_duplicates(clean_registry):
    name = '_test_l1_loss'
    assert not is_registered(name)

    @register_loss(name)
    def _make(o):
        return nn.SmoothL1Loss(beta=o.smoothing or 1.0)

    assert is_registered(name) and name in list_losses()
    crit = create_loss(name, smoothing=0.5)
    assert isinstance(crit, nn.SmoothL1Loss) and crit.beta == 0.5
    with pytest.raises(ValueError, match='already registered'):
        register_loss(name)(lambda o: nn.MSELoss())
    with pytest.raises(ValueError, match='already registered'):
        register_loss('ce')(lambda o: nn.MSELoss())
    assert isinstance(create_loss(name), nn.SmoothL1Loss)  # the duplicate did not replace it
    assert type(create_loss('ce')) is nn.CrossEntropyLoss


def test_registry_cleaned_up():
    # runs after the registration test (file order): the temporary loss is gone
    assert not is_registered('_test_l1_loss')
    assert set(list_losses()) >= {'ce', 'bce', 'jsd', 'losstransform'}
