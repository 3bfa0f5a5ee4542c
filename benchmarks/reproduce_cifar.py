"""The paper's CIFAR-10 protocols on real data, through the real CLIs and the committed recipes (docs/paper.md).

    published  validate.py on the published option-A ResNets (akamaster/pytorch_resnet_cifar10) over a test split:
               the start point of ``finetune``, and the shift of the JPEG copy from the published numbers.
    finetune   Table 5's protocol: fine-tune a published ResNet at its recipe's final lr (0.001, constant) with
               configs/cifar/<model>_finetune_{ce,ra,lt}.yaml: CE continuation vs repeated augmentation only vs
               LossTransform-v1 (m = 3), several seeds; final-epoch top-1 error, consistency KL, view agreement.
    scratch    Table 1's protocol: <model> from scratch with configs/cifar/<model>_{ce,lt,lt_original}.yaml; with
               --epochs shorter than the recipe, the multistep milestones move to 50 % / 75 % of the run (labelled).

Every run is a subprocess of train.py / validate.py; results go to benchmarks/results/cifar10_<part>.{csv,json,png}
(or --results-name). Finished runs (``.done`` in their folder) are kept; a run killed halfway starts again.

    python benchmarks/prepare_data.py --src '' --cifar-src /tmp/datasets/cifar10      # 10k-image train subset
    python benchmarks/reproduce_cifar.py published --data-dir /tmp/datasets/cifar10 --weights-dir /tmp/weights
    python benchmarks/reproduce_cifar.py finetune --data-dir /tmp/datasets/cifar10_sub10k --weights-dir /tmp/weights \
        --epochs 5 --seeds 0 1
    python benchmarks/reproduce_cifar.py finetune --data-dir /tmp/datasets/cifar10 --weights-dir /tmp/weights \
        --epochs 3 --seeds 0 1 2 --work-dir /tmp/lt_bench/cifar10_full --results-name cifar10_finetune_full
    python benchmarks/reproduce_cifar.py scratch --data-dir /tmp/datasets/cifar10_sub10k --epochs 6 --seeds 0
"""
import argparse
import glob
import json
import math
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REPO, RESULTS, environment, log, read_summary, run_cmd, run_validate, shell_join,  # noqa: E402
                    write_csv, write_json)

PY = sys.executable
# The views of the consistency metrics: the recipes' own training transform (pad-4 crop + flip).
VIEWS = ['--consistency', '8', '--consistency-images', '1000', '--train-crop-mode', 'pad', '--train-crop-pad', '4',
         '--hflip', '0.5', '--color-jitter', '0']
METHODS = {'finetune': ('ce', 'ra', 'lt'), 'scratch': ('ce', 'lt', 'lt_original')}
LABELS = {'ce': 'CE', 'ra': 'repeated aug. only (m=3)', 'lt': 'LossTransform-v1 (m=3)',
          'lt_original': 'LossTransform original (B x m rows)'}


def published_file(weights_dir: str, model: str) -> str:
    depth = model.replace('resnet', '')
    files = sorted(glob.glob(os.path.join(weights_dir, f'resnet{depth}-*.th')))
    if not files:
        raise SystemExit(f'no published checkpoint resnet{depth}-*.th in {weights_dir}; fetch '
                         f'akamaster/pytorch_resnet_cifar10 and extract pretrained_models/ there.')
    return files[0]


def validate(data_dir: str, model: str, checkpoint: str, out_json: str, args, extra=()) -> dict:
    cmd = [PY, 'validate.py', '--data-dir', data_dir, '--split', 'test', '--model', f'cifar_{model}',
           '--checkpoint', checkpoint, '--device', args.device, '-j', str(args.workers), '-b', '500',
           '--results-file', out_json, *extra]
    return run_validate(cmd, out_json, threads=args.threads)


