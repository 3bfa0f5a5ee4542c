"""BatchNorm diagnostic: does training with replicas in one batch leave worse BN running statistics?

For each checkpoint: val top-1 as trained, then after re-estimating every BatchNorm's running mean/var
(cumulative average, ``momentum=None``) from ``--batches`` plain training batches (training transform,
no repeats: every row a different image), without changing any weight. If replica batches (ra / lt_v1)
had biased the running statistics, recalibration would recover more accuracy for them than for ce.

    python benchmarks/bn_recalib.py --runs output/bench_accuracy/imagenette64/{ce,ra,lt_v1}_test_resnet_s0 \
        --data-dir /tmp/datasets/imagenette64 --img-size 32

Results: benchmarks/results/bn_recalib.csv / .json.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import REPO, RESULTS, environment, log, shell_join, write_csv, write_json  # noqa: E402


@__import__('torch').no_grad()
def evaluate(model, loader):
    model.eval()
    correct = n = 0
    for x, y in loader:
        correct += (model(x).argmax(-1) == y).sum().item()
        n += y.numel()
    return 100.0 * correct / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', nargs='+', required=True, help='run folders holding last.pth.tar')
    p.add_argument('--data-dir', default='/tmp/datasets/imagenette64')
    p.add_argument('--model', default='test_resnet')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--batches', type=int, default=60)
    p.add_argument('--batch-size', type=int, default=96)
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out-prefix', default=os.path.join(RESULTS, 'bn_recalib'))
    a = p.parse_args(argv)
    import torch
    import timm
    import timm.data
    import lt_timm.models  # noqa: F401
    from lt_timm.data import class_to_idx_of, load_folder_dataset
    torch.set_num_threads(a.threads)
    size = (3, a.img_size, a.img_size)
    train = load_folder_dataset('', a.data_dir, 'train', True, batch_size=a.batch_size, seed=0)
    val = load_folder_dataset('', a.data_dir, 'val', False, class_map=class_to_idx_of(train), batch_size=a.batch_size,
                              seed=0)
    # the same eval preprocessing as train.py / validate.py (the model's crop_pct, interpolation, mean, std)
    cfg = timm.data.resolve_data_config({'img_size': a.img_size}, model=timm.create_model(a.model, num_classes=10))
    val_loader = timm.data.create_loader(val, size, 256, is_training=False, use_prefetcher=False,
                                         num_workers=a.workers, crop_pct=cfg['crop_pct'],
                                         interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'])
    out_cfg = dict(eval_crop_pct=cfg['crop_pct'], eval_interpolation=cfg['interpolation'])
    train_loader = timm.data.create_loader(train, size, a.batch_size, is_training=True, use_prefetcher=False,
                                           num_workers=a.workers, scale=(0.35, 1.0), color_jitter=0.3,
                                           interpolation='random', mean=cfg['mean'], std=cfg['std'])
    out = dict(benchmark='bn_recalib', command='python ' + shell_join(sys.argv), args=vars(a),
               environment=environment(), runs=[], eval_config=out_cfg)
    rows = []
    for run in a.runs:
        model = timm.create_model(a.model, num_classes=10)
        timm.models.load_checkpoint(model, os.path.join(run, 'last.pth.tar'))
        before = evaluate(model, val_loader)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            for i, (x, _) in enumerate(train_loader):
                model(x)
                if i + 1 >= a.batches:
                    break
        after = evaluate(model, val_loader)
        row = dict(run=os.path.relpath(run, REPO), top1_err_trained=round(100 - before, 3),
                   top1_err_bn_recalibrated=round(100 - after, 3), err_change=round(before - after, 3))  # err_after - err_before; < 0: recalibration helped
        rows.append(row)
        log(f'{row["run"]}: err {row["top1_err_trained"]:.2f} -> {row["top1_err_bn_recalibrated"]:.2f} after BN recalibration')
        out['runs'] = rows
        write_csv(a.out_prefix + '.csv', rows)
        write_json(a.out_prefix + '.json', out)
    out['finished'] = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
    write_json(a.out_prefix + '.json', out)


if __name__ == '__main__':
    main()
