"""Small hyper-parameter sweep for LossTransform's defaults, on a validation split carved out of *train*.

One factor at a time around the default (rho = 1, m = 3, detach off, KL(pbar || p_i)), 1 seed, short runs:
  ce                 reference (no repeats, no consistency term)
  lt_default         rho 1, m 3, detach off, paper KL direction
  rho_0.3, rho_3     --lt-rho
  detach             --lt-detach (pbar is a fixed target)
  m_2, m_4           --aug-repeats
  reverse_kl         --lt-reverse-kl: AugMix direction KL(p_i || pbar)
All LT runs use the v1 epoch (same samples per epoch as CE). The real val split is never touched:
prepare the carved split with ``python benchmarks/prepare_data.py`` (10 % of each class of train).

    python benchmarks/sweep.py --data-dir /tmp/datasets/imagenette64_sweep --img-size 32 --epochs 6

Results: benchmarks/results/sweep.csv / .json / .png. Finished runs are reused on a rerun.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import IMAGENETTE_AUG, REPO, RESULTS, environment, log, read_summary, run_cmd, shell_join, write_csv, write_json  # noqa: E402

LT = ['--loss', 'losstransform', '--lt-epoch', 'v1']
CONFIGS = [
    ('ce', dict(rho=0, m=1, detach=False, reverse=False), ['--loss', 'ce']),
    ('lt_default', dict(rho=1.0, m=3, detach=False, reverse=False), LT + ['--aug-repeats', '3', '--lt-rho', '1.0']),
    ('rho_0.3', dict(rho=0.3, m=3, detach=False, reverse=False), LT + ['--aug-repeats', '3', '--lt-rho', '0.3']),
    ('rho_3', dict(rho=3.0, m=3, detach=False, reverse=False), LT + ['--aug-repeats', '3', '--lt-rho', '3.0']),
    ('detach', dict(rho=1.0, m=3, detach=True, reverse=False), LT + ['--aug-repeats', '3', '--lt-rho', '1.0', '--lt-detach']),
    ('m_2', dict(rho=1.0, m=2, detach=False, reverse=False), LT + ['--aug-repeats', '2', '--lt-rho', '1.0']),
    ('m_4', dict(rho=1.0, m=4, detach=False, reverse=False), LT + ['--aug-repeats', '4', '--lt-rho', '1.0']),
    ('reverse_kl', dict(rho=1.0, m=3, detach=False, reverse=True), LT + ['--aug-repeats', '3', '--lt-rho', '1.0', '--lt-reverse-kl']),
]


def plot(path, rows, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [r['config'] for r in rows]
    err = [r['top1_err'] for r in rows]
    cols = ['tab:gray' if n == 'ce' else ('tab:blue' if n == 'lt_default' else 'tab:cyan') for n in names]
    ax = axes[0]
    ax.bar(names, err, color=cols)
    ax.set_ylim(max(0, min(err) - 5), max(err) + 2)
    for i, e in enumerate(err):
        ax.text(i, e, f'{e:.1f}', ha='center', va='bottom', fontsize=8)
    ax.set_ylabel('top-1 error on carved val (%)')
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis='x', rotation=30)
    ax = axes[1]
    ax.bar(names, [r['consistency_kl'] for r in rows], color=cols)
    ax.set_ylabel('consistency KL on carved val (4 views)')
    ax.tick_params(axis='x', rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default='/tmp/datasets/imagenette64_sweep')
    p.add_argument('--model', default='test_resnet')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=96, help='multiple of 2, 3 and 4')
    p.add_argument('--lr', type=float, default=0.2)
    p.add_argument('--configs', nargs='+', default=[c[0] for c in CONFIGS])
    p.add_argument('--device', default='cpu')
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--output', default=os.path.join(REPO, 'output', 'bench_sweep'))
    p.add_argument('--out-prefix', default=os.path.join(RESULTS, 'sweep'))
    args = p.parse_args(argv)
    aug = list(IMAGENETTE_AUG)
    recipe = aug + ['-b', str(args.batch_size), '--opt', 'sgd', '--lr', str(args.lr), '--momentum', '0.9',
                    '--weight-decay', '5e-5', '--sched', 'cosine', '--sched-on-updates', '--warmup-epochs', '1', '--smoothing', '0.1',
                    '--device', args.device, '--workers', str(args.workers), '--log-interval', '1000',
                    '--checkpoint-hist', '1', '--no-plot', '--img-size', str(args.img_size), '--model', args.model,
                    '--epochs', str(args.epochs), '--seed', str(args.seed), '--data-dir', args.data_dir,
                    '--val-split', 'val', '--output', args.output]
    out = dict(benchmark='sweep', command='python ' + shell_join(sys.argv), args=vars(args), environment=environment(),
               started=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), runs=[], curves={})
    rows = []
    for name, params, flags in CONFIGS:
        if name not in args.configs:
            continue
        run_dir = os.path.join(args.output, name)
        cmd = [sys.executable, 'train.py'] + recipe + flags + ['--experiment', name]
        vjson = os.path.join(run_dir, 'validate.json')
        vcmd = [sys.executable, 'validate.py', '--data-dir', args.data_dir, '--split', 'val', '--model', args.model,
                '--checkpoint', os.path.join(run_dir, 'last.pth.tar'), '--img-size', str(args.img_size),
                '--device', args.device, '--workers', str(args.workers), '--consistency', '4',
                '--consistency-images', '1000', '--results-file', vjson, '--seed', '0'] + aug
        summ = read_summary(run_dir)
        wall = None
        if not (len(summ) == args.epochs and os.path.exists(vjson)):
            if os.path.isdir(run_dir):
                import shutil
                shutil.rmtree(run_dir)
            log(f'{name}: python {shell_join(cmd[1:])}')
            r = run_cmd(cmd, run_dir + '.log', threads=args.threads)
            summ = read_summary(run_dir)
            if r['rc'] != 0 or len(summ) != args.epochs:
                log(f'{name}: FAILED rc={r["rc"]}, see {run_dir}.log')
                continue
            v = run_cmd(vcmd, run_dir + '.validate.log', threads=args.threads)
            if v['rc'] != 0:
                log(f'{name}: validate FAILED, see {run_dir}.validate.log')
                continue
            wall = r['wall_s']
        with open(vjson) as f:
            val = json.load(f)
        last = summ[-1]
        row = dict(config=name, **params, epochs=args.epochs, top1_err=round(100 - last['eval_top1'], 3),
                   best_top1_err=round(100 - max(s['eval_top1'] for s in summ), 3),
                   consistency_kl=val.get('consistency_kl'), view_agreement=val.get('view_agreement'),
                   train_consistency=last.get('train_loss_consistency'), train_s=round(sum(s['train_epoch_s'] for s in summ), 1),
                   wall_s=round(wall, 1) if wall else None, command='python ' + shell_join(cmd[1:]),
                   validate_command='python ' + shell_join(vcmd[1:]))
        rows.append(row)
        out['curves'][name] = [s['eval_top1'] for s in summ]
        log(f'{name}: carved-val top-1 err {row["top1_err"]:.2f} %, consistency KL {row["consistency_kl"]:.4f}')
        out['runs'] = rows
        write_csv(args.out_prefix + '.csv', rows)
        write_json(args.out_prefix + '.json', out)
        plot(args.out_prefix + '.png', rows, f'{args.model} {args.img_size}px, {args.epochs} epochs, seed {args.seed}, '
             f'carved val ({os.path.basename(args.data_dir)})')
    if rows:
        lt = [r for r in rows if r['config'] != 'ce']
        best = min(lt, key=lambda r: r['top1_err']) if lt else None
        out['best_lt_config'] = best['config'] if best else None
        out['finished'] = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
        write_json(args.out_prefix + '.json', out)
        for r in rows:
            log(f'  {r["config"]:11s} err {r["top1_err"]:6.2f} %  KL {r["consistency_kl"]:.4f}')
        log(f'best LT config by carved-val error: {out["best_lt_config"]}')


if __name__ == '__main__':
    main()
