"""Training loop behind ``train_detection.py``: torchvision Mask/Faster R-CNN with l_multi or T(l_multi).

Arguments follow timm's ``train.py`` conventions: a ``-c/--config`` YAML whose keys are argument dest names
(loaded with ``parser.set_defaults``, so the command line still wins), dashed flags, ``--output`` +
``--experiment`` for the run folder. Per run folder: ``args.yaml``, ``summary.csv`` (one row per epoch),
``last.pth.tar`` (written atomically: tmp file + ``os.replace``), ``results.json`` and ``curves.png``.
"""
import argparse
import csv
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import yaml

__all__ = ['build_parser', 'parse_args', 'main', 'train']

LOSSES = ('multi', 'losstransform')
DATASETS = ('pennfudan', 'coco')


def build_parser():
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file specifying default arguments')
    p = argparse.ArgumentParser(description='LossTransform detection training (torchvision Mask/Faster R-CNN)')
    p.add_argument('-c', '--config', default='', type=str, metavar='FILE', help='YAML config (keys = arg dests)')
    g = p.add_argument_group('Dataset parameters')
    g.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional is *deprecated*, use --data-dir)')
    g.add_argument('--data-dir', metavar='DIR', help='path to dataset root')
    g.add_argument('--dataset', default='pennfudan', choices=DATASETS, help='dataset type')
    g.add_argument('--train-split', default='train2017', help='COCO: image folder / annotation suffix for training')
    g.add_argument('--val-split', default='val2017', help='COCO: image folder / annotation suffix for validation')
    g.add_argument('--val-size', type=int, default=50, help='PennFudanPed: images held out for validation')
    g.add_argument('--train-size', type=int, default=None, help='use only the first N training images')
    g.add_argument('--max-val', type=int, default=None, help='use only the first N validation images')
    g.add_argument('--split-seed', type=int, default=0, help='seed of the PennFudanPed train/val permutation')
    g.add_argument('--img-size', type=int, default=None, help='resize so the longer side is this (reduced resolution)')
    g = p.add_argument_group('Model parameters')
    g.add_argument('--model', default='maskrcnn', choices=('maskrcnn', 'fasterrcnn'))
    g.add_argument('--backbone', default='resnet50', help='timm model name, or tv_<torchvision name>')
    g.add_argument('--pretrained', action='store_true', default=False, help='load pretrained backbone weights')
    g.add_argument('--fpn-channels', type=int, default=256, help='FPN width (timm backbones)')
    g.add_argument('--mask-head-channels', type=int, default=256, help='mask head conv width (torchvision: 256)')
    g.add_argument('--box-head-dim', type=int, default=1024, help='box head MLP width (torchvision: 1024)')
    g.add_argument('--detections-per-img', type=int, default=100, help='max detections per image at eval')
    g.add_argument('--rpn-pre-nms', type=int, default=2000, help='RPN proposals kept before NMS (training)')
    g.add_argument('--rpn-post-nms', type=int, default=2000, help='RPN proposals kept after NMS (training)')
    g.add_argument('--box-batch-per-image', type=int, default=512, help='sampled RoIs per image for the box loss')
    g.add_argument('--anchor-sizes', type=int, nargs='+', default=None, help='one anchor size per FPN level')
    g = p.add_argument_group('Loss parameters')
    g.add_argument('--loss', default='losstransform', choices=LOSSES,
                   help='multi: torchvision multi-task loss; losstransform: T(l_multi)')
    g.add_argument('--aug-repeats', type=int, default=2, help='replicas per source image (m)')
    g.add_argument('--lt-rho', type=float, default=1.0, help='consistency weight rho')
    g.add_argument('--lt-box-weight', type=float, default=1.0, help='weight of the box term in the consistency')
    g.add_argument('--lt-mask-weight', type=float, default=1.0, help='weight of the mask term in the consistency')
    g.add_argument('--lt-min-visible', type=float, default=0.5, help='min visible fraction for an instance replica')
    g.add_argument('--lt-detach', action='store_true', default=False, help='stop gradient through the consensus')
    g = p.add_argument_group('Augmentation parameters')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--scale', type=float, nargs=2, default=[0.8, 1.2], metavar=('MIN', 'MAX'), help='scale range')
    g.add_argument('--translate', type=float, default=0.1, help='max translation as a fraction of the size')
    g.add_argument('--min-visible', type=float, default=0.3, help='drop training instances less visible than this')
    g = p.add_argument_group('Optimizer / schedule')
    g.add_argument('-b', '--batch-size', type=int, default=4,
                   help='rows per batch (replicas, as in timm); holds batch_size // aug_repeats source images')
    g.add_argument('--epochs', type=int, default=18)
    g.add_argument('--lr', type=float, default=0.02)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=1e-4)
    g.add_argument('--lr-steps', type=int, nargs='*', default=[12, 16], help='epochs at which lr *= lr-gamma')
    g.add_argument('--lr-gamma', type=float, default=0.1)
    g.add_argument('--warmup-iters', type=int, default=100)
    g.add_argument('--clip-grad', type=float, default=10.0, help='grad-norm clip (0 = off)')
    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--output', default='output/detection', help='output root')
    g.add_argument('--experiment', default='', help='run folder name under --output (default: generated)')
    g.add_argument('--resume', default='', help='checkpoint to resume from (e.g. <run>/last.pth.tar)')
    g.add_argument('-j', '--workers', type=int, default=0)
    g.add_argument('--log-interval', type=int, default=10)
    g.add_argument('--eval-interval', type=int, default=1, help='evaluate every N epochs (and at the end)')
    g.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--no-plot', action='store_true', default=False)
    return config_parser, p


