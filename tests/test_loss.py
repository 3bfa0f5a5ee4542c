"""LossTransform against slow, loop-based references written independently of lt_timm.

The references walk the batch block by block with Python loops (rows [0..m), [m..2m), ..., last block
possibly shorter), compute p_i = softmax(logits_i) in float64, pbar = mean of p over the block, and
KL(pbar || p_i) = sum_c pbar_c (log pbar_c - log p_i_c); consistency = mean over all B rows.
"""
import math
import random

import pytest
import torch
import torch.nn as nn
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from lt_timm import LossTransform


# ----------------------------------------------------------------------------- references

def ref_blocks(batch_size, m):
    """Row ranges of the replica blocks. The layout itself is lt_timm.layout's (tested by tests/test_layout.py);
    everything computed over the blocks below is an independent loop reference."""
    from lt_timm.layout import block_sizes
    blocks, start = [], 0
    for size in block_sizes(batch_size, m):
        blocks.append(range(start, start + size))
        start += size
    return blocks


def ref_row_divergences(logits, m, reverse=False, distribution='softmax', detach=False):
    """List of per-row divergences (float64 scalars, differentiable w.r.t. ``logits``)."""
    x = logits.double() if logits.dtype != torch.float64 else logits
    out = [None] * x.shape[0]
    for block in ref_blocks(x.shape[0], m):
        if distribution == 'softmax':
            probs = [torch.softmax(x[j], dim=0) for j in block]
        else:  # bernoulli: per class q = sigmoid(z)
            probs = [torch.sigmoid(x[j]) for j in block]
        pbar = probs[0]
        for p in probs[1:]:
            pbar = pbar + p
        pbar = pbar / len(probs)
        if detach:
            pbar = pbar.detach()
        for j, p in zip(block, probs):
            if distribution == 'softmax':
                if reverse:
                    kl = (p * (p.log() - pbar.log())).sum()
                else:
                    kl = (pbar * (pbar.log() - p.log())).sum()
            else:
                if reverse:
                    kl = (p * (p.log() - pbar.log()) + (1 - p) * ((1 - p).log() - (1 - pbar).log())).sum()
                else:
                    kl = (pbar * (pbar.log() - p.log()) + (1 - pbar) * ((1 - pbar).log() - (1 - p).log())).sum()
            out[j] = kl
    return out


def ref_consistency(logits, m, **kw):
    rows = ref_row_divergences(logits, m, **kw)
    total = rows[0]
    for r in rows[1:]:
        total = total + r
    return total / len(rows)


def make_targets(kind, batch_size, num_classes, gen):
    if kind == 'index':
        return torch.randint(0, num_classes, (batch_size,), generator=gen)
    # soft targets: random rows of a simplex
    t = torch.rand(batch_size, num_classes, generator=gen) + 1e-3
    return t / t.sum(dim=1, keepdim=True)


BASES = {
    'ce': (lambda: nn.CrossEntropyLoss(), 'index'),
    'ce_soft': (lambda: nn.CrossEntropyLoss(), 'soft'),
    'soft_target_ce': (lambda: SoftTargetCrossEntropy(), 'soft'),
    'label_smoothing_ce': (lambda: LabelSmoothingCrossEntropy(smoothing=0.1), 'index'),
}


