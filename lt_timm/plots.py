"""PNG plots: training curves from a timm ``summary.csv`` and the Fig. 3 style view x class heatmap."""
import csv
import os
from typing import Optional, Sequence

__all__ = ['plot_training_curves', 'plot_view_heatmap']


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _read_summary(path: str):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    cols = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float('nan'))
    return cols


def plot_training_curves(summary_csv: str, out_png: str, title: Optional[str] = None) -> str:
    """Loss (total, base, consistency), eval top-1 and learning rate against epoch."""
    plt = _pyplot()
    c = _read_summary(summary_csv)
    ep = c.get('epoch', [])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (('train_loss', 'train loss'), ('train_loss_base', 'base'),
                       ('train_loss_consistency', 'consistency'), ('eval_loss', 'eval loss')):
        if key in c:
            axes[0].plot(ep, c[key], marker='o', ms=3, label=label)
    axes[0].set_xlabel('epoch'); axes[0].set_ylabel('loss'); axes[0].legend(fontsize=8)
    ema = 'eval_noema_top1' in c  # with --model-ema, eval_top1 is the EMA weights' (as timm)
    for key, label in (('eval_top1', 'EMA top-1' if ema else 'top-1'), ('eval_noema_top1', 'top-1 (no EMA)'),
                       ('eval_box_AP', 'box AP'),
                       ('eval_mask_AP', 'mask AP')):
        if key in c:
            axes[1].plot(ep, c[key], marker='o', ms=3, label=label)
    axes[1].set_xlabel('epoch'); axes[1].set_ylabel('eval accuracy / AP (%)'); axes[1].legend(fontsize=8)
    if 'lr' in c:
        axes[2].plot(ep, c['lr'], marker='o', ms=3)
    axes[2].set_xlabel('epoch'); axes[2].set_ylabel('learning rate')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_view_heatmap(probs, out_png: str, class_names: Optional[Sequence[str]] = None,
                      labels: Optional[Sequence[int]] = None, title: Optional[str] = None) -> str:
    """Fig. 3 style: for each of a few images, a (views x classes) heatmap of predicted probabilities.

    Args:
        probs: array-like ``(images, views, classes)``.
    """
    import numpy as np
    plt = _pyplot()
    probs = np.asarray(probs)
    n_img, n_views, n_cls = probs.shape
    fig, axes = plt.subplots(1, n_img, figsize=(2.4 * n_img + 1, 0.3 * n_views + 1.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(probs[i], vmin=0, vmax=1, cmap='viridis', aspect='auto')
        ax.set_xlabel('class'); ax.set_ylabel('view' if i == 0 else '')
        if class_names is not None and n_cls <= 12:
            ax.set_xticks(range(n_cls)); ax.set_xticklabels(class_names, rotation=90, fontsize=6)
        ax.set_title(f'image {i}' + (f' (y={labels[i]})' if labels is not None else ''), fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label='p(class)')
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100, bbox_inches='tight')
    plt.close(fig)
    return out_png
