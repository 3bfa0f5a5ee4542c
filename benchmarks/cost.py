"""Cost of LossTransform: step time, loss-only overhead, epoch time, peak memory, loader throughput.

(a) step time (forward + loss + backward + optimizer step) of LossTransform(base) vs base, same model and
    batch, A/B interleaved step by step, median over ``--steps`` after ``--warmup``; plus the loss-only
    time (loss forward + backward on fixed logits) of both;
(b) epoch wall time of ``train.py`` runs: plain CE vs LT-v1 (same samples per epoch) vs LT-full (m x);
(c) peak memory: max RSS of each (b) subprocess (CPU) / ``torch.cuda.max_memory_allocated`` (GPU, step bench);
(d) loader throughput: ``lt_timm.create_loader(num_aug_repeats=m)`` vs ``timm.data.create_loader`` (plain).

(e) ``--gpu-protocol`` (issue 13): step time of LT vs base as a GPU user trains — bf16 AMP, channels_last, 1000
    classes, 224 px, batch 256 (ViT: 128), eager and ``torch.compile``d (model and loss) — timed in chunks of
    ``--chunk`` steps between CUDA events with no synchronisation inside a chunk (one sync at the end of the
    measurement), chunks of LT, base and an A/A copy of base interleaved; plus peak memory of each.

    python benchmarks/cost.py                       # CPU defaults, ~5 min on 1 core
    python benchmarks/cost.py --gpu-protocol --device cuda --skip epoch --workers 16 \
        --loader-data /tmp/lt_decode_bench/train --loader-img-size 224 --loader-batch-size 256 \
        --out-prefix benchmarks/results/cost_gpu_<device>

Results: benchmarks/results/cost.json, cost.csv, cost.png (override with --out-prefix).
"""
import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import REPO, RESULTS, environment, log, read_summary, run_cmd, shell_join, write_csv, write_json  # noqa: E402


def _sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize()


