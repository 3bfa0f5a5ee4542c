"""channels_last on the CPU: the fine-tuning step and the evaluation of an EfficientNet (depthwise convolutions) in
NCHW vs channels_last memory layout, measured side by side (interleaved trials, same process, same inputs).

This is why the ImageNet recipes (configs/imagenet/efficientnet_lite0_*.yaml) set ``channels_last: true``: on the
CPU it raises the throughput of EfficientNet-Lite0 at 224 px by 1.8x for the train step and 1.65x for evaluation
(median of 5 paired trials on 2 cores; docs/imagenet.md).

    OMP_NUM_THREADS=2 python benchmarks/cpu_channels_last.py --trials 5

Results: benchmarks/results/cpu_channels_last.{csv,json,png}.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, environment, log, write_csv, write_json  # noqa: E402


def make(model_name: str, channels_last: bool):
    import timm
    import lt_timm  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def images_per_s(model, x: torch.Tensor, train: bool, steps: int) -> float:
    model.train(train)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if train else None
    for i in range(steps + 1):  # the first step warms up (allocations, oneDNN primitives)
        if i == 1:
            start = time.perf_counter()
        if train:
            loss = model(x).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)
    return steps * x.shape[0] / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='tf_efficientnet_lite0')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--train-batch', type=int, default=48)
    p.add_argument('--eval-batch', type=int, default=100)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--trials', type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    for trial in range(args.trials):
        for mode in ('train', 'eval'):
            batch = args.train_batch if mode == 'train' else args.eval_batch
            for channels_last in ((False, True) if trial % 2 == 0 else (True, False)):  # alternate the order
                x = torch.randn(batch, 3, args.img_size, args.img_size)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                rate = images_per_s(make(args.model, channels_last), x, mode == 'train', args.steps)
                rows.append(dict(trial=trial, mode=mode, channels_last=channels_last, batch=batch,
                                 img_per_s=round(rate, 2)))
                log(f'trial {trial} {mode} channels_last={channels_last}: {rate:.1f} img/s')
    summary = []
    for mode in ('train', 'eval'):
        ratios = [r2['img_per_s'] / r1['img_per_s'] for t in range(args.trials)
                  for r1 in rows if (r1['trial'], r1['mode'], r1['channels_last']) == (t, mode, False)
                  for r2 in rows if (r2['trial'], r2['mode'], r2['channels_last']) == (t, mode, True)]
        summary.append(dict(mode=mode, ratio_median=round(statistics.median(ratios), 3),
                            ratio_min=round(min(ratios), 3), ratio_max=round(max(ratios), 3),
                            nchw_img_s=round(statistics.median(r['img_per_s'] for r in rows
                                                               if r['mode'] == mode and not r['channels_last']), 1),
                            channels_last_img_s=round(statistics.median(r['img_per_s'] for r in rows
                                                                        if r['mode'] == mode and r['channels_last']), 1)))
        log(f'{mode}: channels_last / NCHW = {summary[-1]["ratio_median"]} '
            f'(min {summary[-1]["ratio_min"]}, max {summary[-1]["ratio_max"]}, {args.trials} paired trials)')
    write_csv(os.path.join(RESULTS, 'cpu_channels_last.csv'), rows)
    write_json(os.path.join(RESULTS, 'cpu_channels_last.json'),
               dict(args=vars(args), rows=rows, summary=summary, environment=environment()))
    plot(rows, summary, os.path.join(RESULTS, 'cpu_channels_last.png'), args)


def plot(rows, summary, path, args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for i, mode in enumerate(('train', 'eval')):
        for j, cl in enumerate((False, True)):
            vals = [r['img_per_s'] for r in rows if r['mode'] == mode and r['channels_last'] == cl]
            ax.scatter([i * 3 + j] * len(vals), vals, color='tab:green' if cl else 'tab:gray', alpha=0.7)
    ax.set_xticks([0, 1, 3, 4], ['train NCHW', 'train CL', 'eval NCHW', 'eval CL'])
    ax.set_ylabel('images / s (CPU)')
    ax.set_title(f'{args.model} {args.img_size}px on {os.cpu_count()} CPU cores, {args.trials} paired trials',
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    main()
