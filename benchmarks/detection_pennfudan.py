#!/usr/bin/env python3
"""Benchmark: plain multi-task loss (l_multi) vs instance-level LossTransform T(l_multi) on PennFudanPed, with
instances matched by ground truth (``--lt-match gt``) or by the paper's matching of predicted boxes (``predicted``).

Runs ``train_detection.py`` with ``configs/detection/pennfudan_cpu_bench.yaml`` (Mask R-CNN, timm
mobilenetv3_large_100 + FPN, from scratch, 160 px, 120 train / 50 val images) for each method and seed
(``--jobs`` runs at a time, one thread each), then writes

* ``benchmarks/results/detection_pennfudan.csv``  — one row per run + a mean row per loss;
* ``benchmarks/results/detection_pennfudan.json`` — command, versions, seeds, per-run metrics and curves;
* ``benchmarks/results/detection_pennfudan.png``  — final box/mask AP per loss and AP-vs-epoch curves.

Usage:
    python benchmarks/detection_pennfudan.py --data-dir /tmp/datasets/pennfudan/data/PennFudanPed \
        --methods multi lt_gt lt_predicted --seeds 0 1 2 --jobs 2
"""
import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ('box_AP', 'box_AP50', 'box_AP75', 'mask_AP', 'mask_AP50', 'mask_AP75')
# method -> (label, train_detection.py flags); everything else comes from the shared config
METHODS = {
    'multi': ('l_multi', ['--loss', 'multi']),
    'lt_gt': ('T(l_multi), gt matching', ['--loss', 'losstransform', '--lt-match', 'gt']),
    'lt_predicted': ('T(l_multi), predicted matching', ['--loss', 'losstransform', '--lt-match', 'predicted']),
}
LABEL = {k: v[0] for k, v in METHODS.items()}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-dir', default='/tmp/datasets/pennfudan/data/PennFudanPed')
    p.add_argument('--config', default=os.path.join(REPO, 'configs', 'detection', 'pennfudan_cpu_bench.yaml'))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    p.add_argument('--jobs', type=int, default=1, help='runs at a time (each single-threaded, see the config)')
    p.add_argument('--reuse', action='store_true', default=False,
                   help='keep runs that already finished in --output (their summary.csv reaches the last epoch)')
    p.add_argument('--output', default=os.path.join(REPO, 'output', 'detection', 'bench'))
    p.add_argument('--results', default=os.path.join(REPO, 'benchmarks', 'results'))
    p.add_argument('--extra', nargs=argparse.REMAINDER, default=[], help='extra train_detection.py flags')
    return p.parse_args()


