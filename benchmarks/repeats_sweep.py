"""Fig. 4: accuracy against the number of repetitions m under the paper's original batching, on CIFAR-10.

Paper, Sec. 4.1.4: "To evaluate the impact of the number of repetitions m on model training, four distinct data
augmentation techniques are used: affine transformation, horizontal flipping, CutMix, and mixup, with different
values of m during training. For other training settings in our experiments, we follow the configurations outlined
in the ResNet and DenseNet papers." Fig. 4 (left): "All networks tend to gain more performance improvement with the
growing number of repetitions m."

Each run is ``train.py -c RECIPE`` (default: Table 1's ResNet-20 recipe, RandAugment + flip, m = 32 under
``--lt-epoch original``) with ``--aug-repeats m`` for m in ``--repeats``, plus mixup and CutMix (timm alternates
them batch by batch), all other flags equal; m = 1 is plain CCE (one replica: no consistency term). ``--epochs``
shortens He et al.'s 182-epoch schedule with the lr divided by 10 at the same fractions (50 % and 75 %); the plot
and the results say how many epochs ran. ``--train-per-class`` / ``--test-per-class`` train and test on the first
images of each class (a folder of symlinks under ``--output``), for a shortened run; the default is all of them.
The top-1 error is the last epoch's, so the test set selects nothing.

Resumable: a finished run (its ``result.json``) is kept on a rerun, an interrupted one resumes from its
``last.pth.tar``; after every finished run the results (``--name``: CSV, JSON and a PNG with error and gain over
m = 1 against m) are rewritten.

    python benchmarks/repeats_sweep.py --data-dir /tmp/datasets/cifar10 --repeats 1 2 4 8 16 32 --seeds 0 1 \\
        --epochs 30 --device cuda --workers 8
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (REPO, RESULTS, environment, log, read_summary, run_cmd, shell_join,  # noqa: E402
                               write_csv, write_json)

FULL_EPOCHS = 182  # He et al.'s 64k iterations (Table 1's recipes)
MIX = ['--mixup', '1.0', '--cutmix', '1.0']  # Fig. 4's CutMix and mixup on top of the recipe's RandAugment + flip


def subset_folder(src: str, dst: str, per_class: dict) -> str:
    """An ImageFolder of symlinks to the first ``per_class[split]`` images of each class of ``src`` (sorted)."""
    for split, n in per_class.items():
        for cls in sorted(os.listdir(os.path.join(src, split))):
            out = os.path.join(dst, split, cls)
            os.makedirs(out, exist_ok=True)
            files = sorted(os.listdir(os.path.join(src, split, cls)))
            for name in files[:n] if n else files:
                link = os.path.join(out, name)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(src, split, cls, name)), link)
    return dst


def train_command(args, data_dir: str, m: int, seed: int, run: str, resume: bool):
    miles = [max(1, round(args.epochs * f)) for f in (0.5, 0.75)]
    method = ['--aug-repeats', str(m), '--loss', 'losstransform'] if m > 1 else ['--aug-repeats', '0', '--loss', 'ce']
    cmd = [sys.executable, 'train.py', '-c', args.recipe, '--data-dir', data_dir, *method, *MIX,
           '-b', str(args.images_per_step), '--epochs', str(args.epochs), '--decay-milestones', *map(str, miles),
           '--seed', str(seed), '--device', args.device, '--workers', str(args.workers), '--log-interval', '50',
           '--checkpoint-hist', '1', '--no-plot', '--output', os.path.dirname(run), '--experiment',
           os.path.basename(run)]
    if resume:
        cmd += ['--resume', os.path.join(run, 'last.pth.tar')]
    return cmd


def one_run(args, data_dir: str, m: int, seed: int):
    """Train (or resume, or reuse) one run; returns its result row or None when it failed."""
    run = os.path.join(args.output, f'm{m}-s{seed}')
    result = os.path.join(run, 'result.json')
    if os.path.exists(result):
        with open(result) as f:
            return json.load(f)
    resume = os.path.exists(os.path.join(run, 'last.pth.tar'))
    cmd = train_command(args, data_dir, m, seed, run, resume)
    log(f'm={m} seed={seed}: python {shell_join(cmd[1:])}')
    r = run_cmd(cmd, run + ('.resume.log' if resume else '.log'), threads=args.threads)
    summary = read_summary(run)
    if r['rc'] != 0 or len(summary) != args.epochs:
        log(f'm={m} seed={seed}: FAILED rc={r["rc"]}, see {run}.log')
        return None
    last = summary[-1]
    row = dict(m=m, seed=seed, epochs=args.epochs, full_epochs=FULL_EPOCHS, top1_err=round(100 - last['eval_top1'], 3),
               top5_err=round(100 - last['eval_top5'], 3),
               rows_per_step=args.images_per_step * m, train_s=round(sum(s['train_epoch_s'] for s in summary), 1),
               train_rows_per_s=round(last.get('train_img_s', float('nan')), 1),
               curve=[round(100 - s['eval_top1'], 3) for s in summary], command='python ' + shell_join(cmd[1:]))
    write_json(result, row)
    return row


def plot(path: str, rows, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ms = sorted({r['m'] for r in rows})
    mean = {m: sum(r['top1_err'] for r in rows if r['m'] == m) / sum(1 for r in rows if r['m'] == m) for m in ms}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        axes[0].scatter(r['m'], r['top1_err'], color='tab:gray', s=12)
    axes[0].plot(ms, [mean[m] for m in ms], 'o-', color='tab:blue')
    axes[0].set_ylabel('top-1 test error (%), last epoch')
    if 1 in mean:
        gains = [mean[1] - mean[m] for m in ms]
        axes[1].plot(ms, gains, 'o-', color='tab:green')
        axes[1].axhline(0, color='k', lw=0.5)
        axes[1].set_ylabel('accuracy gain over m = 1 (CE), points')
    for ax in axes:
        ax.set_xscale('log', base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_xlabel('repetitions m (original batching)')
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default='/tmp/datasets/cifar10', help='ImageFolder with train/ and test/')
    p.add_argument('--recipe', default='configs/cifar/table1_resnet20_lt.yaml')
    p.add_argument('--repeats', nargs='+', type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument('--seeds', nargs='+', type=int, default=[0])
    p.add_argument('--epochs', type=int, default=FULL_EPOCHS, help=f'shortens the {FULL_EPOCHS}-epoch schedule')
    p.add_argument('-b', '--images-per-step', type=int, default=128, help='images per step (rows: x m)')
    p.add_argument('--train-per-class', type=int, default=0, help='first N train images per class (0: all)')
    p.add_argument('--test-per-class', type=int, default=0, help='first N test images per class (0: all)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--output', default=os.path.join(REPO, 'output', 'bench_repeats_sweep'))
    p.add_argument('--name', default='repeats_sweep', help='results: RESULTS/NAME.{csv,json,png}')
    p.add_argument('--results', default=RESULTS, help='folder of the results (default: benchmarks/results)')
    args = p.parse_args(argv)
    data_dir = args.data_dir
    if args.train_per_class or args.test_per_class:
        data_dir = subset_folder(args.data_dir, os.path.join(args.output, 'data'),
                                 dict(train=args.train_per_class, test=args.test_per_class))
    shortened = args.epochs != FULL_EPOCHS or args.train_per_class or args.test_per_class
    label = (f'{os.path.basename(args.recipe)}, + mixup/CutMix, {args.epochs} epochs'
             + (f' (SHORTENED: paper {FULL_EPOCHS})' if args.epochs != FULL_EPOCHS else '')
             + (f', {args.train_per_class or "all"} train / {args.test_per_class or "all"} test images per class'
                if shortened else ', full CIFAR-10'))
    out = dict(benchmark='repeats_sweep', label=label, shortened=bool(shortened),
               command='python ' + shell_join(sys.argv), args=vars(args), environment=environment(),
               started=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))
    rows = []
    for seed in args.seeds:
        for m in args.repeats:
            row = one_run(args, data_dir, m, seed)
            if row is None:
                continue
            rows.append(row)
            log(f'm={m} seed={seed}: top-1 error {row["top1_err"]:.2f} % after {row["epochs"]} epochs')
            write_csv(os.path.join(args.results, args.name + '.csv'), [{k: v for k, v in r.items() if k != 'curve'}
                                                                  for r in rows])
            write_json(os.path.join(args.results, args.name + '.json'), dict(out, runs=rows))
            plot(os.path.join(args.results, args.name + '.png'), rows, label)
    out['finished'] = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
    write_json(os.path.join(args.results, args.name + '.json'), dict(out, runs=rows))
    return 0 if len(rows) == len(args.seeds) * len(args.repeats) else 1


if __name__ == '__main__':
    sys.exit(main())
