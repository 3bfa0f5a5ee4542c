"""Prediction consistency across augmented views (the paper's Fig. 3 claim) and test-time averaging.

Each image is passed through the *training* transform ``num_views`` times; the views of one image sit in
consecutive rows, the same layout as a training batch (:mod:`lt_timm.layout`), so the consensus and the
divergence are the loss's own functions.
"""
from contextlib import suppress
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .layout import replica_groups
from .loss import consensus_log_prob, grouped_kl

__all__ = ['RepeatedViews', 'ViewStatistics', 'view_statistics']


class RepeatedViews(Dataset):
    """``num_views`` independently transformed copies of each image, in consecutive rows."""

    def __init__(self, dataset: Dataset, num_views: int):
        if num_views < 1:
            raise ValueError(f'number of views must be >= 1, got {num_views}.')
        self.dataset = dataset
        self.num_views = num_views

    def __len__(self) -> int:
        return len(self.dataset) * self.num_views

    def __getitem__(self, index: int):
        return self.dataset[index // self.num_views]


@dataclass
class ViewStatistics:
    num_images: int
    num_views: int
    consistency_kl: float     # mean over images and views of KL(pbar || p_view)
    view_agreement: float     # mean fraction of views whose argmax equals the consensus argmax
    all_views_agree: float    # fraction of images whose views all predict the same class
    tta_top1: float           # accuracy (%) of the consensus prediction
    probs: Optional[torch.Tensor] = None  # (images, views, classes) for the first few images


@torch.no_grad()
def view_statistics(
        model: nn.Module,
        dataset: Dataset,
        num_views: int,
        batch_images: int = 16,
        num_workers: int = 0,
        device: torch.device = torch.device('cpu'),
        max_images: Optional[int] = None,
        keep_probs: int = 0,
        amp_autocast=suppress,
) -> ViewStatistics:
    """Evaluate ``model`` on ``num_views`` augmented views per image of ``dataset`` (whose transform augments)."""
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    loader = DataLoader(RepeatedViews(dataset, num_views), batch_size=batch_images * num_views,
                        shuffle=False, num_workers=num_workers)
    model.eval()
    kl_sum, agree_sum, all_agree, correct, n_img = 0., 0., 0, 0, 0
    kept = []
    for input, target in loader:
        input, target = input.to(device), target.to(device)
        with amp_autocast():
            logits = model(input)
        logp = torch.log_softmax(logits.float(), dim=-1)
        rows = logp.shape[0]
        groups = replica_groups(rows, num_views, device=logp.device)
        kl_sum += grouped_kl(logp, groups).sum().item()
        log_pbar = consensus_log_prob(logp, groups)
        consensus = log_pbar.argmax(-1)
        views = logp.argmax(-1).view(-1, num_views)
        agree_sum += (views == consensus[:, None]).float().mean(1).sum().item()
        all_agree += int((views == views[:, :1]).all(1).sum())
        correct += int((consensus == target.view(-1, num_views)[:, 0]).sum())
        n_img += views.shape[0]
        if len(kept) * batch_images < keep_probs:
            kept.append(logp.exp().view(-1, num_views, logp.shape[-1]).cpu())
    probs = torch.cat(kept)[:keep_probs] if kept else None
    return ViewStatistics(
        num_images=n_img, num_views=num_views, consistency_kl=kl_sum / max(n_img * num_views, 1),
        view_agreement=agree_sum / max(n_img, 1), all_views_agree=all_agree / max(n_img, 1),
        tta_top1=100. * correct / max(n_img, 1), probs=probs)