def read_summary(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [{k: (float(v) if v not in ('', None) else None) for k, v in r.items()} for r in rows]


def finished(run_dir):
    """A run folder whose summary.csv holds the last epoch its args.yaml asked for."""
    import yaml
    try:
        with open(os.path.join(run_dir, 'args.yaml')) as f:
            epochs = int(yaml.safe_load(f)['epochs'])
        rows = read_summary(os.path.join(run_dir, 'summary.csv'))
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return bool(rows) and int(rows[-1]['epoch']) == epochs - 1


def collect(run_dir, method, seed, wall_s):
    curve = read_summary(os.path.join(run_dir, 'summary.csv'))
    final = curve[-1]
    return {'loss': method, 'seed': seed, 'wall_s': round(wall_s, 1), **{k: final.get(f'eval_{k}') for k in METRICS},
            'train_consistency': final.get('train_consistency'), 'curve': curve}


def plot(runs, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    losses = sorted({r['loss'] for r in runs}, key=list(METHODS).index)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(losses)
    for li, loss in enumerate(losses):
        rs = [r for r in runs if r['loss'] == loss]
        for mi, key in enumerate(('box_AP', 'mask_AP')):
            vals = [r[key] for r in rs]
            x = mi + (li - (len(losses) - 1) / 2) * width
            ax[0].bar(x, sum(vals) / len(vals), width, color=f'C{li}', alpha=0.7,
                      label=LABEL[loss] if mi == 0 else None)
            ax[0].scatter([x] * len(vals), vals, color='k', s=12, zorder=3)
        for ki, key in enumerate(('train_loss', 'train_consistency')):
            for si, r in enumerate(rs):
                pts = [(c['epoch'] + 1, c[key]) for c in r['curve'] if c.get(key) is not None]
                if pts:
                    ax[1 + ki].plot(*zip(*pts), marker='o', color=f'C{li}', alpha=0.8,
                                    linestyle='-' if si == 0 else '--',
                                    label=f'{LABEL[loss]} seed {r["seed"]}')
    ax[0].set_xticks([0, 1])
    ax[0].set_xticklabels(['box AP', 'mask AP'])
    ax[0].set_ylabel('AP@[.5:.95] (%)')
    ax[0].set_title('final AP (bars: mean, dots: seeds)')
    ax[0].legend()
    titles = ('training loss (sum of the loss dict)', 'measured consistency (unweighted, both losses)')
    for ki, title in enumerate(titles):
        ax[1 + ki].set_xlabel('epoch')
        ax[1 + ki].set_title(title)
        ax[1 + ki].legend(fontsize=7)
    fig.suptitle('PennFudanPed, Mask R-CNN (mobilenetv3_large_100 FPN, scratch, 160 px, CPU)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    a = parse()
    if not os.path.isdir(a.data_dir):
        print(f'error: PennFudanPed directory not found: {a.data_dir}', file=sys.stderr)
        return 2
    os.makedirs(a.results, exist_ok=True)
    runs, t_all = [], time.time()
    jobs = [(seed, method) for seed in a.seeds for method in a.methods]
    pending, running = [], []
    for seed, method in jobs:
        run_dir = os.path.join(a.output, f'{method}-s{seed}')
        if a.reuse and finished(run_dir):  # wall time of a reused run: the sum of its epochs' train + eval times
            curve = read_summary(os.path.join(run_dir, 'summary.csv'))
            wall = sum(v for c in curve for v in (c.get('train_epoch_time'), c.get('eval_time'))
                       if v is not None and v == v)  # NaN: no evaluation that epoch
            runs.append(collect(run_dir, method, seed, wall))
            print(f'reusing {run_dir}', flush=True)
        else:
            pending.append((seed, method))
    while pending or running:
        while pending and len(running) < max(1, a.jobs):
            seed, method = pending.pop(0)
            exp = f'{method}-s{seed}'
            cmd = [sys.executable, os.path.join(REPO, 'train_detection.py'), '-c', a.config, '--data-dir', a.data_dir,
                   *METHODS[method][1], '--seed', str(seed), '--output', a.output, '--experiment', exp, '--no-plot',
                   *a.extra]
            shutil.rmtree(os.path.join(a.output, exp), ignore_errors=True)  # a rerun replaces its own run folder
            print('$ ' + ' '.join(cmd), flush=True)
            env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
            log = open(os.path.join(a.results, f'.{exp}.log'), 'w')
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), seed, method, exp,
                            time.time(), log))
        time.sleep(2)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            proc, seed, method, exp, t0, log = job
            log.close()
            if proc.returncode != 0:
                print(f'error: run {exp} failed with exit code {proc.returncode} (log: {log.name})', file=sys.stderr)
                return proc.returncode
            os.remove(log.name)
            run = collect(os.path.join(a.output, exp), method, seed, time.time() - t0)
            runs.append(run)
            print(f'{exp}: ' + '  '.join(f'{k} {run[k]:.2f}' for k in METRICS), flush=True)
    runs.sort(key=lambda r: (r['seed'], list(METHODS).index(r['loss'])))

    csv_path = os.path.join(a.results, 'detection_pennfudan.csv')
    fields = ['loss', 'seed', *METRICS, 'train_consistency', 'wall_s']  # 'loss': the method
    rows = [{k: r[k] for k in fields} for r in runs]
    for loss in a.methods:
        rs = [r for r in runs if r['loss'] == loss]
        mean = {'loss': loss, 'seed': 'mean'}
        for k in (*METRICS, 'train_consistency', 'wall_s'):
            mean[k] = sum(r[k] for r in rs) / len(rs)
        rows.append(mean)
    with open(csv_path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f'{v:.3f}' if isinstance(v, float) else v) for k, v in r.items()})

    import timm
    import torch
    import torchvision
    info = {
        'command': ' '.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        'config': os.path.relpath(a.config, REPO), 'extra_flags': a.extra, 'seeds': a.seeds,
        'methods': {m: METHODS[m][1] for m in a.methods}, 'jobs': a.jobs,
        'versions': {'python': platform.python_version(), 'torch': torch.__version__,
                     'torchvision': torchvision.__version__, 'timm': timm.__version__},
        'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'device': 'cpu'},
        'total_wall_s': round(time.time() - t_all, 1),
        'mean': {r['loss']: {k: r[k] for k in METRICS} for r in rows if r['seed'] == 'mean'},
        'runs': runs,
    }
    with open(os.path.join(a.results, 'detection_pennfudan.json'), 'w') as f:
        json.dump(info, f, indent=2)
    plot(runs, os.path.join(a.results, 'detection_pennfudan.png'))
    print(f'wrote {csv_path} (total {info["total_wall_s"]:.0f}s)')
    for r in rows:
        if r['seed'] == 'mean':
            print(f'{LABEL[r["loss"]]:>31s}: ' + '  '.join(f'{k} {r[k]:.2f}' for k in METRICS))
    return 0


if __name__ == '__main__':
    sys.exit(main())
