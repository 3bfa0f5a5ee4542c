"""Fine-tuning protocol (the paper's Table 5 twin): continue a CE-trained checkpoint with CE vs LossTransform.

1. Pretrain with CE for ``--pretrain-epochs`` (cosine), or reuse ``--init-checkpoint``.
2. From that same checkpoint, train ``--epochs`` more at a small constant learning rate
   (``--sched constant --warmup-epochs 0 --lr --ft-lr``) with each method: ce, ra (repeats, rho = 0), lt_v1,
   lt_full (m x compute); each run is then validated with ``validate.py --consistency 4``.

    python benchmarks/finetune.py --init-checkpoint output/bench_accuracy/imagenette64/ce_test_resnet_s0/last.pth.tar \
        --img-size 32 --epochs 3 --seeds 0 1

Results: benchmarks/results/finetune.csv / .json / .png. Finished runs are reused on a rerun.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import IMAGENETTE_AUG, REPO, RESULTS, environment, log, read_summary, run_cmd, shell_join, write_csv, write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default='/tmp/datasets/imagenette64')
    p.add_argument('--model', default='test_resnet')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--init-checkpoint', default='', help='CE checkpoint to start from (default: pretrain one)')
    p.add_argument('--pretrain-epochs', type=int, default=8)
    p.add_argument('--pretrain-lr', type=float, default=0.2)
    p.add_argument('--epochs', type=int, default=3, help='fine-tuning epochs')
    p.add_argument('--ft-lr', type=float, default=0.01, help='constant fine-tuning learning rate')
    p.add_argument('--m', type=int, default=3)
    p.add_argument('--methods', nargs='+', default=['ce', 'lt_v1', 'ra', 'lt_full'])
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--batch-size', type=int, default=96)
    p.add_argument('--device', default='cpu')
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--output', default=os.path.join(REPO, 'output', 'bench_finetune'))
    p.add_argument('--out-prefix', default=os.path.join(RESULTS, 'finetune'))
    args = p.parse_args(argv)
    aug = list(IMAGENETTE_AUG)
    base = ['--data-dir', args.data_dir, '--val-split', 'val', '--model', args.model, '--img-size', str(args.img_size),
            '-b', str(args.batch_size), '--opt', 'sgd', '--momentum', '0.9', '--weight-decay', '5e-5',
            '--smoothing', '0.1', '--device', args.device, '--workers', str(args.workers), '--log-interval', '1000',
            '--checkpoint-hist', '1', '--no-plot', '--output', args.output] + aug
    out = dict(benchmark='finetune', command='python ' + shell_join(sys.argv), args=vars(args), environment=environment(),
               started=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), runs=[], curves={})
    init = args.init_checkpoint
    if not init:
        pre_dir = os.path.join(args.output, 'pretrain_ce')
        init = os.path.join(pre_dir, 'last.pth.tar')
        if len(read_summary(pre_dir)) != args.pretrain_epochs:
            shutil.rmtree(pre_dir, ignore_errors=True)
            cmd = [sys.executable, 'train.py'] + base + ['--loss', 'ce', '--epochs', str(args.pretrain_epochs),
                                                         '--lr', str(args.pretrain_lr), '--sched', 'cosine',
                                                         '--warmup-epochs', '1', '--seed', '0', '--experiment', 'pretrain_ce']
            log(f'pretrain: python {shell_join(cmd[1:])}')
            r = run_cmd(cmd, pre_dir + '.log', threads=args.threads)
            if r['rc'] != 0:
                sys.exit(f'pretraining failed, see {pre_dir}.log')
        out['pretrain_command'] = 'python ' + shell_join(cmd[1:]) if 'cmd' in locals() else 'reused'
    out['init_checkpoint'] = os.path.relpath(init, REPO)
    flags = {'ce': ['--loss', 'ce'],
             'ra': ['--loss', 'ce', '--aug-repeats', str(args.m)],
             'lt_v1': ['--loss', 'losstransform', '--aug-repeats', str(args.m), '--lt-epoch', 'v1'],
             'lt_full': ['--loss', 'losstransform', '--aug-repeats', str(args.m), '--lt-epoch', 'full']}
    rows = []
    # starting point
    start_json = os.path.join(args.output, 'start_validate.json')
    vcommon = ['--data-dir', args.data_dir, '--split', 'val', '--model', args.model, '--img-size', str(args.img_size),
               '--device', args.device, '--workers', str(args.workers), '--consistency', '4',
               '--consistency-images', '1000', '--seed', '0'] + aug
    if not os.path.exists(start_json):
        run_cmd([sys.executable, 'validate.py', '--checkpoint', init, '--results-file', start_json] + vcommon,
                os.path.join(args.output, 'start_validate.log'), threads=args.threads)
    with open(start_json) as f:
        sv = json.load(f)
    out['start'] = dict(top1_err=round(100 - sv['top1'], 3), consistency_kl=sv.get('consistency_kl'))
    log(f'start checkpoint: top-1 err {out["start"]["top1_err"]:.2f} %, KL {out["start"]["consistency_kl"]:.4f}')
    for seed in args.seeds:
        for method in args.methods:
            exp = f'ft_{method}_s{seed}'
            run_dir = os.path.join(args.output, exp)
            cmd = [sys.executable, 'train.py'] + base + flags[method] + [
                '--initial-checkpoint', init, '--epochs', str(args.epochs), '--lr', str(args.ft_lr),
                '--sched', 'constant', '--warmup-epochs', '0', '--seed', str(seed), '--experiment', exp]
            vjson = os.path.join(run_dir, 'validate.json')
            vcmd = [sys.executable, 'validate.py', '--checkpoint', os.path.join(run_dir, 'last.pth.tar'),
                    '--results-file', vjson] + vcommon
            summ = read_summary(run_dir)
            if not (len(summ) == args.epochs and os.path.exists(vjson)):
                shutil.rmtree(run_dir, ignore_errors=True)
                log(f'{exp}: python {shell_join(cmd[1:])}')
                r = run_cmd(cmd, run_dir + '.log', threads=args.threads)
                summ = read_summary(run_dir)
                if r['rc'] != 0 or len(summ) != args.epochs:
                    log(f'{exp}: FAILED, see {run_dir}.log')
                    continue
                if run_cmd(vcmd, run_dir + '.validate.log', threads=args.threads)['rc'] != 0:
                    log(f'{exp}: validate FAILED')
                    continue
            with open(vjson) as f:
                val = json.load(f)
            row = dict(method=method, seed=seed, epochs=args.epochs, ft_lr=args.ft_lr,
                       compute_units=args.epochs * (args.m if method == 'lt_full' else 1),
                       top1_err=round(100 - summ[-1]['eval_top1'], 3), consistency_kl=val.get('consistency_kl'),
                       view_agreement=val.get('view_agreement'),
                       train_s=round(sum(s['train_epoch_s'] for s in summ), 1), command='python ' + shell_join(cmd[1:]),
                       validate_command='python ' + shell_join(vcmd[1:]))
            rows.append(row)
            out['curves'][exp] = [s['eval_top1'] for s in summ]
            log(f'{exp}: top-1 err {row["top1_err"]:.2f} %, KL {row["consistency_kl"]:.4f}')
            out['runs'] = rows
            summary = {}
            for mth in args.methods:
                rs = [r for r in rows if r['method'] == mth]
                if rs:
                    e = [r['top1_err'] for r in rs]
                    k = [r['consistency_kl'] for r in rs]
                    summary[mth] = dict(n=len(rs), top1_err_mean=statistics.mean(e),
                                        top1_err_std=statistics.stdev(e) if len(e) > 1 else 0.0,
                                        consistency_kl_mean=statistics.mean(k), compute_units=rs[0]['compute_units'])
            out['summary'] = summary
            write_csv(args.out_prefix + '.csv', rows)
            write_json(args.out_prefix + '.json', out)
            plot(args.out_prefix + '.png', out, args)
    out['finished'] = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
    write_json(args.out_prefix + '.json', out)
    for mth, d in out.get('summary', {}).items():
        log(f'  {mth:8s} err {d["top1_err_mean"]:.2f} ± {d["top1_err_std"]:.2f}  KL {d["consistency_kl_mean"]:.4f}')


def plot(path, out, args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    s = out['summary']
    names = list(s)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.bar(['start'] + names, [out['start']['top1_err']] + [s[n]['top1_err_mean'] for n in names],
           yerr=[0] + [s[n]['top1_err_std'] for n in names], capsize=4,
           color=['lightgray'] + ['tab:blue' if n.startswith('lt') else 'tab:gray' for n in names])
    lo = min([out['start']['top1_err']] + [s[n]['top1_err_mean'] for n in names])
    ax.set_ylim(max(0, lo - 5), None)
    ax.set_ylabel('val top-1 error (%)')
    ax.set_title(f'fine-tune {args.epochs} ep at lr {args.ft_lr} from a CE checkpoint', fontsize=9)
    ax = axes[1]
    ax.bar(['start'] + names, [out['start']['consistency_kl']] + [s[n]['consistency_kl_mean'] for n in names],
           color=['lightgray'] + ['tab:blue' if n.startswith('lt') else 'tab:gray' for n in names])
    ax.set_ylabel('val consistency KL (4 views)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    main()
