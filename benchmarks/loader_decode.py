"""Loader throughput of "decode once, augment m times" on ImageNet-size JPEGs.

Data preparation (done by this script, reused on a rerun): ``--num-images`` Imagenette training images
(``--num-images / --classes`` per class, the first files of the first ``--classes`` classes of ``--src`` in sorted
order) upscaled with PIL bicubic to ``--width`` x ``--height`` (500 x 375, an ImageNet-typical size) and saved as JPEG
quality ``--quality`` (90) into ``--data``/train/<class>/ (an ImageFolder; lt-timm's ``StrictImageDataset``).

Measured side by side, in one run, trials interleaved (a different loader order in each trial):

* ``timm``: ``timm.data.create_loader(is_training=True)`` without repeats (every row its own image);
* ``per_replica``: ``lt_timm.create_loader(num_aug_repeats=m, decode_once=False)`` (every row its own ``dataset[i]``,
  so each image is decoded m times);
* ``decode_once``: ``lt_timm.create_loader(num_aug_repeats=m)`` (each image decoded once per replica group);

for m in ``--ms`` and ``--workers``, all with timm's default ImageNet train transform at ``--img-size``
(RandomResizedCrop(0.08-1) + horizontal flip + colour jitter 0.4, bilinear) as ``create_loader`` builds it for the
prefetcher (uint8 output; normalisation happens on the device), batch ``--batch-size``. Throughput is rows (training
samples) per second of the DataLoader, over ``--batches`` batches after ``--warmup`` batches. Also measured, in
the main process (one thread): per-image decode time (open + decode + RGB) and train-transform time, which bound the
gain of decode-once at m replicas: ``(decode + transform) / (decode / m + transform)``.

    python benchmarks/loader_decode.py                      # ~6-8 min on 2 shared cores
    python benchmarks/loader_decode.py --trials 1 --batches 6 --ms 3 --workers 1 --out-prefix /tmp/ld_smoke  # ~30 s

Results: benchmarks/results/loader_decode.{csv,json,png} (override with --out-prefix).
"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, environment, log, shell_join, write_csv, write_json  # noqa: E402

VARIANTS = ('timm', 'per_replica', 'decode_once')


def prepare(args) -> str:
    """Upscaled JPEG ImageFolder under ``args.data`` (reused when the same recipe is already there)."""
    from PIL import Image
    recipe = (f'src={os.path.abspath(args.src)} images={args.num_images} classes={args.classes} '
              f'size={args.width}x{args.height} resample=bicubic quality={args.quality}\n')
    done = os.path.join(args.data, '.complete')
    if os.path.exists(done) and open(done).read() == recipe:
        log(f'data: reusing {args.data} ({recipe.strip()})')
        return recipe.strip()
    classes = sorted(d for d in os.listdir(args.src) if os.path.isdir(os.path.join(args.src, d)))[:args.classes]
    if len(classes) < args.classes:
        raise SystemExit(f'{args.src} has {len(classes)} class folders, fewer than --classes {args.classes}')
    per_class = args.num_images // args.classes
    t0 = time.time()
    for c in classes:
        files = sorted(f for f in os.listdir(os.path.join(args.src, c)) if not f.startswith('.'))[:per_class]
        if len(files) < per_class:
            raise SystemExit(f'{args.src}/{c} has {len(files)} images, fewer than {per_class}')
        out = os.path.join(args.data, 'train', c)
        os.makedirs(out, exist_ok=True)
        for f in files:
            with Image.open(os.path.join(args.src, c, f)) as im:
                im = im.convert('RGB').resize((args.width, args.height), Image.BICUBIC)
                im.save(os.path.join(out, os.path.splitext(f)[0] + '.jpg'), quality=args.quality)
    with open(done, 'w') as fh:
        fh.write(recipe)
    log(f'data: wrote {per_class * len(classes)} JPEGs to {args.data} in {time.time() - t0:.0f}s ({recipe.strip()})')
    return recipe.strip()


def loader_kwargs(args, workers):
    import torch
    return dict(input_size=(3, args.img_size, args.img_size), batch_size=args.batch_size, is_training=True,
                num_workers=workers, use_prefetcher=True, device=torch.device('cpu'))


def make_loader(ds, args, variant, m, workers, seed):
    import timm.data
    import lt_timm
    kw = loader_kwargs(args, workers)
    if variant == 'timm':
        loader = timm.data.create_loader(ds, **kw)
    else:
        loader = lt_timm.create_loader(ds, num_aug_repeats=m, seed=seed, decode_once=variant == 'decode_once', **kw)
    return loader.loader  # the DataLoader: the prefetcher's normalisation runs on the device in training


def throughput(loader, args) -> float:
    """Rows/s over ``args.batches`` batches after ``args.warmup`` (epochs chained; workers are persistent)."""
    def batches():
        while True:
            yield from loader
    n, t0 = 0, None
    for i, (x, _) in enumerate(batches()):
        if i == args.warmup:
            t0, n = time.perf_counter(), 0
        n += x.shape[0]
        if i + 1 >= args.warmup + args.batches:
            break
    return n / (time.perf_counter() - t0)


def split_times(ds, args, seed):
    """Mean per-image decode and train-transform ms in this process (one thread), interleaved image by image."""
    import timm.data
    from lt_timm.data import open_image
    timm.data.create_loader(ds, **loader_kwargs(args, 0))  # sets ds.transform to the benchmarked train transform
    transform = ds.transform
    rng = random.Random(seed)
    idx = rng.sample(range(len(ds)), min(args.split_images, len(ds)))
    dec, tf, cp = [], [], []
    for i in idx:
        path = ds.reader.samples[i][0]
        t0 = time.perf_counter()
        img = open_image(path, 'RGB')
        t1 = time.perf_counter()
        img2 = img.copy()  # what decode-once pays per extra replica
        t2 = time.perf_counter()
        transform(img2)
        t3 = time.perf_counter()
        dec.append(t1 - t0)
        cp.append(t2 - t1)
        tf.append(t3 - t2)
    return 1e3 * statistics.mean(dec), 1e3 * statistics.mean(tf), 1e3 * statistics.mean(cp)


def plot(path, rows, split, args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.workers) + 1, figsize=(5 * (len(args.workers) + 1), 4))
    width = 0.38
    for ax, w in zip(axes, args.workers):
        sub = {(r['variant'], r['m']): r for r in rows if r['workers'] == w}
        xs = list(range(len(args.ms)))
        for k, (variant, colour) in enumerate((('per_replica', 'tab:gray'), ('decode_once', 'tab:blue'))):
            vals = [sub[(variant, m)]['ratio_vs_timm'] for m in args.ms]
            bars = ax.bar([x + (k - 0.5) * width for x in xs], vals, width, color=colour, label=variant)
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v - 0.03, f'{v:.2f}', ha='center', va='top', fontsize=8,
                        color='white')
        ax.plot([x + 0.5 * width for x in xs], [split['bound'][str(m)] for m in args.ms], 'k_', ms=22, mew=2,
                label='bound (decode+tf)/(decode/m+tf)')
        ax.axhline(1.0, color='k', lw=0.8)
        ax.axhline(1.3, color='red', ls='--', lw=1, label='target 1.3x (m=3)')
        ax.set_xticks(xs)
        ax.set_xticklabels([f'm={m}' for m in args.ms])
        timm_img_s = sub[('timm', 0)]['img_s_median']
        ax.set_title(f'{w} worker(s): img/s relative to timm ({timm_img_s:.0f} img/s)')
        ax.set_ylabel('throughput / timm')
        ax.set_ylim(0, max(1.6, max(split['bound'].values()) + 0.15))
        ax.legend(fontsize=7, loc='upper left')
    ax = axes[-1]
    ax.bar(['decode', 'transform', 'copy'], [split['decode_ms'], split['transform_ms'], split['copy_ms']],
           color=['tab:orange', 'tab:green', 'tab:gray'])
    ax.set_ylabel('ms per image (1 thread)')
    ax.set_title(f'{args.width}x{args.height} JPEG q{args.quality} -> {args.img_size} px train transform')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', default='/tmp/datasets/imagenette/train', help='Imagenette ImageFolder split to upscale')
    p.add_argument('--data', default='/tmp/lt_decode_bench', help='where the upscaled JPEG ImageFolder is written')
    p.add_argument('--num-images', type=int, default=500)
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--width', type=int, default=500)
    p.add_argument('--height', type=int, default=375)
    p.add_argument('--quality', type=int, default=90)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=48)
    p.add_argument('--ms', type=int, nargs='+', default=[2, 3, 4], help='replicas per image (--aug-repeats)')
    p.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='DataLoader workers')
    p.add_argument('--batches', type=int, default=16, help='timed batches per measurement')
    p.add_argument('--warmup', type=int, default=3, help='untimed batches first (worker start-up)')
    p.add_argument('--trials', type=int, default=7, help='interleaved repeats of every measurement')
    p.add_argument('--split-images', type=int, default=100, help='images for the decode/transform split')
    p.add_argument('--out-prefix', default=os.path.join(RESULTS, 'loader_decode'))
    p.add_argument('--replot', action='store_true', help='only redraw the PNG from the JSON of --out-prefix')
    args = p.parse_args()
    if args.replot:
        import json
        with open(args.out_prefix + '.json') as f:
            saved = json.load(f)
        plot(args.out_prefix + '.png', saved['rows'], saved['split'], argparse.Namespace(**saved['args']))
        return

    import torch
    torch.set_num_threads(1)
    from lt_timm.data import load_folder_dataset
    recipe = prepare(args)
    ds = load_folder_dataset('', args.data, 'train', True)
    configs = [(v, 0 if v == 'timm' else m, w) for w in args.workers for v in VARIANTS
               for m in ([0] if v == 'timm' else args.ms)]
    configs = list(dict.fromkeys(configs))
    raw = {f'{v}/m{m}/w{w}': [] for v, m, w in configs}
    splits, loadavg = [], []
    t_start = time.time()
    for trial in range(args.trials):
        loadavg.append(os.getloadavg()[0])  # other processes on the machine (1-minute load average)
        order = configs[:]
        random.Random(trial).shuffle(order)
        for v, m, w in order:
            torch.manual_seed(trial)
            loader = make_loader(ds, args, v, m, w, seed=trial)
            val = throughput(loader, args)
            del loader
            raw[f'{v}/m{m}/w{w}'].append(val)
            log(f'trial {trial} {v:12s} m={m} workers={w}: {val:6.1f} img/s')
        splits.append(split_times(ds, args, trial))
        log(f'trial {trial} (load average {loadavg[-1]:.2f}) split: decode {splits[-1][0]:.2f} ms, '
            f'transform {splits[-1][1]:.2f} ms, '
            f'copy {splits[-1][2]:.2f} ms per image ({time.time() - t_start:.0f}s so far)')

    dec = statistics.median(s[0] for s in splits)
    tf = statistics.median(s[1] for s in splits)
    cp = statistics.median(s[2] for s in splits)
    bound = {str(m): (dec + tf) / (dec / m + tf) for m in args.ms}
    split = dict(decode_ms=dec, transform_ms=tf, copy_ms=cp, bound=bound,
                 trials=[dict(decode_ms=a, transform_ms=b, copy_ms=c) for a, b, c in splits])
    rows = []
    for v, m, w in configs:
        vals = raw[f'{v}/m{m}/w{w}']
        timm_vals = raw[f'timm/m0/w{w}']
        rows.append(dict(variant=v, m=m, workers=w, img_s_median=statistics.median(vals), img_s_min=min(vals),
                         img_s_max=max(vals), trials=len(vals),
                         ratio_vs_timm=statistics.median(vals) / statistics.median(timm_vals),
                         ratio_vs_timm_per_trial_median=statistics.median(a / b for a, b in zip(vals, timm_vals)),
                         bound=bound[str(m)] if v == 'decode_once' else 1.0, batch_size=args.batch_size,
                         img_size=args.img_size, decode_ms=dec, transform_ms=tf))
    for r in rows:
        log(f"{r['variant']:12s} m={r['m']} workers={r['workers']}: {r['img_s_median']:6.1f} img/s "
            f"(x{r['ratio_vs_timm']:.2f} timm, bound x{r['bound']:.2f})")
    out = dict(benchmark='loader_decode', command='python ' + shell_join(sys.argv), args=vars(args),
               environment=environment(), data=recipe, wall_s=time.time() - t_start,
               note=('rows/s of the DataLoader (prefetcher-style uint8 transform, no normalisation), median over '
                     'interleaved trials; machine: 2 CPU cores shared with other processes'),
               split=split, rows=rows, raw=raw, loadavg_1min_per_trial=loadavg)
    write_json(args.out_prefix + '.json', out)
    write_csv(args.out_prefix + '.csv', rows)
    plot(args.out_prefix + '.png', rows, split, args)
    log(f'wrote {args.out_prefix}.{{json,csv,png}} in {time.time() - t_start:.0f}s')


if __name__ == '__main__':
    main()