def bench_step(model_name, args, device):
    """Median step time of base vs LT on the same model/batch, interleaved A/B; and loss-only times."""
    import torch
    import timm
    from timm.loss import LabelSmoothingCrossEntropy
    import lt_timm.models  # noqa: F401 (registers cifar_resnet*)
    from lt_timm import LossTransform
    torch.manual_seed(0)
    img = 32 if model_name.startswith('cifar_') else args.img_size
    kw = dict(num_classes=args.num_classes)
    if 'vit' in model_name:
        kw['img_size'] = img
    model = timm.create_model(model_name, **kw).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    base = LabelSmoothingCrossEntropy(0.1)
    lt = LossTransform(base, num_repeats=args.m, rho=1.0)
    x = torch.randn(args.batch_size, 3, img, img, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def step(crit):
        _sync(device)
        t0 = time.perf_counter()
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    base2 = LabelSmoothingCrossEntropy(0.1)  # A/A control: a second, identical base loss measures the noise floor
    for _ in range(args.warmup):
        step(base)
        step(lt)
        step(base2)
    tb, tl, ta = [], [], []
    orders = [(base, lt, base2), (lt, base2, base), (base2, base, lt)]
    sink = {id(base): tb, id(lt): tl, id(base2): ta}
    for i in range(args.steps):  # interleave, rotating which goes first, so drifts hit all equally
        for crit in orders[i % 3]:
            sink[id(crit)].append(step(crit))
    mem = {}
    if device.type == 'cuda':
        for name, crit in (('base', base), ('lt', lt)):
            torch.cuda.reset_peak_memory_stats()
            step(crit)
            mem[f'peak_mem_{name}_mib'] = torch.cuda.max_memory_allocated() / 2 ** 20

    # loss-only: forward + backward of the criterion on fixed logits
    logits = torch.randn(args.batch_size, args.num_classes, device=device, requires_grad=True)

    def loss_only(crit):
        _sync(device)
        t0 = time.perf_counter()
        crit(logits, y).backward()
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        loss_only(base); loss_only(lt)
    lb, ll = [], []
    for _ in range(args.steps * 3):
        lb.append(loss_only(base)); ll.append(loss_only(lt))
    mb, ml = statistics.median(tb), statistics.median(tl)
    row = dict(kind='step', model=model_name, batch_size=args.batch_size, img_size=img, m=args.m,
               base_step_ms=1e3 * mb, lt_step_ms=1e3 * ml, step_ratio=ml / mb,
               base_step_min_ms=1e3 * min(tb), lt_step_min_ms=1e3 * min(tl), step_ratio_min=min(tl) / min(tb),
               paired_ratio_median=statistics.median([a / b for a, b in zip(tl, tb)]),
               aa_control_ratio=statistics.median(ta) / mb,
               base_step_iqr_ms=1e3 * (statistics.quantiles(tb, n=4)[2] - statistics.quantiles(tb, n=4)[0]),
               lt_step_iqr_ms=1e3 * (statistics.quantiles(tl, n=4)[2] - statistics.quantiles(tl, n=4)[0]),
               base_loss_ms=1e3 * statistics.median(lb), lt_loss_ms=1e3 * statistics.median(ll),
               loss_overhead_ms=1e3 * (statistics.median(ll) - statistics.median(lb)),
               loss_overhead_frac_of_step=(statistics.median(ll) - statistics.median(lb)) / mb, **mem)
    return row


def _chunked_setup(model_name, args, device, compiled):
    """Model, optimizer, data and the three criteria (base, LT, A/A base) of the GPU protocol."""
    import torch
    import timm
    from timm.loss import LabelSmoothingCrossEntropy
    import lt_timm.models  # noqa: F401
    from lt_timm import LossTransform
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batch = args.vit_batch_size if 'vit' in model_name and args.vit_batch_size else args.batch_size
    img = 32 if model_name.startswith('cifar_') else args.img_size
    x = torch.randn(batch, 3, img, img, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (batch,), device=device)
    crits = dict(base=LabelSmoothingCrossEntropy(0.1),
                 lt=LossTransform(LabelSmoothingCrossEntropy(0.1), num_repeats=args.m, rho=1.0),
                 aa=LabelSmoothingCrossEntropy(0.1))
    if compiled:
        model = torch.compile(model, backend=args.compile_backend)
        crits = {k: torch.compile(c, backend=args.compile_backend) for k, c in crits.items()}
    return model, opt, x, y, crits, batch, img


def bench_step_chunked(model_name, args, device, compiled):
    """GPU protocol: chunks of steps timed between CUDA events, no sync inside; LT / base / A-A interleaved."""
    import torch
    from contextlib import nullcontext
    model, opt, x, y, crits, batch, img = _chunked_setup(model_name, args, device, compiled)
    amp = (torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype)) if args.amp_dtype != 'float32'
           else nullcontext())
    cuda = device.type == 'cuda'

    def run_steps(crit, n):
        for _ in range(n):
            with amp:
                loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for name in ('base', 'lt', 'aa'):  # warm-up (and compilation)
        run_steps(crits[name], args.warmup)
    _sync(device)
    order = [('base', 'lt', 'aa'), ('lt', 'aa', 'base'), ('aa', 'base', 'lt')]
    marks = {k: [] for k in crits}
    for r in range(args.rounds):
        for name in order[r % 3]:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run_steps(crits[name], args.chunk)
                end.record()
                marks[name].append((start, end))
            else:
                t0 = time.perf_counter()
                run_steps(crits[name], args.chunk)
                marks[name].append((time.perf_counter() - t0, None))
    _sync(device)  # the one synchronisation of the measurement
    ms = {k: [(s.elapsed_time(e) if cuda else 1e3 * s) / args.chunk for s, e in v] for k, v in marks.items()}
    mem = {}
    if cuda:
        for name in ('base', 'lt'):
            torch.cuda.reset_peak_memory_stats()
            run_steps(crits[name], 2)
            _sync(device)
            mem[f'peak_mem_{name}_mib'] = torch.cuda.max_memory_allocated() / 2 ** 20
        mem['peak_mem_ratio'] = mem['peak_mem_lt_mib'] / mem['peak_mem_base_mib']
    mb, ml, ma = (statistics.median(ms[k]) for k in ('base', 'lt', 'aa'))
    return dict(kind='step_chunked', model=model_name, compiled=compiled,
                compile_backend=args.compile_backend if compiled else '', batch_size=batch, img_size=img, m=args.m,
                amp_dtype=args.amp_dtype, channels_last=args.channels_last, num_classes=args.num_classes,
                chunk=args.chunk, rounds=args.rounds, base_step_ms=mb, lt_step_ms=ml, step_ratio=ml / mb,
                aa_control_ratio=ma / mb, base_step_min_ms=min(ms['base']), lt_step_min_ms=min(ms['lt']),
                step_ratio_min=min(ms['lt']) / min(ms['base']), **mem)


