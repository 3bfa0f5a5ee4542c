"""Print the Markdown tables of docs/benchmarks.md from benchmarks/results/*.json (no training).

    python benchmarks/make_tables.py > /tmp/tables.md
    python benchmarks/make_tables.py --section accuracy_imagenette64
"""
import argparse
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS  # noqa: E402


def f(x, nd=2):
    return '—' if x is None else f'{x:.{nd}f}'


def cost_tables(d):
    print('#### (a) Training step time, LossTransform vs base loss (CPU, 1 thread)\n')
    print('| model | batch | img | base step (ms, median) | LT step (ms, median) | ratio of medians | paired ratio (median) '
          '| A/A control | loss-only overhead (ms) | loss-only overhead / step |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in d['step']:
        print(f"| {r['model']} | {r['batch_size']} | {r['img_size']} | {r['base_step_ms']:.1f} | {r['lt_step_ms']:.1f} | "
              f"{r['step_ratio']:.3f} | {r.get('paired_ratio_median', float('nan')):.3f} | "
              f"{r.get('aa_control_ratio', float('nan')):.3f} | {r['loss_overhead_ms']:.3f} | "
              f"{100 * r['loss_overhead_frac_of_step']:.2f} % |")
    s = d['summary']
    if s.get('epoch_s'):
        print('\n#### (b, c) Epoch wall time and peak memory (train.py subprocesses)\n')
        print('| variant | epoch s (median over trials of the per-run min) | ratio vs plain | max RSS (MiB) | RSS ratio |')
        print('|---|---|---|---|---|')
        for v, t in s['epoch_s'].items():
            print(f"| {v} | {t:.2f} | {s['epoch_ratio'][v]:.2f} | {s['max_rss_mib'][v]:.0f} | {s['max_rss_ratio'][v]:.3f} |")
        print('\nPer-run epoch times (s):\n')
        print('| variant | trial | epochs (s) |')
        print('|---|---|---|')
        for r in d['epoch']:
            print(f"| {r['variant']} | {r['trial']} | min {r['epoch_s_min']:.2f} / median {r['epoch_s_median']:.2f} |")
    if s.get('loader_img_s'):
        print('\n#### (d) Loader throughput\n')
        print('| loader | img/s (median of trials) |')
        print('|---|---|')
        for k, v in s['loader_img_s'].items():
            print(f'| {k} | {v:.0f} |')
        print(f"\nratio lt_timm / timm = **{s['loader_ratio']:.3f}**")


def accuracy_tables(d):
    for model, ms in d['summary'].items():
        print(f"\n#### {d['args']['dataset_name']}, {model}, {d['args']['img_size']} px, {d['args']['epochs']} epochs (1x)\n")
        print('| method | seeds | epochs | compute (CE-epochs) | top-1 error % (mean ± std) | rel. change vs CE | '
              'val consistency KL (mean ± std) | CE KL / KL | epochs to reach CE final top-1 | train s |')
        print('|---|---|---|---|---|---|---|---|---|---|')
        for name, s in ms.items():
            rel = s.get('rel_err_change_vs_ce')
            reach = s.get('epochs_to_reach_ce_final_top1')
            reach_txt = 'not reached' if reach is None else f"{reach} / {s['epochs']}"
            print(f"| {name} | {s['n_seeds']} | {s['epochs']} | {s['compute_units']:.0f} | "
                  f"{s['top1_err_mean']:.2f} ± {s['top1_err_std']:.2f} | "
                  f"{'—' if rel is None else f'{100 * rel:+.1f} %'} | "
                  f"{f(s['consistency_kl_mean'], 4)} ± {f(s['consistency_kl_std'], 4)} | "
                  f"{f(s.get('kl_ratio_ce_over_method'), 2)} | "
                  f"{reach_txt} | {s['train_s_mean']:.0f} |")
    print('\nPer run:\n')
    print('| method | seed | top-1 err % | best-epoch err % | consistency KL | view agreement | TTA top-1 (4 views) | train s |')
    print('|---|---|---|---|---|---|---|---|')
    for r in d['runs']:
        print(f"| {r['method']} | {r['seed']} | {r['top1_err']:.2f} | {r['best_top1_err']:.2f} | {f(r['consistency_kl'], 4)} | "
              f"{f(r['view_agreement'], 3)} | {f(r['tta_top1'], 2)} | {r['train_s']:.0f} |")


def epoch_time_from_accuracy(d):
    """Median per-epoch train time of each method in the accuracy runs (a second, in-situ epoch-cost measurement)."""
    per = {}
    for key, c in d['curves'].items():
        method = key.split('_test_')[0] if '_test_' in key else key.rsplit('_', 2)[0]
        per.setdefault(method, []).extend(c['train_epoch_s'][1:])  # skip epoch 0 (worker start-up)
    if 'ce' not in per:
        return
    ce = statistics.median(per['ce'])
    print('\nEpoch wall time inside the accuracy runs (median over epochs 2.. of all seeds):\n')
    print('| method | median train epoch s | ratio vs ce |')
    print('|---|---|---|')
    for m, v in per.items():
        print(f'| {m} | {statistics.median(v):.2f} | {statistics.median(v) / ce:.3f} |')


def sweep_table(d):
    print('\n| config | rho | m | detach | reverse KL | carved-val top-1 err % | best-epoch err % | consistency KL | train s |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in d['runs']:
        print(f"| {r['config']} | {r['rho']} | {r['m']} | {r['detach']} | {r['reverse']} | {r['top1_err']:.2f} | "
              f"{r['best_top1_err']:.2f} | {f(r['consistency_kl'], 4)} | {r['train_s']:.0f} |")


def sweep_mean_table(results_dir):
    """Mean over the sweep seeds present (sweep.json = seed 0, sweep_seed<k>.json = seed k)."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(results_dir, 'sweep*.json'))):
        d = json.load(open(path))
        for r in d['runs']:
            runs.setdefault(r['config'], []).append(r)
    print('| config | seeds | carved-val top-1 err % (mean) | per seed | consistency KL (mean) |')
    print('|---|---|---|---|---|')
    for name, rs in runs.items():
        e = [r['top1_err'] for r in rs]
        k = [r['consistency_kl'] for r in rs]
        print(f"| {name} | {len(rs)} | {statistics.mean(e):.2f} | {' / '.join(f'{x:.2f}' for x in e)} | "
              f"{statistics.mean(k):.4f} |")


def finetune_table(d):
    print(f"\nstart checkpoint: top-1 err {d['start']['top1_err']:.2f} %, consistency KL {f(d['start']['consistency_kl'], 4)}\n")
    print('| method | runs | compute (CE-epochs) | top-1 err % (mean ± std) | consistency KL |')
    print('|---|---|---|---|---|')
    for m, s in d.get('summary', {}).items():
        print(f"| {m} | {s['n']} | {s['compute_units']} | {s['top1_err_mean']:.2f} ± {s['top1_err_std']:.2f} | "
              f"{f(s['consistency_kl_mean'], 4)} |")


def bn_table(d):
    print('| run | top-1 err % as trained | after BN recalibration | change |')
    print('|---|---|---|---|')
    for r in d['runs']:
        print(f"| {r['run'].split('/')[-1]} | {r['top1_err_trained']:.2f} | {r['top1_err_bn_recalibrated']:.2f} | "
              f"{r['err_change']:+.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--results-dir', default=RESULTS)
    p.add_argument('--section', default='', help='print one section: cost | accuracy_<dataset> | sweep[_seed1] | sweep_mean | finetune | bn_recalib')
    a = p.parse_args()
    if a.section == 'sweep_mean':
        sweep_mean_table(a.results_dir)
        return
    if a.section:
        d = json.load(open(os.path.join(a.results_dir, a.section + '.json')))
        if a.section == 'cost':
            cost_tables(d)
        elif a.section.startswith('accuracy_'):
            accuracy_tables(d)
            epoch_time_from_accuracy(d)
        elif a.section.startswith('sweep'):
            sweep_table(d)
        elif a.section == 'finetune':
            finetune_table(d)
        elif a.section == 'bn_recalib':
            bn_table(d)
        return
    path = os.path.join(a.results_dir, 'cost.json')
    if os.path.exists(path):
        print('### cost\n')
        cost_tables(json.load(open(path)))
    for path in sorted(glob.glob(os.path.join(a.results_dir, 'accuracy_*.json'))):
        d = json.load(open(path))
        print(f'\n### {os.path.basename(path)}')
        accuracy_tables(d)
        epoch_time_from_accuracy(d)
    path = os.path.join(a.results_dir, 'sweep.json')
    if os.path.exists(path):
        print('\n### sweep')
        sweep_table(json.load(open(path)))
    path = os.path.join(a.results_dir, 'finetune.json')
    if os.path.exists(path):
        print('\n### finetune')
        finetune_table(json.load(open(path)))
    path = os.path.join(a.results_dir, 'bn_recalib.json')
    if os.path.exists(path):
        print('\n### bn_recalib\n')
        bn_table(json.load(open(path)))


if __name__ == '__main__':
    main()
