"""validate.py's top-1 among the classes present (an ImageNet subset under the 1000-way head) against a slow loop."""
import pytest
import torch
import torch.nn as nn

from lt_timm.accuracy import validate


class FixedLogits(nn.Module):
    """Returns the logits stored for each input row (the input is the row index)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer('logits', logits)

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def slow_top1_present(logits, target, present):
    hits = 0
    for row, t in zip(logits.tolist(), target.tolist()):
        best = max(present, key=lambda c: row[c])  # first maximum among the present classes
        hits += best == t
    return 100. * hits / len(target)


@pytest.mark.parametrize('seed', range(8))
def test_top1_present_matches_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    classes, n = 50, 37
    present = torch.randperm(classes, generator=g)[:int(torch.randint(2, 12, (1,), generator=g))].sort().values
    target = present[torch.randint(len(present), (n,), generator=g)]
    logits = torch.randn(n, classes, generator=g)
    rows = torch.arange(n, dtype=torch.float32)[:, None]
    loader = [(rows[i:i + 8], target[i:i + 8]) for i in range(0, n, 8)]
    metrics = validate(FixedLogits(logits), loader, torch.device('cpu'), present=present)
    assert metrics['top1_present'] == pytest.approx(slow_top1_present(logits, target, present.tolist()))
    assert metrics['top1_present'] >= metrics['top1']
    assert 'top1_present' not in validate(FixedLogits(logits), loader, torch.device('cpu'))
