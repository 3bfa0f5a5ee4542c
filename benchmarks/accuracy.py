"""From-scratch accuracy protocol (the paper's Tables 1-2 twin), every method with the same recipe.

Methods (same model, epochs, optimizer, LR schedule, augmentation, label smoothing, batch size):
  ce       plain cross-entropy                                        1x compute
  ra       CE + repeated augmentation (--aug-repeats m, v1 epoch)      1x  (consistency measured, rho = 0)
  jsd      AugMix-style JSD + CE (--loss jsd --aug-splits 3)          ~3x (each batch row becomes 3 splits)
  lt_v1    LossTransform-v1 (--aug-repeats m --lt-epoch v1)            1x  (m x fewer distinct images/epoch)
  lt_full  LossTransform, every image m times per epoch (--lt-epoch full)  m x compute
  ce_3x    CE with 3x the epochs (equal compute to lt_full / jsd)     3x
  ra_full  (ablation, opt-in) CE + repeats, full epoch = lt_full with rho = 0     m x

Each run is ``train.py`` in a subprocess (results are read from its summary.csv), then ``validate.py
--consistency 4`` on its last checkpoint for the consistency KL on the val split. Finished runs are
skipped when the script is rerun (delete output/bench_accuracy/<dataset>/<run> to redo one).

    python benchmarks/accuracy.py --quick                 # MNIST-5k, 1 seed, 3 epochs, < 10 min on 1 core
    python benchmarks/accuracy.py --data-dir /tmp/datasets/imagenette64 --dataset-name imagenette64 \
        --img-size 32 --epochs 8 --seeds 0 1

Results: benchmarks/results/accuracy_<dataset>.csv (one row per run), .json (summary, curves, commands,
environment), .png (error bars + accuracy-vs-epoch curves).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (IMAGENETTE_AUG, REPO, RESULTS, environment, log, read_summary, run_cmd, shell_join,  # noqa: E402
                               write_csv, write_json)

# name -> (extra train.py flags, epoch multiplier, compute per epoch relative to CE, note)
def method_table(m):
    return {
        'ce': (['--loss', 'ce'], 1, 1.0, 'cross-entropy'),
        'ra': (['--loss', 'ce', '--aug-repeats', str(m), '--lt-epoch', 'v1'], 1, 1.0, f'CE + repeated aug m={m} (rho=0)'),
        'jsd': (['--loss', 'jsd', '--aug-splits', '3'], 1, 3.0, 'JSD + CE, 3 AugMix-style splits (3x rows per step)'),
        'lt_v1': (['--loss', 'losstransform', '--aug-repeats', str(m), '--lt-epoch', 'v1'], 1, 1.0, f'LossTransform-v1 m={m}'),
        'lt_full': (['--loss', 'losstransform', '--aug-repeats', str(m), '--lt-epoch', 'full'], 1, float(m),
                    f'LossTransform full epoch m={m} ({m}x compute)'),
        'ce_3x': (['--loss', 'ce'], 3, 1.0, 'CE, 3x epochs (equal compute to lt_full)'),
        'ra_full': (['--loss', 'ce', '--aug-repeats', str(m), '--lt-epoch', 'full'], 1, float(m),
                    f'ablation: CE + repeats m={m}, full epoch (= lt_full with rho=0; {m}x compute)'),
    }


CSV_FIELDS = ['dataset', 'method', 'model', 'seed', 'epochs', 'compute_units', 'top1_err', 'best_top1_err', 'top1',
              'consistency_kl', 'view_agreement', 'tta_top1', 'train_s', 'wall_s', 'max_rss_mib', 'final_train_loss',
              'final_consistency', 'output_dir', 'command', 'validate_command']


def run_one(args, method, model, seed, table, over_budget=False):
    extra, mult, per_epoch, _ = table[method]
    epochs = args.epochs * mult
    exp = f'{method}_{model}_s{seed}'
    out_root = os.path.join(args.output, args.dataset_name)
    run_dir = os.path.join(out_root, exp)
    cmd = [sys.executable, 'train.py', '--data-dir', args.data_dir, '--val-split', 'val', '--model', model,
           '--img-size', str(args.img_size), '--epochs', str(epochs), '--seed', str(seed),
           '--output', out_root, '--experiment', exp] + args.recipe + extra
    val_json = os.path.join(run_dir, 'validate.json')
    vcmd = [sys.executable, 'validate.py', '--data-dir', args.data_dir, '--split', 'val', '--model', model,
            '--checkpoint', os.path.join(run_dir, 'last.pth.tar'), '--img-size', str(args.img_size),
            '--device', args.device, '--workers', str(args.workers), '--consistency', str(args.consistency_views),
            '--consistency-images', str(args.consistency_images), '--tta', str(args.consistency_views),
            '--results-file', val_json, '--seed', '0'] + args.view_aug
    summ = read_summary(run_dir)
    info_path = os.path.join(run_dir, 'bench_run.json')
    if len(summ) == epochs and os.path.exists(val_json) and os.path.exists(info_path):
        log(f'{exp}: done before, reusing')
        with open(info_path) as f:
            info = json.load(f)
    elif over_budget:
        log(f'{exp}: time budget reached, not started')
        return None
    else:
        if os.path.isdir(run_dir):  # partial run: start over cleanly
            import shutil
            shutil.rmtree(run_dir)
        log(f'{exp}: training {epochs} epochs: python {shell_join(cmd[1:])}')
        r = run_cmd(cmd, run_dir + '.log', threads=args.threads)
        summ = read_summary(run_dir)
        if r['rc'] != 0 or len(summ) != epochs:
            log(f'{exp}: FAILED rc={r["rc"]}, see {run_dir}.log')
            return None
        log(f'{exp}: validating with {args.consistency_views} views')
        v = run_cmd(vcmd, run_dir + '.validate.log', threads=args.threads)
        if v['rc'] != 0:
            log(f'{exp}: validate FAILED rc={v["rc"]}, see {run_dir}.validate.log')
            return None
        info = dict(wall_s=r['wall_s'] + v['wall_s'], max_rss_mib=r['max_rss_mib'])
        with open(info_path, 'w') as f:
            json.dump(info, f)
    with open(val_json) as f:
        val = json.load(f)
    last = summ[-1]
    row = dict(dataset=args.dataset_name, method=method, model=model, seed=seed, epochs=epochs,
               compute_units=epochs * per_epoch, top1_err=round(100 - last['eval_top1'], 3),
               best_top1_err=round(100 - max(s['eval_top1'] for s in summ), 3), top1=round(last['eval_top1'], 3),
               consistency_kl=val.get('consistency_kl'), view_agreement=val.get('view_agreement'),
               tta_top1=val.get('tta_top1'), train_s=round(sum(s['train_epoch_s'] for s in summ), 1),
               wall_s=round(info['wall_s'], 1), max_rss_mib=round(info['max_rss_mib'], 1),
               final_train_loss=last['train_loss'], final_consistency=last.get('train_loss_consistency'),
               output_dir=os.path.relpath(run_dir, REPO), command='python ' + shell_join(cmd[1:]),
               validate_command='python ' + shell_join(vcmd[1:]))
    curve = dict(epoch=[int(s['epoch']) + 1 for s in summ], eval_top1=[s['eval_top1'] for s in summ],
                 train_epoch_s=[s['train_epoch_s'] for s in summ],
                 train_consistency=[s.get('train_loss_consistency') for s in summ])
    log(f'{exp}: top-1 err {row["top1_err"]:.2f} %, consistency KL {row["consistency_kl"]:.4f}, '
        f'train {row["train_s"]:.0f}s')
    return row, curve


def _ms(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(rows, curves, args, table):
    out = {}
    for model in args.models:
        ms = {}
        ce_rows = [r for r in rows if r['model'] == model and r['method'] == 'ce']
        ce_err = _ms([r['top1_err'] for r in ce_rows])[0]
        ce_kl = _ms([r['consistency_kl'] for r in ce_rows])[0]
        ce_final = _ms([r['top1'] for r in ce_rows])[0]
        for method in args.methods:
            rs = [r for r in rows if r['model'] == model and r['method'] == method]
            if not rs:
                continue
            err_m, err_s = _ms([r['top1_err'] for r in rs])
            kl_m, kl_s = _ms([r['consistency_kl'] for r in rs])
            cs = [curves[f'{method}_{model}_s{r["seed"]}'] for r in rs]
            n_ep = min(len(c['eval_top1']) for c in cs)
            mean_curve = [statistics.mean(c['eval_top1'][i] for c in cs) for i in range(n_ep)]
            reach = None
            if ce_final is not None:
                hit = [i + 1 for i, a in enumerate(mean_curve) if a >= ce_final - 1e-3]  # finals are stored rounded to 1e-3
                reach = hit[0] if hit else None
            d = dict(n_seeds=len(rs), seeds=[r['seed'] for r in rs], epochs=rs[0]['epochs'],
                     compute_units=rs[0]['compute_units'], top1_err_mean=err_m, top1_err_std=err_s,
                     consistency_kl_mean=kl_m, consistency_kl_std=kl_s,
                     train_s_mean=_ms([r['train_s'] for r in rs])[0],
                     mean_curve_top1=mean_curve, description=table[method][3])
            if ce_err:
                d['rel_err_change_vs_ce'] = (err_m - ce_err) / ce_err
            if ce_kl and kl_m is not None:
                d['kl_ratio_ce_over_method'] = ce_kl / kl_m if kl_m > 0 else None
            d['epochs_to_reach_ce_final_top1'] = reach
            d['frac_of_epochs_to_reach_ce_final'] = (reach / rs[0]['epochs']) if reach else None
            ms[method] = d
        out[model] = ms
    return out


def plot(path, summary, args, table):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    models = [m for m in args.models if summary.get(m)]
    if not models:
        return
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    colors = dict(ce='tab:gray', ra='tab:green', jsd='tab:purple', lt_v1='tab:blue', lt_full='tab:orange', ce_3x='k',
                  ra_full='tab:olive')
    for row, model in zip(axes, models):
        s = summary[model]
        names = [m for m in args.methods if m in s]
        ax = row[0]
        ax.bar(names, [s[n]['top1_err_mean'] for n in names], yerr=[s[n]['top1_err_std'] for n in names], capsize=4,
               color=[colors.get(n, 'tab:blue') for n in names])
        for i, n in enumerate(names):
            ax.text(i, s[n]['top1_err_mean'], f'{s[n]["top1_err_mean"]:.1f}\n({s[n]["compute_units"]:.0f}u)',
                    ha='center', va='bottom', fontsize=8)
        lo = min(s[n]['top1_err_mean'] - s[n]['top1_err_std'] for n in names)
        ax.set_ylim(max(0, lo - 5), None)
        ax.set_ylabel('top-1 error (%) , mean ± std over seeds')
        ax.set_title(f'{args.dataset_name} {model}: final top-1 error (u = compute in CE-epochs)', fontsize=9)
        ax = row[1]
        for n in names:
            c = s[n]['mean_curve_top1']
            per = table[n][2]
            ax.plot([(i + 1) * per for i in range(len(c))], c, marker='.', label=n, color=colors.get(n))
        ax.set_xlabel('compute (CE-epoch equivalents)')
        ax.set_ylabel('val top-1 (%)')
        ax.set_title('accuracy vs compute (mean over seeds)', fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = row[2]
        kl = [s[n]['consistency_kl_mean'] or 0 for n in names]
        ax.bar(names, kl, yerr=[s[n]['consistency_kl_std'] or 0 for n in names], capsize=4,
               color=[colors.get(n, 'tab:blue') for n in names])
        ax.set_ylabel(f'val consistency KL ({args.consistency_views} views)')
        ax.set_title('consistency KL(pbar || p_view) on val (lower = more consistent)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='MNIST-5k, 1 seed, 3 epochs (< 10 min on one core)')
    p.add_argument('--data-dir', default='/tmp/datasets/imagenette64')
    p.add_argument('--dataset-name', default='imagenette64')
    p.add_argument('--models', nargs='+', default=['test_resnet'])
    p.add_argument('--methods', nargs='+', default=['ce', 'lt_v1', 'ra', 'jsd', 'lt_full', 'ce_3x'],
                   help='subset/order of: ce ra jsd lt_v1 lt_full ce_3x ra_full')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--epochs', type=int, default=8, help='epochs of the 1x methods (ce_3x gets 3x)')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--m', type=int, default=3, help='replicas per image for ra / lt_*')
    p.add_argument('--batch-size', type=int, default=96)
    p.add_argument('--lr', type=float, default=0.2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--consistency-views', type=int, default=4)
    p.add_argument('--consistency-images', type=int, default=1000)
    p.add_argument('--output', default=os.path.join(REPO, 'output', 'bench_accuracy'))
    p.add_argument('--results-dir', default=RESULTS)
    p.add_argument('--time-budget-s', type=float, default=0, help='stop starting new runs after this many seconds (0: none)')
    args = p.parse_args(argv)
    if args.quick:
        args.data_dir, args.dataset_name = '/tmp/datasets/mnist5k', 'mnist5k_quick'
        args.seeds, args.epochs, args.img_size = [0], 3, 28
        if not os.path.exists(os.path.join(args.data_dir, '.complete')):
            from lt_timm.datasets import export_mnist5k
            export_mnist5k(args.data_dir)
        aug = ['--scale', '0.6', '1.0', '--hflip', '0', '--color-jitter', '0']
        args.recipe = ['--in-chans', '1', '--mean', '0.1307', '--std', '0.3081'] + aug
        args.view_aug = ['--in-chans', '1', '--mean', '0.1307', '--std', '0.3081'] + aug
    else:
        aug = list(IMAGENETTE_AUG)
        args.recipe = aug[:]
        args.view_aug = aug[:]
    args.recipe += ['-b', str(args.batch_size), '--opt', 'sgd', '--lr', str(args.lr), '--momentum', '0.9',
                    '--weight-decay', '5e-5', '--sched', 'cosine', '--sched-on-updates', '--warmup-epochs', '1', '--smoothing', '0.1',
                    '--device', args.device, '--workers', str(args.workers), '--log-interval', '1000',
                    '--checkpoint-hist', '1', '--no-plot']
    table = method_table(args.m)
    bad = [m for m in args.methods if m not in table]
    if bad:
        p.error(f'unknown methods {bad}; choose from {list(table)}')
    t_start = time.time()
    prefix = os.path.join(args.results_dir, f'accuracy_{args.dataset_name}')
    out = dict(benchmark='accuracy', command='python ' + shell_join(sys.argv), args={k: v for k, v in vars(args).items()},
               environment=environment(), started=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
               methods={k: dict(flags=v[0], epoch_multiplier=v[1], compute_per_epoch=v[2], description=v[3])
                        for k, v in table.items() if k in args.methods},
               runs=[], curves={}, summary={})
    rows, curves = [], {}

    def save():
        out['runs'], out['curves'] = rows, curves
        out['summary'] = summarize(rows, curves, args, table)
        write_csv(prefix + '.csv', rows, CSV_FIELDS)
        write_json(prefix + '.json', out)
        try:
            plot(prefix + '.png', out['summary'], args, table)
        except Exception as e:  # a plot problem must not lose results
            log(f'plot failed: {e!r}')

    total = len(args.seeds) * len(args.models) * len(args.methods)
    k = 0
    for seed in args.seeds:
        for model in args.models:
            for method in args.methods:
                k += 1
                over = bool(args.time_budget_s) and time.time() - t_start > args.time_budget_s
                log(f'--- run {k}/{total}: {method} {model} seed {seed} (elapsed {time.time() - t_start:.0f}s)')
                res = run_one(args, method, model, seed, table, over_budget=over)
                if res is None:
                    continue
                rows.append(res[0])
                curves[f'{method}_{model}_s{seed}'] = res[1]
                save()
    out['finished'] = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
    save()
    for model, ms in out['summary'].items():
        log(f'summary {args.dataset_name} {model}:')
        for name, d in ms.items():
            log(f'  {name:8s} err {d["top1_err_mean"]:6.2f} ± {d["top1_err_std"]:.2f} %  KL {d["consistency_kl_mean"]:.4f}  '
                f'compute {d["compute_units"]:.0f}u  n={d["n_seeds"]}')
    log(f'wrote {prefix}.csv/.json/.png')


if __name__ == '__main__':
    main()