def parse_args(argv: Optional[List[str]] = None):
    config_parser, parser = build_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        if not os.path.isfile(args_config.config):
            parser.error(f'config file not found: {args_config.config}')
        with open(args_config.config, 'r') as f:
            cfg = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            parser.error(f'unknown keys in {args_config.config}: {unknown}')
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        parser.error('no dataset given: pass --data-dir DIR')
    if args.aug_repeats < 1:
        parser.error('--aug-repeats must be >= 1')
    if args.batch_size < args.aug_repeats:
        parser.error(f'-b/--batch-size ({args.batch_size}) must be >= --aug-repeats ({args.aug_repeats})')
    return args


# ------------------------------------------------------------------------------------------------ data
def build_datasets(args):
    from .data import CocoDetectionDataset, PennFudanDataset, split_indices
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f'dataset directory not found: {args.data_dir}')
    if args.dataset == 'pennfudan':
        base = PennFudanDataset(args.data_dir, img_size=args.img_size)
        tr, va = split_indices(len(base), args.val_size, args.split_seed)
        train_base, val_base = base, base
    else:
        def coco(split):
            return CocoDetectionDataset(os.path.join(args.data_dir, split),
                                        os.path.join(args.data_dir, 'annotations', f'instances_{split}.json'),
                                        img_size=args.img_size, masks=args.model == 'maskrcnn',
                                        remove_empty=False)
        train_base, val_base = coco(args.train_split), coco(args.val_split)
        tr, va = list(range(len(train_base))), list(range(len(val_base)))
    if args.train_size:
        tr = tr[:args.train_size]
    if args.max_val:
        va = va[:args.max_val]
    return train_base, tr, val_base, va


class _Subset(torch.utils.data.Dataset):
    def __init__(self, base, idx):
        self.base, self.idx = base, list(idx)
        self.num_classes = getattr(base, 'num_classes', None)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.base[self.idx[i]]


def lr_at(args, epoch: int, it: int, iters_per_epoch: int) -> float:
    lr = args.lr * args.lr_gamma ** sum(1 for s in (args.lr_steps or []) if epoch >= s)
    step = epoch * iters_per_epoch + it
    if args.warmup_iters and step < args.warmup_iters:
        a = step / args.warmup_iters
        lr *= 0.001 * (1 - a) + a
    return lr