def run_published(args) -> None:
    from lt_timm.models.cifar_resnet import PUBLISHED_TOP1_ERR
    rows = []
    for model in args.models:
        ckpt = published_file(args.weights_dir, model)
        res = validate(args.data_dir, model, ckpt, os.path.join(args.work_dir, f'published_{model}.json'), args, VIEWS)
        depth = int(model.replace('resnet', ''))
        rows.append(dict(model=model, checkpoint=os.path.basename(ckpt), test_images=args.data_dir,
                         top1_err=round(100 - res['top1'], 2), published_top1_err=PUBLISHED_TOP1_ERR[depth],
                         shift=round(100 - res['top1'] - PUBLISHED_TOP1_ERR[depth], 2), top5=res['top5'],
                         consistency_kl=res['consistency_kl'], view_agreement=res['view_agreement'],
                         command=res['command']))
        log(f'{model}: top-1 error {rows[-1]["top1_err"]} % (published {rows[-1]["published_top1_err"]} %)')
    write_csv(os.path.join(RESULTS, 'cifar10_published.csv'), rows)
    write_json(os.path.join(RESULTS, 'cifar10_published.json'), dict(rows=rows, environment=environment()))


def train_cmd(part: str, model: str, method: str, seed: int, args) -> list:
    recipe = f'configs/cifar/{model}_finetune_{method}.yaml' if part == 'finetune' else f'configs/cifar/{model}_{method}.yaml'
    cmd = [PY, 'train.py', '--data-dir', args.data_dir, '-c', recipe, '--seed', str(seed), '--device', args.device,
           '-j', str(args.workers), '--output', args.work_dir, '--experiment', f'{part}_{model}_{method}_s{seed}',
           '--log-interval', '20', '--checkpoint-hist', '1', '--no-plot']
    if args.epochs:
        cmd += ['--epochs', str(args.epochs)]
        if part == 'scratch':
            cmd += ['--decay-milestones', str(math.ceil(args.epochs * 0.5)), str(math.ceil(args.epochs * 0.75))]
    if part == 'finetune':
        cmd += ['--initial-checkpoint', published_file(args.weights_dir, model)]
    return cmd


def run_training(part: str, args) -> None:
    rows, curves = [], {}
    for model in args.models:
        for seed in args.seeds:
            for method in METHODS[part]:
                name = f'{part}_{model}_{method}_s{seed}'
                out_dir = os.path.join(args.work_dir, name)
                cmd = train_cmd(part, model, method, seed, args)
                if os.path.exists(os.path.join(out_dir, '.done')):
                    with open(os.path.join(out_dir, '.done')) as f:
                        done = json.load(f)
                    if done['command'].split()[1:] != shell_join(cmd).split()[1:]:  # the interpreter may differ
                        raise SystemExit(f'{out_dir} holds a run of another command ({done["command"]}); pass '
                                         f'another --work-dir (each data set / epoch count its own) or remove it.')
                    log(f'{name}: done earlier, reusing')
                else:
                    if os.path.isdir(out_dir):  # killed halfway: train.py would write to <name>-1, not here
                        log(f'{name}: unfinished earlier, starting it again')
                        shutil.rmtree(out_dir)
                    log(f'{name}: {shell_join(cmd)}')
                    r = run_cmd(cmd, os.path.join(args.work_dir, f'{name}.log'), threads=args.threads)
                    epochs = len(read_summary(out_dir)) if os.path.exists(os.path.join(out_dir, 'summary.csv')) else 0
                    if r['rc'] != 0 or (args.epochs and epochs != args.epochs):
                        raise SystemExit(f'{name} failed (rc {r["rc"]}, {epochs} epochs): '
                                         f'see {args.work_dir}/{name}.log')
                    done = dict(wall_s=r['wall_s'], command=shell_join(cmd))
                    with open(os.path.join(out_dir, '.done'), 'w') as f:
                        json.dump(done, f)
                summary = read_summary(out_dir)
                res = validate(args.data_dir, model, os.path.join(out_dir, 'last.pth.tar'),
                               os.path.join(args.work_dir, f'{name}_views.json'), args, VIEWS)
                curves.setdefault((model, method), []).append([100 - s['eval_top1'] for s in summary])
                rows.append(dict(
                    model=model, method=method, label=LABELS[method], seed=seed, epochs=len(summary),
                    top1_err=round(100 - summary[-1]['eval_top1'], 2),
                    best_top1_err=round(100 - max(s['eval_top1'] for s in summary), 2),
                    consistency_kl=res['consistency_kl'], view_agreement=res['view_agreement'],
                    train_s=round(sum(s['train_epoch_s'] for s in summary), 1), wall_s=round(done['wall_s'], 1),
                    command=done['command']))
                log(f'{name}: final top-1 error {rows[-1]["top1_err"]} %, KL {rows[-1]["consistency_kl"]:.4f}')
    agg = aggregate(rows)
    name = args.results_name or f'cifar10_{part}'
    write_csv(os.path.join(RESULTS, f'{name}.csv'), rows)
    write_json(os.path.join(RESULTS, f'{name}.json'),
               dict(part=part, data_dir=args.data_dir, epochs=args.epochs, seeds=args.seeds, rows=rows,
                    summary=agg, environment=environment()))
    plot(part, curves, os.path.join(RESULTS, f'{name}.png'), args)
    for a in agg:
        log(f'{a["model"]} {a["label"]}: {a["top1_err_mean"]:.2f} +- {a["top1_err_std"]:.2f} % '
            f'(n={a["seeds"]}), KL {a["consistency_kl_mean"]:.4f}')


