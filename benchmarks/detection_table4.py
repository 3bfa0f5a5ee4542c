#!/usr/bin/env python3
"""Benchmark: the paper's Table 4 recipe for one backbone, l_multi (``_multi``) vs T(l_multi) (``_lt``), shortened
for the CPU and labelled as such.

Runs ``train_detection.py -c configs/detection/pennfudan_maskrcnn_<backbone>_{multi,lt}.yaml`` (the recipe as
written: torchvision backbone from scratch, the paper's lr, anchors and FPN levels, 4 images x 2 replicas per step
with the original batching, lr /10 at 2/3 and 8/9 of the run, flip + random crop + simple copy-paste, Resort
matching) with the shortening flags of :data:`SHORTEN` (smaller images, fewer epochs with the steps scaled, narrower
RoI heads, fewer proposals, one thread), for each seed, ``--jobs`` runs at a time. Then writes

* ``benchmarks/results/detection_table4_<backbone>.csv``  — one row per run + a mean row per loss;
* ``benchmarks/results/detection_table4_<backbone>.json`` — commands, shortening, versions, per-run metrics, curves;
* ``benchmarks/results/detection_table4_<backbone>.png``  — final box/mask AP and AP / loss / consistency curves.

Resumable: a run whose ``summary.csv`` reaches its last epoch is kept; an unfinished one continues from its
``last.pth.tar`` (``--resume``, exact on the CPU); the results are rewritten from all finished runs.

Usage:
    python benchmarks/detection_table4.py --data-dir /tmp/datasets/PennFudanPed --backbone shufflenet_v2 \\
        --seeds 0 1 --jobs 2
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, RESULTS, environment, log, read_summary, shell_join, write_csv, write_json  # noqa: E402

METRICS = ('box_AP', 'box_AP50', 'box_AP75', 'mask_AP', 'mask_AP50', 'mask_AP75')
LOSSES = {'multi': 'l_multi', 'lt': 'T(l_multi)'}
# The CPU shortening (everything else is the recipe as written): 192 px instead of torchvision's 800/1333, 12 epochs
# with the lr steps at the same fractions (12 -> 8, 16 -> 11 of 18 -> 12), RoI heads 4x narrower (box MLP 256,
# mask head 64 channels), 200 RPN proposals and 64 sampled RoIs per image (torchvision: 2000 / 512), evaluated every
# 2 epochs, one thread per run.
SHORTEN = ['--img-size', '192', '--epochs', '12', '--lr-steps', '8', '11', '--box-head-dim', '256',
           '--mask-head-channels', '64', '--rpn-pre-nms', '200', '--rpn-post-nms', '200',
           '--box-batch-per-image', '64', '--eval-interval', '2', '--threads', '1', '--log-interval', '10',
           '--no-plot']


def parse():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-dir', default='/tmp/datasets/PennFudanPed')
    p.add_argument('--backbone', default='shufflenet_v2',
                   help='recipe key: configs/detection/pennfudan_maskrcnn_<backbone>_{multi,lt}.yaml')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--losses', nargs='+', default=list(LOSSES), choices=list(LOSSES))
    p.add_argument('--jobs', type=int, default=2, help='runs at a time (one thread each)')
    p.add_argument('--output', default=os.path.join(REPO, 'output', 'detection', 'table4_cpu'))
    p.add_argument('--results', default=RESULTS)
    return p.parse_args()


def recipe(a, loss):
    return os.path.join(REPO, 'configs', 'detection', f'pennfudan_maskrcnn_{a.backbone}_{loss}.yaml')


def epochs_done(run_dir):
    """(last epoch in summary.csv + 1, the epochs the run asked for) — (0, None) before its first epoch."""
    import yaml
    try:
        with open(os.path.join(run_dir, 'args.yaml')) as f:
            wanted = int(yaml.safe_load(f)['epochs'])
    except (OSError, KeyError, TypeError, ValueError):
        return 0, None
    rows = read_summary(run_dir)
    return (int(rows[-1]['epoch']) + 1 if rows else 0), wanted


def command(a, loss, seed, run_dir, resume=True):
    """The run's command: the recipe, the shortening, the seed; ``--resume`` where a checkpoint exists."""
    cmd = [sys.executable, os.path.join(REPO, 'train_detection.py'), '-c', recipe(a, loss), '--data-dir', a.data_dir,
           '--seed', str(seed), '--output', a.output, '--experiment', os.path.basename(run_dir), *SHORTEN]
    ckpt = os.path.join(run_dir, 'last.pth.tar')
    return cmd + ['--resume', ckpt] if resume and os.path.exists(ckpt) else cmd


def start(a, loss, seed):
    run_dir = os.path.join(a.output, f'{a.backbone}-{loss}-s{seed}')
    cmd = command(a, loss, seed, run_dir)
    if '--resume' not in cmd and os.path.isdir(run_dir):  # a folder without a checkpoint: nothing to keep
        import shutil
        shutil.rmtree(run_dir)
    log('$ ' + shell_join([os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd]))
    os.makedirs(a.output, exist_ok=True)
    out = open(os.path.join(a.output, f'{os.path.basename(run_dir)}.log'), 'a')
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env), run_dir, out


def collect(run_dir, loss, seed):
    curve = read_summary(run_dir)
    final = curve[-1]
    wall = sum(v for c in curve for v in (c.get('train_epoch_time'), c.get('eval_time')) if v == v)
    return {'loss': loss, 'seed': seed, **{k: final.get(f'eval_{k}') for k in METRICS},
            'train_consistency': final.get('train_consistency'), 'train_s': round(wall, 1),
            'run_dir': os.path.relpath(run_dir, REPO), 'curve': curve}