def random_cases(n, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        B = rng.randint(1, 17)
        C = rng.randint(2, 11)
        m = rng.randint(1, 5)
        cases.append((B, C, m, rng.choice([0.1, 0.5, 1.0, 2.5, 7.0]), rng.randrange(10 ** 6)))
    # explicit partial-last-block cases (m does not divide B)
    cases += [(8, 5, 3, 1.0, 1), (7, 4, 3, 0.5, 2), (17, 11, 5, 2.0, 3), (5, 2, 4, 1.0, 4), (3, 3, 2, 1.0, 5)]
    return cases


CASES = random_cases(32, seed=1234)
SHORT_CASES = CASES[:15] + CASES[-5:]  # keeps the explicit partial-block cases


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize('base_name', sorted(BASES))
@pytest.mark.parametrize('reverse', [False, True])
def test_value_and_grad_match_loop_reference(base_name, reverse):
    make_base, target_kind = BASES[base_name]
    n_partial = 0
    for B, C, m, rho, seed in CASES:
        gen = torch.Generator().manual_seed(seed)
        logits = (torch.randn(B, C, generator=gen) * 3).requires_grad_()
        target = make_targets(target_kind, B, C, gen)
        lt = LossTransform(make_base(), num_repeats=m, rho=rho, reverse_kl=reverse)
        loss = lt(logits, target)
        loss.backward()

        x64 = logits.detach().double().requires_grad_()
        ref_base = make_base()(x64, target.double() if target.is_floating_point() else target)
        ref_cons = ref_consistency(x64, m, reverse=reverse)
        ref_total = ref_base + rho * ref_cons
        ref_total.backward()

        ctx = f'{base_name} B={B} C={C} m={m} rho={rho} reverse={reverse}'
        assert loss.shape == ()
        torch.testing.assert_close(loss.double(), ref_total.detach(), rtol=1e-5, atol=1e-5, msg=ctx)
        torch.testing.assert_close(lt.last_base.double(), ref_base.detach(), rtol=1e-5, atol=1e-6, msg=ctx)
        torch.testing.assert_close(lt.last_consistency.double(), ref_cons.detach(), rtol=1e-5, atol=1e-6, msg=ctx)
        torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-4, atol=1e-6, msg=ctx)
        n_partial += B % m != 0
    assert n_partial >= 5  # the sweep really covers partial last blocks