def _save_atomic(obj, path: str) -> None:
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_summary(path: str, rows: List[Dict]) -> None:
    keys = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot_curves(rows: List[Dict], path: str, title: str = '') -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ep = [r['epoch'] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for k in ('train_loss', 'train_consistency'):
        if any(k in r for r in rows):
            ax[0].plot(ep, [r.get(k, float('nan')) for r in rows], marker='o', label=k)
    ax[0].set_xlabel('epoch')
    ax[0].set_title('training loss')
    ax[0].legend()
    for k in ('box_AP', 'box_AP50', 'mask_AP', 'mask_AP50'):
        if any(k in r for r in rows):
            ax[1].plot(ep, [r.get(k, float('nan')) for r in rows], marker='o', label=k)
    ax[1].set_xlabel('epoch')
    ax[1].set_title('validation AP (%)')
    ax[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- train
def train(args) -> Dict:
    from .backbone import build_detector
    from .consistency import InstanceLossTransform
    from .data import ReplicaDataset, eval_collate, replica_collate
    from .evaluate import coco_from_dataset, evaluate
    from .transforms import ReplicaAugment

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train_base, tr_idx, val_base, va_idx = build_datasets(args)
    num_classes = train_base.num_classes
    exp = args.experiment or f'{args.dataset}-{args.model}-{args.backbone}-{args.loss}-s{args.seed}'
    out_dir = os.path.join(args.output, exp)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'args.yaml'), 'w') as f:
        yaml.safe_dump(vars(args), f, sort_keys=False)

    torch.manual_seed(args.seed)
    size = args.img_size or 800
    model = build_detector(args.model, args.backbone, num_classes, pretrained=args.pretrained,
                           min_size=size if args.img_size else 800, max_size=size if args.img_size else 1333,
                           anchor_sizes=args.anchor_sizes, fpn_channels=args.fpn_channels,
                           rpn_pre_nms_top_n_train=args.rpn_pre_nms, rpn_post_nms_top_n_train=args.rpn_post_nms,
                           box_batch_size_per_image=args.box_batch_per_image,
                           mask_head_channels=args.mask_head_channels, box_head_dim=args.box_head_dim,
                           box_detections_per_img=args.detections_per_img)
    rho = args.lt_rho if args.loss == 'losstransform' else 0.0
    net = InstanceLossTransform(model, args.aug_repeats, rho=rho, box_weight=args.lt_box_weight,
                                mask_weight=args.lt_mask_weight, min_visible=args.lt_min_visible,
                                detach_consensus=args.lt_detach).to(device)
    params = [q for q in net.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    augment = ReplicaAugment(args.hflip, args.scale, args.translate, args.min_visible)
    train_ds = ReplicaDataset(train_base, args.aug_repeats, augment, indices=tr_idx, seed=args.seed)
    imgs_per_batch = max(1, args.batch_size // args.aug_repeats)
    val_ds = _Subset(val_base, va_idx)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=2, shuffle=False, num_workers=args.workers,
                                             collate_fn=eval_collate)
    coco_gt = coco_from_dataset(val_ds, with_masks=args.model == 'maskrcnn')

    start_epoch, history = 0, []
    if args.resume:
        if not os.path.isfile(args.resume):
            raise FileNotFoundError(f'--resume checkpoint not found: {args.resume}')
        ck = torch.load(args.resume, map_location='cpu', weights_only=False)
        net.model.load_state_dict(ck['model'])
        opt.load_state_dict(ck['optimizer'])
        start_epoch, history = ck['epoch'] + 1, ck.get('history', [])
        print(f'Resumed from {args.resume} (epoch {ck["epoch"]}), continuing at epoch {start_epoch}', flush=True)

    summary_path = os.path.join(out_dir, 'summary.csv')
    metrics: Dict = history[-1] if history else {}
    for epoch in range(start_epoch, args.epochs):
        train_ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            train_ds, batch_size=imgs_per_batch, shuffle=True, num_workers=args.workers, drop_last=True,
            collate_fn=replica_collate, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        net.train()
        n_it = len(loader)
        sums: Dict[str, float] = {}
        t0 = time.time()
        for it, (images, targets, rparams) in enumerate(loader):
            lr = lr_at(args, epoch, it, n_it)
            for gr in opt.param_groups:
                gr['lr'] = lr
            images = [im.to(device) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            losses = net(images, targets, rparams)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f'non-finite loss at epoch {epoch} iter {it}: '
                                         f'{ {k: float(v) for k, v in losses.items()} }; lower --lr')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            opt.step()
            vals = {k: float(v.detach()) for k, v in losses.items()}
            vals['loss'] = float(loss.detach())
            vals['consistency'] = (net.last_parts.get('cls', 0.) + args.lt_box_weight * net.last_parts.get('box', 0.)
                                   + args.lt_mask_weight * net.last_parts.get('mask', 0.))
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.) + v
            if (it + 1) % args.log_interval == 0 or it + 1 == n_it:
                el = time.time() - t0
                print(f'Train: {epoch} [{it + 1:>4d}/{n_it} ({100. * (it + 1) / n_it:>3.0f}%)]  '
                      f'Loss: {vals["loss"]:.4f} ({sums["loss"] / (it + 1):.4f})  '
                      f'Consistency: {vals["consistency"]:.4f}  LR: {lr:.3e}  '
                      f'Time: {el / (it + 1):.2f}s/it', flush=True)
        row = {'epoch': epoch, 'lr': lr, 'epoch_time': round(time.time() - t0, 1)}
        row.update({f'train_{k}': v / max(1, n_it) for k, v in sums.items()})
        if (epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs:
            t1 = time.time()
            row.update(evaluate(net, val_loader, coco_gt, device, with_masks=args.model == 'maskrcnn'))
            row['eval_time'] = round(time.time() - t1, 1)
            print('Eval: ' + '  '.join(f'{k} {v:.2f}' for k, v in row.items() if 'AP' in k), flush=True)
        history.append(row)
        metrics = row
        _write_summary(summary_path, history)
        _save_atomic({'model': net.model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': epoch,
                      'history': history, 'args': vars(args)}, os.path.join(out_dir, 'last.pth.tar'))
    result = {'output': out_dir, 'final': metrics, 'num_train': len(tr_idx), 'num_val': len(va_idx)}
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=2)
    if history and not args.no_plot:
        plot_curves(history, os.path.join(out_dir, 'curves.png'), exp)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0