def bench_epochs(args):
    """train.py runs (subprocesses) plain vs LT-v1 vs LT-full; epoch time from summary.csv, max RSS from wait4."""
    rows = []
    common = ['--data-dir', args.epoch_data, '--val-split', 'val', '--model', args.epoch_model,
              '--epochs', str(args.epoch_epochs), '--warmup-epochs', '0', '--sched', 'cosine', '--lr', '0.05',
              '-b', str(args.epoch_batch_size), '--device', args.device, '--workers', str(args.workers),
              '--seed', '0', '--no-plot', '--log-interval', '1000', '--checkpoint-hist', '1',
              '--output', os.path.join(REPO, 'output', 'bench_cost')] + args.epoch_extra
    variants = [('plain', ['--loss', 'ce']),
                ('lt_v1', ['--loss', 'losstransform', '--aug-repeats', str(args.m), '--lt-epoch', 'v1']),
                ('lt_full', ['--loss', 'losstransform', '--aug-repeats', str(args.m), '--lt-epoch', 'full'])]
    for trial in range(args.epoch_trials):
        for name, extra in variants:
            exp = f'{name}_t{trial}'
            cmd = [sys.executable, 'train.py'] + common + extra + ['--experiment', exp]
            shutil.rmtree(os.path.join(REPO, 'output', 'bench_cost', exp), ignore_errors=True)  # no stale summary rows
            log(f'epoch bench {exp}: {shell_join(cmd[1:])}')
            r = run_cmd(cmd, os.path.join(REPO, 'output', 'bench_cost', exp + '.log'), threads=args.threads)
            summ = read_summary(os.path.join(REPO, 'output', 'bench_cost', exp))
            if r['rc'] != 0 or not summ:
                log(f'  FAILED rc={r["rc"]} (see output/bench_cost/{exp}.log)')
                continue
            ep = [s['train_epoch_s'] for s in summ]
            row = dict(kind='epoch', variant=name, trial=trial, model=args.epoch_model, data=args.epoch_data,
                       epochs=len(ep), epoch_s_min=min(ep), epoch_s_median=statistics.median(ep),
                       train_img_s=max(s['train_img_s'] for s in summ), max_rss_mib=r['max_rss_mib'],
                       wall_s=r['wall_s'], command='python ' + shell_join(cmd[1:]))
            log(f'  {name}: epoch {row["epoch_s_min"]:.2f}s (min of {len(ep)}), max RSS {row["max_rss_mib"]:.0f} MiB')
            rows.append(row)
    return rows


def bench_loader(args):
    import torch
    import timm.data
    from lt_timm import create_loader
    from lt_timm.data import load_folder_dataset
    ds = load_folder_dataset('', args.loader_data, 'train', True, batch_size=args.loader_batch_size, seed=0)
    kw = dict(input_size=(3, args.loader_img_size, args.loader_img_size), batch_size=args.loader_batch_size,
              is_training=True, num_workers=args.workers, use_prefetcher=False, scale=(0.35, 1.0),
              color_jitter=0.3, interpolation='random')

    def throughput(make):
        loader = make()
        n, t0 = 0, None
        for i, (x, _) in enumerate(loader):
            if i == 2:  # skip worker start-up
                t0, n = time.perf_counter(), 0
            n += x.shape[0]
            if i + 1 >= args.loader_batches + 2:
                break
        return n / (time.perf_counter() - t0)

    rows = []
    res = {'timm': [], 'lt_timm': []}
    for trial in range(args.loader_trials):
        for name, make in (('timm', lambda: timm.data.create_loader(ds, **kw)),
                           ('lt_timm', lambda: create_loader(ds, num_aug_repeats=args.m, seed=trial, **kw))):
            torch.manual_seed(trial)
            v = throughput(make)
            res[name].append(v)
            log(f'loader {name} trial {trial}: {v:.0f} img/s')
    for name, vals in res.items():
        rows.append(dict(kind='loader', variant=name, img_s_median=statistics.median(vals), img_s_max=max(vals),
                         trials=len(vals), workers=args.workers, batch_size=args.loader_batch_size,
                         img_size=args.loader_img_size, data=args.loader_data))
    return rows, res