def test_consistency_is_nontrivial_in_sweep():
    """Guard against a vacuous reference: random logits give a clearly positive consistency."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 6, generator=gen) * 3
    lt = LossTransform(nn.CrossEntropyLoss(), num_repeats=3)
    lt(logits, torch.zeros(12, dtype=torch.long))
    assert lt.last_consistency.item() > 0.1
    assert lt.last_consistency.item() == pytest.approx(ref_consistency(logits, 3).item(), rel=1e-5)


def test_consistency_is_mean_over_all_rows_not_blocks():
    # B=7, m=3: blocks of 3,3,1; the mean divides by 7 rows (not by 3 blocks, not by 6 compared rows)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 4, generator=gen) * 2
    rows = ref_row_divergences(logits, 3)
    lt = LossTransform(nn.CrossEntropyLoss(), num_repeats=3)
    lt(logits, torch.zeros(7, dtype=torch.long))
    assert lt.last_consistency.item() == pytest.approx(sum(r.item() for r in rows) / 7, rel=1e-5)


def test_rho_zero_is_exactly_base_loss():
    for B, C, m, _, seed in CASES[:20]:
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(B, C, generator=gen, requires_grad=True)
        target = torch.randint(0, C, (B,), generator=gen)
        base = LabelSmoothingCrossEntropy(smoothing=0.1)
        lt = LossTransform(base, num_repeats=m, rho=0.0)
        loss = lt(logits, target)
        expected = base(logits, target)
        assert torch.equal(loss, expected)
        (g,) = torch.autograd.grad(loss, logits)
        (g_ref,) = torch.autograd.grad(expected, logits)
        assert torch.equal(g, g_ref)
        # the term is still measured for logging
        assert lt.last_consistency.item() == pytest.approx(ref_consistency(logits.detach(), m).item(), rel=1e-5, abs=1e-7)


def test_single_row_block_contributes_zero():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(7, 5, generator=gen)  # m=3, odd B -> blocks [3 3 1]: row 6 alone
    lt = LossTransform(nn.CrossEntropyLoss(), num_repeats=3)
    target = torch.zeros(7, dtype=torch.long)
    lt(logits, target)
    c1 = lt.last_consistency.clone()
    other = logits.clone()
    other[6] = torch.randn(5, generator=gen) * 10
    lt(other, target)
    assert torch.equal(c1, lt.last_consistency)
    # sum over the two full blocks only, divided by all 7 rows
    rows = ref_row_divergences(logits, 3)
    assert rows[6].item() == pytest.approx(0.0, abs=1e-12)
    assert c1.item() == pytest.approx(sum(r.item() for r in rows[:6]) / 7, rel=1e-5)
    # and B=1: one block of one row
    lt1 = LossTransform(nn.CrossEntropyLoss(), num_repeats=4)
    x = torch.randn(1, 5, requires_grad=True)
    lt1(x, torch.tensor([2]))
    assert lt1.last_consistency.item() == 0.0


@pytest.mark.parametrize('distribution', ['softmax', 'bernoulli'])
@pytest.mark.parametrize('reverse', [False, True])
def test_m1_consistency_zero(distribution, reverse):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 6, generator=gen) * 4).requires_grad_()
    lt = LossTransform(nn.CrossEntropyLoss(), num_repeats=1, rho=3.0, distribution=distribution, reverse_kl=reverse)
    cons = lt.consistency(logits)
    assert cons.item() == 0.0
    (g,) = torch.autograd.grad(cons, logits)
    assert torch.count_nonzero(g) == 0


def test_identical_replicas_zero_and_distinct_replicas_positive():
    gen = torch.Generator().manual_seed(8)
    for m in (2, 3, 4):
        rows = torch.randn(4, 7, generator=gen) * 3
        same = rows.repeat_interleave(m, dim=0)  # every block holds m identical rows
        lt = LossTransform(nn.CrossEntropyLoss(), num_repeats=m)
        assert lt.consistency(same).abs().item() < 1e-6
        assert lt.consistency(torch.randn(4 * m, 7, generator=gen) * 3).item() > 1e-3


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize('distribution', ['softmax', 'bernoulli'])
@pytest.mark.parametrize('reverse', [False, True])
def test_gradcheck_float64(distribution, reverse):
    for B, C, m, seed in [(6, 4, 3, 0), (7, 3, 3, 1), (5, 5, 2, 2), (4, 2, 4, 3)]:
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(B, C, generator=gen, dtype=torch.float64) * 2).requires_grad_()
        lt = LossTransform(nn.CrossEntropyLoss(), num_repeats=m, distribution=distribution, reverse_kl=reverse)
        assert lt.consistency(x).dtype == torch.float64
        assert torch.autograd.gradcheck(lt.consistency, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
        # and the analytic gradient equals the reference's
        (g,) = torch.autograd.grad(lt.consistency(x), x)
        (g_ref,) = torch.autograd.grad(ref_consistency(x, m, reverse=reverse, distribution=distribution), x)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def _numeric_grad(fn, x, eps=1e-6):
    g = torch.zeros_like(x)
    flat = x.view(-1)
    for k in range(flat.numel()):
        old = flat[k].item()
        flat[k] = old + eps
        hi = fn(x).item()
        flat[k] = old - eps
        lo = fn(x).item()
        flat[k] = old
        g.view(-1)[k] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize('distribution', ['softmax', 'bernoulli'])
@pytest.mark.parametrize('reverse', [False, True])
def test_detach_consensus_gradient(distribution, reverse):
    for B, C, m, seed in [(6, 4, 3, 0), (7, 3, 3, 1), (5, 5, 2, 2)]:
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(B, C, generator=gen, dtype=torch.float64) * 2).requires_grad_()
        lt = LossTransform(nn.CrossEntropyLoss(), num_repeats=m, distribution=distribution,
                           reverse_kl=reverse, detach_consensus=True)
        lt_full = LossTransform(nn.CrossEntropyLoss(), num_repeats=m, distribution=distribution, reverse_kl=reverse)
        cons = lt.consistency(x)
        # detaching changes only the gradient, not the value
        torch.testing.assert_close(cons, lt_full.consistency(x), rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(cons, x)
        (g_ref,) = torch.autograd.grad(
            ref_consistency(x, m, reverse=reverse, distribution=distribution, detach=True), x)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
        (g_full,) = torch.autograd.grad(lt_full.consistency(x), x)
        if reverse:
            # sum_i KL(p_i || pbar) is stationary in pbar (d/dpbar = -m + m = 0 on the simplex), so
            # stopping its gradient changes nothing
            torch.testing.assert_close(g, g_full, rtol=1e-9, atol=1e-12)
        else:
            assert (g - g_full).abs().max() > 1e-4  # detach really changes the gradient

        # finite differences of the consistency with pbar frozen at its value at x
        x0 = x.detach().clone()
        with torch.no_grad():
            pbar0 = {}
            for block in ref_blocks(B, m):
                f = torch.softmax if distribution == 'softmax' else (lambda t, dim: torch.sigmoid(t))
                pbar0[block.start] = torch.stack([f(x0[j], dim=0) for j in block]).mean(0)

        def frozen(z):
            tot = 0.
            for block in ref_blocks(B, m):
                pb = pbar0[block.start]
                for j in block:
                    if distribution == 'softmax':
                        p = torch.softmax(z[j], dim=0)
                        kl = (p * (p.log() - pb.log())).sum() if reverse else (pb * (pb.log() - p.log())).sum()
                    else:
                        p = torch.sigmoid(z[j])
                        terms = [(p, pb), (1 - p, 1 - pb)]
                        kl = sum(((a * (a.log() - b.log())) if reverse else (b * (b.log() - a.log()))).sum()
                                 for a, b in terms)
                    tot = tot + kl
            return tot / B

        torch.testing.assert_close(g, _numeric_grad(frozen, x0.clone()), rtol=1e-5, atol=1e-7)
        if distribution == 'softmax' and not reverse:
            # closed form: d/dz_i KL(pbar || softmax(z_i)) / B = (p_i - pbar) / B
            p = torch.softmax(x0, dim=1)
            closed = torch.cat([(p[list(b)] - p[list(b)].mean(0)) for b in ref_blocks(B, m)]) / B
            torch.testing.assert_close(g, closed, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- BCE / Bernoulli

def test_distribution_auto_selection():
    assert LossTransform(BinaryCrossEntropy(), 2).distribution == 'bernoulli'
    assert LossTransform(BinaryCrossEntropy(smoothing=0.1), 2).distribution == 'bernoulli'
    assert LossTransform(nn.BCEWithLogitsLoss(), 2).distribution == 'bernoulli'
    assert LossTransform(nn.CrossEntropyLoss(), 2).distribution == 'softmax'
    assert LossTransform(SoftTargetCrossEntropy(), 2).distribution == 'softmax'
    assert LossTransform(LabelSmoothingCrossEntropy(0.1), 2).distribution == 'softmax'
    assert LossTransform(BinaryCrossEntropy(), 2, distribution='softmax').distribution == 'softmax'


@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('target_kind', ['index', 'soft'])
def test_bce_value_matches_bernoulli_reference(reverse, target_kind):
    for B, C, m, rho, seed in SHORT_CASES:
        gen = torch.Generator().manual_seed(seed)
        logits = (torch.randn(B, C, generator=gen) * 3).requires_grad_()
        target = make_targets(target_kind, B, C, gen)
        base = BinaryCrossEntropy(smoothing=0.1 if target_kind == 'index' else 0.)
        lt = LossTransform(base, num_repeats=m, rho=rho, reverse_kl=reverse)
        assert lt.distribution == 'bernoulli'
        loss = lt(logits, target)
        loss.backward()

        x64 = logits.detach().double().requires_grad_()
        # reference sums the per-class Bernoulli KLs per row, then means over rows
        ref_cons = ref_consistency(x64, m, reverse=reverse, distribution='bernoulli')
        # softmax reference must differ (guards against silently using the wrong distribution)
        if (B, C, m) == (8, 5, 3):
            assert abs(ref_cons.item() - ref_consistency(x64, m, reverse=reverse).item()) > 1e-6
        ref_base = base(x64, target.double() if target.is_floating_point() else target)
        ref_total = ref_base + rho * ref_cons
        ref_total.backward()
        ctx = f'B={B} C={C} m={m} rho={rho}'
        torch.testing.assert_close(lt.last_consistency.double(), ref_cons.detach(), rtol=1e-5, atol=1e-6, msg=ctx)
        torch.testing.assert_close(loss.double(), ref_total.detach(), rtol=1e-5, atol=1e-5, msg=ctx)
        torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-4, atol=1e-6, msg=ctx)


# ----------------------------------------------------------------------------- AMP / extremes

@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize('base_name', ['ce', 'soft_target_ce', 'bce'])
@pytest.mark.parametrize('detach', [False, True])
def test_half_precision_matches_float32(dtype, tol, base_name, detach):
    make_base = {'ce': nn.CrossEntropyLoss, 'soft_target_ce': SoftTargetCrossEntropy, 'bce': BinaryCrossEntropy}[base_name]
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        B, C, m = 9, 7, 3
        x_low = (torch.randn(B, C, generator=gen) * 3).to(dtype).requires_grad_()
        x32 = x_low.detach().float().requires_grad_()  # the same (rounded) values, in float32
        target = make_targets('soft' if base_name == 'soft_target_ce' else 'index', B, C, gen)
        lt = LossTransform(make_base(), num_repeats=m, rho=1.0, detach_consensus=detach)
        loss_low = lt(x_low, target)
        loss_low.backward()
        loss32 = lt(x32, target)
        loss32.backward()
        assert torch.isfinite(loss_low)
        assert x_low.grad.dtype == dtype and torch.isfinite(x_low.grad).all()
        torch.testing.assert_close(loss_low.float(), loss32.detach(), rtol=tol, atol=tol)
        scale = x32.grad.abs().max().item()
        assert (x_low.grad.float() - x32.grad).abs().max().item() <= tol * scale + 1e-4


@pytest.mark.parametrize('dtype,big', [(torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4),
                                       (torch.float32, 6e4)])
@pytest.mark.parametrize('base_name', ['ce', 'soft_target_ce', 'bce'])
@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('detach', [False, True])
def test_extreme_logits_finite(dtype, big, base_name, reverse, detach):
    make_base = {'ce': nn.CrossEntropyLoss, 'soft_target_ce': SoftTargetCrossEntropy, 'bce': BinaryCrossEntropy}[base_name]
    gen = torch.Generator().manual_seed(0)
    B, C, m = 8, 5, 3
    # each entry is +big, -big or 0: replicas disagree completely
    signs = torch.randint(-1, 2, (B, C), generator=gen).float()
    signs[0] = torch.tensor([1., -1., -1., -1., -1.])
    signs[1] = torch.tensor([-1., 1., -1., -1., -1.])
    x = (signs * big).to(dtype).requires_grad_()
    target = make_targets('soft' if base_name == 'soft_target_ce' else 'index', B, C, gen)
    if base_name == 'ce':
        target[0] = 1  # a target sitting on a -big logit: large but finite loss
    lt = LossTransform(make_base(), num_repeats=m, rho=1.0, reverse_kl=reverse, detach_consensus=detach)
    loss = lt(x, target)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(lt.last_consistency) and torch.isfinite(lt.last_base)
    assert torch.isfinite(x.grad).all()
    # disagreeing replicas are penalised, not zeroed out (reverse KL is bounded by log m per row)
    assert lt.last_consistency.item() > (0.1 if reverse else 1.0)
    if base_name == 'ce' and dtype == torch.float32:
        # against a log-space float64 reference (the direct reference would hit 0 * log 0)
        z = x.detach().double()
        tot = 0.
        for block in ref_blocks(B, m):
            logp = torch.log_softmax(z[list(block)], dim=1)
            log_pbar = torch.logsumexp(logp, dim=0) - math.log(len(block))
            for r in range(len(block)):
                if reverse:
                    tot += (logp[r].exp() * (logp[r] - log_pbar)).sum().item()
                else:
                    tot += (log_pbar.exp() * (log_pbar - logp[r])).sum().item()
        assert lt.last_consistency.item() == pytest.approx(tot / B, rel=1e-5)


# ----------------------------------------------------------------------------- errors & bookkeeping

@pytest.mark.parametrize('bad', [0, -1, 2.0, 1.5, '3', None, True])
def test_bad_num_repeats(bad):
    with pytest.raises(ValueError, match='num_repeats'):
        LossTransform(nn.CrossEntropyLoss(), num_repeats=bad)


@pytest.mark.parametrize('bad', [-0.1, -1, float('nan')])
def test_bad_rho(bad):
    with pytest.raises(ValueError, match='rho must be >= 0'):
        LossTransform(nn.CrossEntropyLoss(), num_repeats=2, rho=bad)


def test_bad_distribution():
    with pytest.raises(ValueError, match='distribution'):
        LossTransform(nn.CrossEntropyLoss(), num_repeats=2, distribution='gaussian')


def test_input_errors_name_the_problem():
    lt = LossTransform(nn.CrossEntropyLoss(), num_repeats=2, check_finite=True)
    with pytest.raises(ValueError, match=r'logits of shape \(batch, classes\).*\(4, 3, 2\)'):
        lt(torch.randn(4, 3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r'logits of shape \(batch, classes\).*\(4,\)'):
        lt(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r'target has 3 rows but logits have 4'):
        lt(torch.randn(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r'soft target shape \(4, 6\) does not match logits \(4, 5\).*num_classes'):
        lt(torch.randn(4, 5), torch.full((4, 6), 1 / 6))
    with pytest.raises(ValueError, match=r'target must be .*\(4, 5, 1\)'):
        lt(torch.randn(4, 5), torch.zeros(4, 5, 1))
    for bad in (float('nan'), float('inf'), -float('inf')):
        x = torch.randn(4, 5)
        x[2, 1] = bad
        with pytest.raises(ValueError, match='non-finite logits'):
            lt(x, torch.zeros(4, dtype=torch.long))
    # the default skips the (syncing) check: the loss is NaN and the training loop reports it
    x = torch.randn(4, 5)
    x[0, 0] = float('nan')
    assert torch.isnan(LossTransform(nn.CrossEntropyLoss(), 2)(x, torch.zeros(4, dtype=torch.long)))


def test_last_components_recorded_and_detached():
    lt = LossTransform(SoftTargetCrossEntropy(), num_repeats=2, rho=0.5)
    assert lt.last_base is None and lt.last_consistency is None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=gen, requires_grad=True)
    t = make_targets('soft', 6, 4, gen)
    loss = lt(x, t)
    assert not lt.last_base.requires_grad and not lt.last_consistency.requires_grad
    assert torch.equal(lt.last_base, SoftTargetCrossEntropy()(x, t).detach())
    torch.testing.assert_close(loss.detach(), lt.last_base + 0.5 * lt.last_consistency)
    first = lt.last_consistency.clone()
    lt(torch.randn(6, 4, generator=gen), t)  # updated on every call
    assert not torch.equal(first, lt.last_consistency)
    assert 'num_repeats=2' in lt.extra_repr() and 'rho=0.5' in lt.extra_repr()


# ----------------------------------------------------------------------------- GPU-friendly formulation

FORBIDDEN_OPS = ('scatter', 'index_add', 'index_put', 'index_select', 'bincount', 'repeat_interleave', 'nonzero',
                 'isfinite', 'unique', 'arange', 'tensor')  # substrings; and the exact name 'item'


@pytest.mark.parametrize('distribution', ['softmax', 'bernoulli'])
@pytest.mark.parametrize('reverse,detach', [(False, False), (True, False), (False, True)])
def test_compiles_as_one_graph_without_index_tensors_atomics_or_syncs(distribution, reverse, detach):
    """torch.compile(fullgraph=True) fails on any graph break, and a host sync (.item(), bool(tensor)) is one; the
    captured graph must hold no scatter/index_add/bincount (atomics on CUDA) nor index tensors built per step."""
    torch._dynamo.reset()  # a fresh cache: the same forward is compiled for many batch sizes across these tests
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    lt = LossTransform(nn.CrossEntropyLoss(), 3, rho=1.5, distribution=distribution, reverse_kl=reverse,
                       detach_consensus=detach)
    compiled = torch.compile(lt, backend=capture, fullgraph=True)
    gen = torch.Generator().manual_seed(11)
    for B in (9, 8, 10, 7, 2):  # plain, palindromes with short middle block(s), odd with a short last block, B < m
        x = (torch.randn(B, 6, generator=gen) * 3).requires_grad_()
        t = torch.randint(0, 6, (B,), generator=gen)
        loss = compiled(x, t)
        cons = lt.last_consistency  # set by the compiled call
        (g,) = torch.autograd.grad(loss, x)
        ref = ref_consistency(x, 3, reverse=reverse, distribution=distribution, detach=detach)
        torch.testing.assert_close(cons.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        ref_loss = nn.CrossEntropyLoss()(x.double(), t) + 1.5 * ref
        (g_ref,) = torch.autograd.grad(ref_loss, x)
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)
    assert graphs
    for gm in graphs:
        names = [str(getattr(n.target, '__name__', n.target)) for n in gm.graph.nodes if n.op != 'placeholder']
        bad = [n for n in names if n == 'item' or any(f in n for f in FORBIDDEN_OPS)]
        assert not bad, bad


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_compiled_half_precision_matches_eager(dtype):
    torch._dynamo.reset()
    lt = LossTransform(SoftTargetCrossEntropy(), 3, rho=1.0)
    compiled = torch.compile(lt, backend='eager', fullgraph=True)
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(10, 7, generator=gen) * 8).to(dtype)
    t = make_targets('soft', 10, 7, gen)
    torch.testing.assert_close(compiled(x, t), lt(x, t))
    assert compiled(x, t).dtype == torch.float32