def run_all(a):
    """Start every unfinished run (``--jobs`` at a time) and wait; returns the failed run folders."""
    pending = []
    for seed in a.seeds:
        for loss in a.losses:
            done, wanted = epochs_done(os.path.join(a.output, f'{a.backbone}-{loss}-s{seed}'))
            if wanted is not None and done >= wanted:
                log(f'kept finished run {a.backbone}-{loss}-s{seed}')
            else:
                pending.append((loss, seed))
    running, failed = [], []
    while pending or running:
        while pending and len(running) < max(1, a.jobs):
            running.append(start(a, *pending.pop(0)))
        time.sleep(5)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            proc, run_dir, out = job
            out.close()
            log(f'{os.path.basename(run_dir)} exited with {proc.returncode}')
            if proc.returncode != 0:
                failed.append(run_dir)
    return failed


def plot(runs, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    losses = [k for k in LOSSES if any(r['loss'] == k for r in runs)]
    for li, loss in enumerate(losses):
        rs = [r for r in runs if r['loss'] == loss]
        for mi, key in enumerate(('box_AP', 'box_AP50', 'mask_AP', 'mask_AP50')):
            vals = [r[key] for r in rs]
            x = mi + (li - (len(losses) - 1) / 2) * 0.35
            ax[0].bar(x, sum(vals) / len(vals), 0.35, color=f'C{li}', alpha=0.7,
                      label=LOSSES[loss] if mi == 0 else None)
            ax[0].scatter([x] * len(vals), vals, color='k', s=12, zorder=3)
        for ki, key in enumerate(('eval_box_AP', 'train_loss', 'train_consistency')):
            for si, r in enumerate(rs):
                pts = [(c['epoch'] + 1, c[key]) for c in r['curve'] if c.get(key) == c.get(key)]
                ax[1 + ki].plot(*zip(*pts), marker='o', ms=3, color=f'C{li}', linestyle='-' if si == 0 else '--',
                                label=f'{LOSSES[loss]} seed {r["seed"]}')
    ax[0].set_xticks(range(4))
    ax[0].set_xticklabels(['box AP', 'box AP50', 'mask AP', 'mask AP50'])
    ax[0].set_ylabel('%')
    ax[0].set_title('final (bars: mean, dots: seeds)')
    ax[0].legend()
    for ki, t in enumerate(('box AP (%) on the 50 held-out images', 'training loss', 'consistency (unweighted)')):
        ax[1 + ki].set_xlabel('epoch')
        ax[1 + ki].set_title(t)
        ax[1 + ki].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(a, runs, total_s):
    stem = os.path.join(a.results, f'detection_table4_{a.backbone}')
    fields = ['loss', 'seed', *METRICS, 'train_consistency', 'train_s']
    rows = [{k: r[k] for k in fields} for r in runs]
    for loss in a.losses:
        rs = [r for r in runs if r['loss'] == loss]
        if rs:
            rows.append({'loss': loss, 'seed': 'mean', **{k: sum(r[k] for r in rs) / len(rs)
                                                          for k in (*METRICS, 'train_consistency', 'train_s')}})
    write_csv(stem + '.csv', [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
              fields)
    commands = {f'{loss}-s{seed}': 'python ' + shell_join(
        [os.path.relpath(c, REPO) if c.startswith(REPO) else c
         for c in command(a, loss, seed, os.path.join(a.output, f'{a.backbone}-{loss}-s{seed}'), resume=False)[1:]])
        for loss in a.losses for seed in a.seeds}
    write_json(stem + '.json', {
        'label': f'Table 4 recipe ({a.backbone}), SHORTENED for the CPU: ' + ' '.join(SHORTEN),
        'script': 'benchmarks/detection_table4.py ' + ' '.join(sys.argv[1:]), 'recipes': {
            k: os.path.relpath(recipe(a, k), REPO) for k in a.losses},
        'shortening': SHORTEN, 'commands': commands, 'environment': environment(), 'total_wall_s': round(total_s),
        'mean': {r['loss']: {k: r[k] for k in METRICS} for r in rows if r['seed'] == 'mean'}, 'runs': runs})
    plot(runs, stem + '.png', f'PennFudanPed, Mask R-CNN on torchvision {a.backbone} + FPN from scratch: the paper\'s '
         f'Table 4 recipe, shortened for the CPU (192 px, 12 epochs, narrow RoI heads)')
    return stem


def main():
    a = parse()
    if not os.path.isdir(a.data_dir):
        print(f'error: PennFudanPed directory not found: {a.data_dir}; pass --data-dir', file=sys.stderr)
        return 2
    if not all(os.path.exists(recipe(a, k)) for k in a.losses):
        print(f'error: no recipe configs/detection/pennfudan_maskrcnn_{a.backbone}_*.yaml', file=sys.stderr)
        return 2
    t0 = time.time()
    failed = run_all(a)
    if failed:
        print(f'error: {len(failed)} run(s) failed: {failed}; see their .log in {a.output}, rerun to resume',
              file=sys.stderr)
        return 1
    runs = [collect(os.path.join(a.output, f'{a.backbone}-{loss}-s{seed}'), loss, seed)
            for seed in a.seeds for loss in a.losses]
    stem = write_results(a, runs, time.time() - t0)
    log(f'wrote {stem}.csv/.json/.png')
    for r in runs:
        log(f'{LOSSES[r["loss"]]:>10s} seed {r["seed"]}: ' + '  '.join(f'{k} {r[k]:.2f}' for k in METRICS))
    return 0


if __name__ == '__main__':
    sys.exit(main())