def aggregate(rows: list) -> list:
    out = []
    for key in dict.fromkeys((r['model'], r['method']) for r in rows):
        rs = [r for r in rows if (r['model'], r['method']) == key]
        errs = [r['top1_err'] for r in rs]
        out.append(dict(model=key[0], method=key[1], label=LABELS[key[1]], seeds=len(rs),
                        top1_err_mean=round(statistics.mean(errs), 2),
                        top1_err_std=round(statistics.stdev(errs), 2) if len(errs) > 1 else 0.0,
                        consistency_kl_mean=round(statistics.mean(r['consistency_kl'] for r in rs), 5),
                        view_agreement_mean=round(statistics.mean(r['view_agreement'] for r in rs), 5),
                        train_s_mean=round(statistics.mean(r['train_s'] for r in rs), 1)))
    return out


def plot(part: str, curves: dict, path: str, args) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (model, method), runs in curves.items():
        n = min(len(r) for r in runs)
        mean = [statistics.mean(r[e] for r in runs) for e in range(n)]
        ax.plot(range(1, n + 1), mean, marker='o', label=f'{model} {LABELS[method]} (n={len(runs)})')
    ax.set_xlabel('epoch')
    ax.set_ylabel('test top-1 error (%)')
    ax.set_title(f'CIFAR-10 (JPEG copy) {part}: {os.path.basename(args.data_dir.rstrip("/"))}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('part', choices=('published', 'finetune', 'scratch'))
    p.add_argument('--data-dir', required=True, help='ImageFolder root with train/ and test/')
    p.add_argument('--weights-dir', default='/tmp/weights', help='folder of the published resnet*-*.th files')
    p.add_argument('--models', nargs='+', default=None, help='default: resnet20 resnet32 resnet56 (published), '
                                                             'resnet20 (finetune, scratch)')
    p.add_argument('--epochs', type=int, default=0, help='override the recipe\'s epochs (0: the recipe\'s)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--device', default='cpu')
    p.add_argument('-j', '--workers', type=int, default=1)
    p.add_argument('--threads', type=int, default=2, help='OMP threads per run')
    p.add_argument('--work-dir', default='/tmp/lt_bench/cifar10', help='run folders and logs')
    p.add_argument('--results-name', default='', help='results file name under benchmarks/results (default: '
                                                       'cifar10_<part>)')
    args = p.parse_args(argv)
    args.models = args.models or (['resnet20', 'resnet32', 'resnet56'] if args.part == 'published' else ['resnet20'])
    os.makedirs(args.work_dir, exist_ok=True)
    os.chdir(REPO)
    run_published(args) if args.part == 'published' else run_training(args.part, args)


if __name__ == '__main__':
    main()
