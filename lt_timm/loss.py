"""LossTransform: T(L) = L + rho * consistency of replicas with their consensus.

Reference: "LossTransform" — each source image appears ``m`` times in a mini-batch, each replica
independently augmented; for the replicas of one image the consensus is the mean of their predicted
distributions ``pbar``, and the transformed objective is

    T(L) = (1/n) sum_i [ L(y_i; p_i) + rho * KL(pbar_i || p_i) ].

Everything here works in log space (``pbar`` via a log-sum-exp over the replicas), in float32, so fp16/bf16
logits and extreme logits (+-1e4) give finite values and gradients.

The training loss (:class:`LossTransform`, :func:`blockwise_kl`) has static shapes: the rows of each run of equal
blocks (:func:`lt_timm.layout.block_runs`, at most three) are reshaped to ``(images, replicas, ...)``. No index
tensors, no scatter/atomics (deterministic on CUDA), no host synchronisation, one graph under
``torch.compile(fullgraph=True)``. :func:`grouped_kl` / :func:`consensus_log_prob` take arbitrary group ids instead
(evaluation metrics, detection instances).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layout import block_runs

__all__ = ['LossTransform', 'blockwise_kl', 'consensus_log_prob', 'grouped_kl', 'log_distribution', 'DISTRIBUTIONS']

DISTRIBUTIONS = ('softmax', 'bernoulli')


def log_distribution(logits: torch.Tensor, distribution: str = 'softmax') -> torch.Tensor:
    """Per-row log-probabilities over the last dim, in float32 (float64 input stays float64).

    ``softmax``: one categorical over classes, shape ``(B, C)``.
    ``bernoulli``: one Bernoulli per class (sigmoid/BCE losses), shape ``(B, C, 2)`` = [log q, log(1-q)].
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if distribution == 'softmax':
        return F.log_softmax(z, dim=-1)
    if distribution == 'bernoulli':
        return torch.stack([F.logsigmoid(z), F.logsigmoid(-z)], dim=-1)
    raise ValueError(f'distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.')


def consensus_log_prob(logp: torch.Tensor, groups: torch.Tensor, num_groups: Optional[int] = None) -> torch.Tensor:
    """log of the mean distribution of each group: ``log mean_{i in g} exp(logp_i)``.

    Args:
        logp: ``(N, ...)`` log-probabilities.
        groups: ``(N,)`` group id of each row, in ``[0, num_groups)``.
    Returns:
        ``(num_groups, ...)`` log consensus.
    """
    n = logp.shape[0]
    if num_groups is None:
        num_groups = int(groups.max()) + 1 if n else 0
    flat = logp.reshape(n, -1)
    idx = groups.view(-1, 1).expand_as(flat)
    # A constant shift per group keeps exp() in range; detaching it leaves the gradient exact.
    shift = flat.new_full((num_groups, flat.shape[1]), float('-inf'))
    shift = shift.scatter_reduce(0, idx, flat, reduce='amax', include_self=True).detach()
    summed = flat.new_zeros((num_groups, flat.shape[1])).index_add(0, groups, torch.exp(flat - shift[groups]))
    counts = torch.bincount(groups, minlength=num_groups).to(flat.dtype).clamp_min(1)
    log_mean = summed.log() + shift - counts.log().view(-1, 1)
    return log_mean.view(num_groups, *logp.shape[1:])


def grouped_kl(
        logp: torch.Tensor,
        groups: torch.Tensor,
        detach_consensus: bool = False,
        reverse: bool = False,
        num_groups: Optional[int] = None,
) -> torch.Tensor:
    """Per-row divergence of each row from its group's consensus, summed over all non-batch dims.

    ``reverse=False`` (the paper): KL(pbar_g || p_i). ``reverse=True`` (AugMix style): KL(p_i || pbar_g).
    A group of one row gives exactly 0.
    """
    log_pbar = consensus_log_prob(logp, groups, num_groups)
    if detach_consensus:
        log_pbar = log_pbar.detach()
    kl = _divergence(logp, log_pbar[groups], reverse)
    return kl.reshape(kl.shape[0], -1).sum(dim=1)


def _divergence(logp: torch.Tensor, log_pbar: torch.Tensor, reverse: bool) -> torch.Tensor:
    if reverse:
        return torch.exp(logp) * (logp - log_pbar)
    return torch.exp(log_pbar) * (log_pbar - logp)


def blockwise_kl(
        logp: torch.Tensor,
        num_repeats: int,
        detach_consensus: bool = False,
        reverse: bool = False,
) -> torch.Tensor:
    """Per-row divergence from the consensus of its image, for a batch in the layout of :mod:`lt_timm.layout`.

    Same values as :func:`grouped_kl` with ``replica_groups(B, m)``, computed with static shapes: each run of equal
    blocks is reshaped to ``(images, replicas, -1)`` and ``log pbar = logsumexp over replicas - log(replicas)``.
    A block of one row gives exactly 0 (its log-sum-exp is the row itself), with a zero gradient.
    """
    parts = []
    start = 0
    for count, size in block_runs(logp.shape[0], num_repeats):
        rows = count * size
        block = logp[start:start + rows].reshape(count, size, -1)
        start += rows
        log_pbar = torch.logsumexp(block, dim=1, keepdim=True) - math.log(size)
        if detach_consensus:
            log_pbar = log_pbar.detach()
        parts.append(_divergence(block, log_pbar, reverse).sum(dim=2).reshape(rows))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _is_sigmoid_loss(loss: nn.Module) -> bool:
    from timm.loss import BinaryCrossEntropy
    return isinstance(loss, (BinaryCrossEntropy, nn.BCEWithLogitsLoss))