def plot(path, step_rows, epoch_summary, loader_summary):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    if step_rows:
        names = [r['model'] + (' (compiled)' if r.get('compiled') else '') for r in step_rows]
        target = 1.01 if step_rows[0]['kind'] == 'step_chunked' else 1.02
        ax.bar(names, [r['step_ratio'] for r in step_rows], color='tab:blue')
        ax.axhline(target, color='red', ls='--', label=f'target {target}')
        ax.axhline(1.0, color='k', lw=0.8)
        ax.set_ylim(0.9, max(1.1, max(r['step_ratio'] for r in step_rows) + 0.03))
        ax.set_ylabel('step time LT / base')
        ax.set_title('(a) training step time ratio')
        ax.tick_params(axis='x', rotation=20)
        ax.legend()
    ax = axes[1]
    if epoch_summary:
        names = list(epoch_summary['epoch_s'])
        ax.bar(names, [epoch_summary['epoch_s'][n] for n in names], color=['tab:gray', 'tab:blue', 'tab:orange'][:len(names)])
        for i, n in enumerate(names):
            ax.text(i, epoch_summary['epoch_s'][n], f'{epoch_summary["epoch_s"][n] / epoch_summary["epoch_s"]["plain"]:.2f}x',
                    ha='center', va='bottom')
        ax.set_ylabel('epoch wall time (s)')
        ax.set_title('(b) epoch time (median of trials)')
    ax = axes[2]
    if loader_summary:
        names = list(loader_summary)
        ax.bar(names, [loader_summary[n] for n in names], color=['tab:gray', 'tab:blue'])
        ax.set_ylabel('img/s')
        ax.set_title(f'(d) loader throughput, ratio {loader_summary["lt_timm"] / loader_summary["timm"]:.3f}')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1, help='torch/OMP threads (default 1: shared CPU)')
    p.add_argument('--models', nargs='+', default=['test_resnet', 'test_efficientnet', 'test_vit', 'cifar_resnet20'])
    p.add_argument('--batch-size', type=int, default=48, help='step bench batch (multiple of m)')
    p.add_argument('--img-size', type=int, default=64, help='step bench input size (cifar_* use 32)')
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--m', type=int, default=3, help='replicas per image (--aug-repeats)')
    p.add_argument('--steps', type=int, default=60)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--epoch-data', default='/tmp/datasets/mnist5k', help='ImageFolder for the epoch bench ("" skips)')
    p.add_argument('--epoch-model', default='test_resnet')
    p.add_argument('--epoch-epochs', type=int, default=2)
    p.add_argument('--epoch-batch-size', type=int, default=96)
    p.add_argument('--epoch-trials', type=int, default=2)
    p.add_argument('--epoch-extra', nargs=argparse.REMAINDER, default=None,
                   help='extra train.py flags (default: MNIST-5k flags); must come last')
    p.add_argument('--loader-data', default='/tmp/datasets/imagenette64', help='ImageFolder for the loader bench ("" skips)')
    p.add_argument('--loader-img-size', type=int, default=48)
    p.add_argument('--loader-batch-size', type=int, default=96)
    p.add_argument('--loader-batches', type=int, default=25)
    p.add_argument('--loader-trials', type=int, default=3)
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('--skip', nargs='*', default=[], choices=['step', 'epoch', 'loader'])
    g = p.add_argument_group('GPU protocol (e)')
    g.add_argument('--gpu-protocol', action='store_true',
                   help='chunked, sync-free step timing; sets the GPU defaults below unless given')
    g.add_argument('--chunk', type=int, default=20, help='steps per timed chunk')
    g.add_argument('--rounds', type=int, default=9, help='chunks per criterion (interleaved)')
    g.add_argument('--amp-dtype', default=None, help='autocast dtype (protocol default: bfloat16; float32 = off)')
    g.add_argument('--channels-last', action='store_true', default=None)
    g.add_argument('--vit-batch-size', type=int, default=None, help='batch for ViT models (protocol: 128)')
    g.add_argument('--compile-modes', nargs='+', default=['eager', 'compiled'], choices=['eager', 'compiled'])
    g.add_argument('--compile-backend', default='inductor')
    p.add_argument('--out-prefix', default=os.path.join(RESULTS, 'cost'))
    args = p.parse_args(argv)
    if args.gpu_protocol:  # the setting, unless overridden on the command line
        given = set(a.split('=')[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith('--'))
        for flag, value in (('--models', ['resnet50', 'vit_base_patch16_224', 'efficientnet_b0']),
                            ('--batch-size', 256), ('--img-size', 224), ('--num-classes', 1000)):
            if flag not in given:
                setattr(args, flag[2:].replace('-', '_'), value)
        args.amp_dtype = args.amp_dtype or 'bfloat16'
        args.channels_last = True if args.channels_last is None else args.channels_last
        args.vit_batch_size = args.vit_batch_size or 128
    args.amp_dtype = args.amp_dtype or 'float32'
    args.channels_last = bool(args.channels_last)
    if args.epoch_extra is None:
        args.epoch_extra = ['--in-chans', '1', '--img-size', '28', '--mean', '0.1307', '--std', '0.3081',
                            '--hflip', '0', '--color-jitter', '0', '--scale', '0.6', '1.0']
    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = dict(benchmark='cost', command='python ' + shell_join(sys.argv), args=vars(args), environment=environment(),
               started=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), step=[], epoch=[], loader=[], summary={})
    rows = []

    def save():
        write_json(args.out_prefix + '.json', out)
        write_csv(args.out_prefix + '.csv', rows)

    if 'step' not in args.skip and args.gpu_protocol:
        for name in args.models:
            for mode in args.compile_modes:
                log(f'GPU-protocol step bench {name} ({mode}, m={args.m}, {args.rounds} x {args.chunk} steps)')
                r = bench_step_chunked(name, args, device, compiled=mode == 'compiled')
                log(f'  base {r["base_step_ms"]:.2f} ms, LT {r["lt_step_ms"]:.2f} ms, ratio {r["step_ratio"]:.4f} '
                    f'(A/A {r["aa_control_ratio"]:.4f}); peak memory ratio {r.get("peak_mem_ratio", float("nan")):.4f}')
                out['step'].append(r); rows.append(r); save()
        out['summary']['step_ratio'] = {f'{r["model"]} ({"compiled" if r["compiled"] else "eager"})':
                                        round(r['step_ratio'], 4) for r in out['step']}
        out['summary']['step_aa_control_ratio'] = {f'{r["model"]} ({"compiled" if r["compiled"] else "eager"})':
                                                   round(r['aa_control_ratio'], 4) for r in out['step']}
        save()
    elif 'step' not in args.skip:
        for name in args.models:
            log(f'step bench {name} (batch {args.batch_size}, m={args.m}, {args.steps} steps)')
            r = bench_step(name, args, device)
            log(f'  base {r["base_step_ms"]:.1f} ms, LT {r["lt_step_ms"]:.1f} ms, ratio {r["step_ratio"]:.3f} '
                f'(min-ratio {r["step_ratio_min"]:.3f}, paired median {r["paired_ratio_median"]:.3f}, '
                f'A/A control {r["aa_control_ratio"]:.3f}); '
                f'loss-only overhead {r["loss_overhead_ms"]:.3f} ms ({100 * r["loss_overhead_frac_of_step"]:.2f} % of a step)')
            out['step'].append(r); rows.append(r); save()
        out['summary']['step_ratio'] = {r['model']: round(r['step_ratio'], 4) for r in out['step']}
        out['summary']['step_ratio_min'] = {r['model']: round(r['step_ratio_min'], 4) for r in out['step']}
        out['summary']['step_aa_control_ratio'] = {r['model']: round(r['aa_control_ratio'], 4) for r in out['step']}
        out['summary']['step_paired_ratio_median'] = {r['model']: round(r['paired_ratio_median'], 4) for r in out['step']}
        out['summary']['loss_overhead_frac_of_step'] = {r['model']: round(r['loss_overhead_frac_of_step'], 5) for r in out['step']}
        save()
    if 'epoch' not in args.skip and args.epoch_data:
        er = bench_epochs(args)
        out['epoch'] = er; rows += er
        med = {}
        for v in ('plain', 'lt_v1', 'lt_full'):
            vals = [r['epoch_s_min'] for r in er if r['variant'] == v]
            if vals:
                med[v] = statistics.median(vals)
        rss = {v: max(r['max_rss_mib'] for r in er if r['variant'] == v) for v in med}
        out['summary']['epoch_s'] = med
        if 'plain' in med:
            out['summary']['epoch_ratio'] = {v: round(med[v] / med['plain'], 4) for v in med}
            out['summary']['max_rss_mib'] = rss
            out['summary']['max_rss_ratio'] = {v: round(rss[v] / rss['plain'], 4) for v in rss}
        save()
    if 'loader' not in args.skip and args.loader_data:
        lr, res = bench_loader(args)
        out['loader'] = lr; rows += lr
        out['summary']['loader_img_s'] = {k: statistics.median(v) for k, v in res.items()}
        out['summary']['loader_ratio'] = round(statistics.median(res['lt_timm']) / statistics.median(res['timm']), 4)
        save()
    out['finished'] = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
    save()
    plot(args.out_prefix + '.png', out['step'],
         {'epoch_s': out['summary']['epoch_s']} if 'plain' in out['summary'].get('epoch_s', {}) else None,
         out['summary'].get('loader_img_s'))
    log(f'summary: {out["summary"]}')
    log(f'wrote {args.out_prefix}.json/.csv/.png')


if __name__ == '__main__':
    main()