class LossTransform(nn.Module):
    """T(L): wraps a classification loss with a consistency term over replicas of one image.

    Args:
        base_loss: the loss L, called as ``base_loss(logits, target)`` (class indices or soft targets).
        num_repeats: replicas per source image ``m``; the batch layout is :mod:`lt_timm.layout`.
        rho: weight of the consistency term; ``0`` gives exactly the base loss (computed on float32 logits
            when the logits are fp16/bf16).
        detach_consensus: stop gradients through ``pbar`` (it acts as a fixed target).
        distribution: ``'softmax'``, ``'bernoulli'`` (per-class sigmoid, for BCE), or ``'auto'``
            (``'bernoulli'`` when ``base_loss`` is timm's ``BinaryCrossEntropy`` or ``BCEWithLogitsLoss``).
        reverse_kl: use KL(p_i || pbar) (AugMix direction) instead of the paper's KL(pbar || p_i).
        check_finite: raise on non-finite logits. Off by default: the check costs one host sync per step (and a graph
            break under ``torch.compile``); ``train.py`` checks the accumulated loss at each log interval instead
            (``--check-loss-every-step`` turns this check on).

    After each call, ``last_base`` and ``last_consistency`` hold the detached components.
    """

    def __init__(
            self,
            base_loss: nn.Module,
            num_repeats: int,
            rho: float = 1.0,
            detach_consensus: bool = False,
            distribution: str = 'auto',
            reverse_kl: bool = False,
            check_finite: bool = False,
    ):
        super().__init__()
        if not isinstance(num_repeats, int) or isinstance(num_repeats, bool) or num_repeats < 1:
            raise ValueError(
                f'num_repeats must be an integer >= 1 (the --aug-repeats value), got {num_repeats!r}.')
        if not rho >= 0:  # also rejects NaN
            raise ValueError(f'rho must be >= 0 (consistency weight, e.g. --lt-rho 1.0), got {rho!r}.')
        if distribution == 'auto':
            distribution = 'bernoulli' if _is_sigmoid_loss(base_loss) else 'softmax'
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be 'auto' or one of {DISTRIBUTIONS}, got {distribution!r}.")
        self.base_loss = base_loss
        self.num_repeats = num_repeats
        self.rho = float(rho)
        self.detach_consensus = detach_consensus
        self.distribution = distribution
        self.reverse_kl = reverse_kl
        self.check_finite = check_finite
        self.last_base: Optional[torch.Tensor] = None
        self.last_consistency: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f'num_repeats={self.num_repeats}, rho={self.rho}, detach_consensus={self.detach_consensus}, '
                f'distribution={self.distribution!r}, reverse_kl={self.reverse_kl}')

    def _check_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.dim() != 2:
            raise ValueError(
                f'LossTransform expects logits of shape (batch, classes), got {tuple(logits.shape)}; '
                f'flatten extra dims or pool before the loss.')
        if target.shape[0] != logits.shape[0]:
            raise ValueError(
                f'target has {target.shape[0]} rows but logits have {logits.shape[0]}: '
                f'target shape {tuple(target.shape)} vs logits {tuple(logits.shape)}; they must match row for row.')
        if target.dim() == 2 and target.shape != logits.shape:
            raise ValueError(
                f'soft target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: '
                f'the mixup/label-smoothing num_classes must equal the model head (--num-classes).')
        if target.dim() > 2:
            raise ValueError(f'target must be (batch,) indices or (batch, classes) soft labels, got {tuple(target.shape)}.')
        if self.check_finite and not bool(torch.isfinite(logits).all()):
            raise ValueError(
                'non-finite logits (NaN/inf) reached LossTransform: training diverged; lower --lr, '
                'enable --clip-grad, or check the input data.')

    def consistency(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over rows of the divergence of each replica from its image's consensus."""
        logp = log_distribution(logits, self.distribution)
        return blockwise_kl(logp, self.num_repeats, self.detach_consensus, self.reverse_kl).mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_inputs(logits, target)
        # fp16/bf16 logits: the base loss runs in float32 too (as under autocast), else e.g. fp16
        # log_softmax overflows to -inf for logit gaps > 65504.
        base = self.base_loss(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, target)
        if self.rho == 0.:
            # Exactly the base loss; the term is still measured for logging.
            with torch.no_grad():
                cons = self.consistency(logits)
            loss = base
        else:
            cons = self.consistency(logits)
            loss = base + self.rho * cons
        self.last_base = base.detach()
        self.last_consistency = cons.detach()
        return loss
