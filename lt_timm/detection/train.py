"""Training loop behind ``train_detection.py``: torchvision Mask/Faster R-CNN or RetinaNet with l_multi or T(l_multi).

Same conventions as the classification ``train.py`` (:mod:`lt_timm.training`): a ``-c/--config`` YAML whose keys
are argument dest names (the command line still wins), dashed flags, ``logging`` (timm's default setup), user
errors as :class:`lt_timm.errors.UserError` (``error: ...`` with the fix, exit code 2, nothing written or lost),
run folders claimed with :func:`lt_timm.run_dir.claim_run_dir` (never overwritten; ``--resume`` continues in the
checkpoint's folder), ``summary.csv`` via :func:`lt_timm.run_dir.update_summary` (timm's columns, one row per
epoch), ``curves.png`` via :func:`lt_timm.plots.plot_training_curves`, ``last.pth.tar`` written atomically (tmp
file + ``os.replace``) and only from finite weights, batches from :class:`lt_timm.sampler.RepeatedAugBatchSampler`
(``--lt-epoch v1|full``, single process or DDP under ``torchrun``).

The paper's Table 6 protocol (fine-tune torchvision's COCO Faster R-CNN, RetinaNet and Mask R-CNN* with FPN and RPN
frozen): ``--detector-weights coco`` (or ``--detector-checkpoint FILE``, the same weights from disk) builds
torchvision's COCO detector for ``--model`` (:func:`lt_timm.detection.backbone.build_coco_detector`) and trains on
COCO category ids (``CocoDetectionDataset(label_space='coco_ids')``, chosen here); ``--reset-predictors`` replaces
its class predictors for another label set; ``--freeze NAME ...`` freezes submodules (Mask R-CNN*: ``--freeze
backbone.fpn rpn``). Recipes: ``configs/detection/table6_*.yaml``.
"""
import argparse
import logging
import os
import time
from typing import Dict, List, Optional

import torch
import yaml

from ..errors import UserError, exit_on_user_error
from ..run_dir import claim_run_dir, resume_hint, truncate_summary, update_summary
from .finetune import (COCO_FIXED_FLAGS, build_model, check_coco_categories, check_coco_detector_args,
                       dataset_label_space, freeze_submodules, hold_frozen_norms, uses_coco_detector)

__all__ = ['build_parser', 'parse_args', 'main', 'train', 'check_match_args', 'detector_options', 'runtime_options',
           'DETECTOR_WEIGHTS']

_logger = logging.getLogger('train_detection')

LOSSES = ('multi', 'losstransform')
MODELS = ('maskrcnn', 'fasterrcnn', 'retinanet')
MATCH_MODES = ('gt', 'predicted')  # lt_timm.detection.consistency.MATCH_MODES (not imported: keeps --help light)
DATASETS = ('pennfudan', 'coco')
DET_EPOCH_MODES = ('v1', 'full')
DETECTOR_WEIGHTS = ('none', 'coco')  # 'coco': torchvision's COCO_V1 detector (lt_timm.detection.backbone)


def build_parser():
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file specifying default arguments')
    p = argparse.ArgumentParser(
        description='LossTransform detection training (torchvision Mask/Faster R-CNN, RetinaNet)')
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
    g.add_argument('--model', default='maskrcnn', choices=MODELS,
                   help='retinanet: one-stage, needs --lt-match predicted (no RoI heads for GT instances)')
    g.add_argument('--backbone', default='resnet50', help='timm model name, or tv_<torchvision name>')
    g.add_argument('--pretrained', action='store_true', default=False, help='load pretrained backbone weights')
    g.add_argument('--detector-weights', default='none', choices=DETECTOR_WEIGHTS,
                   help='coco: torchvision\'s COCO detector for --model (fasterrcnn/maskrcnn/retinanet_resnet50_fpn, '
                        'COCO_V1 weights via torchvision\'s weights API, downloaded once into the torch hub cache; '
                        'needs --backbone tv_resnet50); trains on COCO category ids (the paper\'s Table 6)')
    g.add_argument('--detector-checkpoint', default='', metavar='FILE',
                   help='the COCO detector\'s weights from FILE instead of the download: a torchvision-format state '
                        'dict (the COCO_V1 .pth file, or a dict holding it as model/state_dict); implies '
                        '--detector-weights coco')
    g.add_argument('--reset-predictors', action='store_true', default=False,
                   help='with the COCO detector: fresh class predictors for this dataset\'s classes (torchvision\'s '
                        'fine-tuning tutorial; box/mask predictor, RetinaNet cls_logits) instead of COCO category ids')
    g.add_argument('--freeze', nargs='*', default=[], metavar='NAME',
                   help='freeze these submodules of the detector (dotted names, e.g. backbone.fpn rpn = the '
                        'paper\'s Mask R-CNN*): no gradient, not in the optimizer, BatchNorm statistics kept')
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
    g.add_argument('--lt-match', default='gt', choices=MATCH_MODES,
                   help='which instances the consistency compares across replicas: gt = annotated instances '
                        '(R-CNN only); predicted = the model\'s own detections, matched across replicas by greedy '
                        'IoU matching in the source frame (the paper\'s instance matching; also RetinaNet)')
    g.add_argument('--lt-match-iou', type=float, default=0.5,
                   help='--lt-match predicted: IoU with a cluster\'s first box needed to join it')
    g.add_argument('--lt-epoch', default='v1', choices=DET_EPOCH_MODES,
                   help='v1: an epoch holds as many rows as the training set has images (N/m images, m replicas '
                        'each: the cost of a plain epoch); full: every image m times per epoch (m x the cost)')
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
    g.add_argument('--resume', default='', help='continue a run from its <run>/last.pth.tar (model, optimizer, '
                                                'epoch; the run keeps writing to <run>)')
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
def build_datasets(args, label_space: str = 'contiguous'):
    """Training and validation datasets and their indices; ``label_space`` is the COCO dataset's (see
    :func:`dataset_label_space`)."""
    from .data import CocoDetectionDataset, PennFudanDataset, split_indices
    if not os.path.isdir(args.data_dir):
        raise UserError(f'dataset directory not found: {args.data_dir}; pass the dataset root with --data-dir '
                        f'(PennFudanPed: the folder holding PNGImages/ and PedMasks/; COCO: the folder holding '
                        f'{args.train_split}/, {args.val_split}/ and annotations/).')
    if args.dataset == 'pennfudan':
        base = PennFudanDataset(args.data_dir, img_size=args.img_size)
        tr, va = split_indices(len(base), args.val_size, args.split_seed)
        train_base, val_base = base, base
    else:
        def coco(split):
            return CocoDetectionDataset(os.path.join(args.data_dir, split),
                                        os.path.join(args.data_dir, 'annotations', f'instances_{split}.json'),
                                        img_size=args.img_size, masks=args.model == 'maskrcnn',
                                        remove_empty=False, label_space=label_space)
        train_base, val_base = coco(args.train_split), coco(args.val_split)
        tr, va = list(range(len(train_base))), list(range(len(val_base)))
    if args.train_size:
        tr = tr[:args.train_size]
    if args.max_val:
        va = va[:args.max_val]
    if not va:
        raise UserError(f'no validation images (--val-size {args.val_size}, --max-val {args.max_val}); every run '
                        f'is evaluated: set --val-size (PennFudanPed) or --max-val to at least 1.')
    return train_base, tr, val_base, va


class _Subset(torch.utils.data.Dataset):
    def __init__(self, base, idx):
        self.base, self.idx = base, list(idx)
        self.num_classes = getattr(base, 'num_classes', None)
        self.categories = getattr(base, 'categories', None)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.base[self.idx[i]]


def check_match_args(model: str, match: str, match_iou: float) -> None:
    """``--lt-match`` / ``--lt-match-iou`` against ``--model``: problems are one-line UserErrors naming the fix."""
    if model == 'retinanet' and match == 'gt':
        raise UserError('--model retinanet has no RoI heads to evaluate the ground-truth instances of --lt-match gt '
                        '(the default); pass --lt-match predicted (instances matched from the model\'s detections).')
    if not 0.0 < match_iou <= 1.0:
        raise UserError(f'--lt-match-iou {match_iou} is not an IoU threshold; pass a value in (0, 1], e.g. 0.5.')


def runtime_options(args) -> Dict:
    """The flags' torchvision detector settings that do not change the architecture (state dict): image size of
    the internal transform (``--img-size``, else torchvision's 800 / 1333), proposal / RoI counts, detection cap
    (R-CNN-only options are not passed to RetinaNet)."""
    sizes = dict(min_size=args.img_size, max_size=args.img_size) if args.img_size else dict(min_size=800,
                                                                                            max_size=1333)
    if args.model == 'retinanet':
        return dict(sizes, detections_per_img=args.detections_per_img)
    return dict(sizes, rpn_pre_nms_top_n_train=args.rpn_pre_nms, rpn_post_nms_top_n_train=args.rpn_post_nms,
                box_batch_size_per_image=args.box_batch_per_image, box_detections_per_img=args.detections_per_img)


def detector_options(args) -> Dict:
    """Keyword arguments of :func:`lt_timm.detection.backbone.build_detector` from the flags (R-CNN-only options
    are not passed to RetinaNet)."""
    arch = dict(pretrained=args.pretrained, anchor_sizes=args.anchor_sizes, fpn_channels=args.fpn_channels)
    if args.model != 'retinanet':
        arch.update(mask_head_channels=args.mask_head_channels, box_head_dim=args.box_head_dim)
    return dict(runtime_options(args), **arch)


def build_sampler(args, num_images: int, world_size: int = 1, rank: int = 0):
    """The grouped repeated-augmentation batch sampler of the classification loader (``-b`` rows per batch)."""
    from ..sampler import RepeatedAugBatchSampler
    try:
        return RepeatedAugBatchSampler(num_images, args.batch_size, args.aug_repeats, num_replicas=world_size,
                                       rank=rank, shuffle=True, epoch_mode=args.lt_epoch, seed=args.seed)
    except ValueError as e:
        raise UserError(f'{e} (or --lt-epoch full: each image m times per epoch)') from e


def lr_at(args, epoch: int, it: int, iters_per_epoch: int) -> float:
    """Step schedule with linear warmup: a pure function of (epoch, step), so ``--resume`` continues it exactly."""
    lr = args.lr * args.lr_gamma ** sum(1 for s in (args.lr_steps or []) if epoch >= s)
    step = epoch * iters_per_epoch + it
    if args.warmup_iters and step < args.warmup_iters:
        a = step / args.warmup_iters
        lr *= 0.001 * (1 - a) + a
    return lr


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str, model: torch.nn.Module, optimizer, epoch: int, args, metric=None) -> None:
    """timm's checkpoint layout (``state_dict``, ``optimizer``, ``epoch``, ``args``, ``version`` 2), written to a
    tmp file and moved over ``path`` with ``os.replace``: ``path`` is always a complete checkpoint."""
    state = {'epoch': epoch, 'arch': type(model).__name__, 'state_dict': model.state_dict(),
             'optimizer': optimizer.state_dict(), 'args': args, 'version': 2, 'metric': metric}
    tmp = f'{path}.{os.getpid()}.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer, args) -> int:
    """Restore model and optimizer from ``path``; returns the epoch to continue at. Problems are UserErrors."""
    from ..modeling import checkpoint_problem, read_checkpoint
    if not os.path.isfile(path):
        raise UserError(f'--resume checkpoint {path} not found; pass the last.pth.tar of the run to continue.')
    try:
        ck = read_checkpoint(path)
        saved = ck.get('args')
        if isinstance(saved, argparse.Namespace) and getattr(saved, 'lr', args.lr) != args.lr:
            raise UserError(f'--lr {args.lr} differs from the resumed run\'s lr {saved.lr}: a resumed run continues '
                            f'its own schedule; drop --lr (or pass --lr {saved.lr}).')
        model.load_state_dict(ck['state_dict'])
        optimizer.load_state_dict(ck['optimizer'])
        return int(ck['epoch']) + 1
    except UserError:
        raise
    except Exception as e:
        raise UserError(checkpoint_problem(path, e, f'--model {args.model} --backbone {args.backbone} of this '
                                                    f'dataset')) from e


def _diverged(what: str, epoch: int, out_dir: Optional[str]) -> UserError:
    return UserError(f'{what} at epoch {epoch}: training diverged and nothing of this epoch was saved; lower --lr '
                     f'or --clip-grad, {resume_hint(out_dir, epoch)}.')


# ------------------------------------------------------------------------------------------ distributed
def _init_distributed(args):
    """torchrun (``WORLD_SIZE`` > 1): one process per device, gloo on CPU / nccl on CUDA. Returns (world, rank)."""
    import torch.distributed as dist
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return 1, 0
    if not dist.is_initialized():
        dist.init_process_group('nccl' if str(args.device).startswith('cuda') else 'gloo')
    rank = dist.get_rank()
    if str(args.device).startswith('cuda'):
        local = int(os.environ.get('LOCAL_RANK', '0'))
        args.device = f'cuda:{local}'
        torch.cuda.set_device(local)
    return dist.get_world_size(), rank


def _all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
        t = t / world
    return t


# ----------------------------------------------------------------------------------------------- train
def _eval_keys(with_masks: bool) -> List[str]:
    return [f'{kind}_{k}' for kind in (('box', 'mask') if with_masks else ('box',)) for k in ('AP', 'AP50', 'AP75')]


def train(args) -> Dict:
    from ..modeling import all_finite
    from ..plots import plot_training_curves
    from .consistency import InstanceLossTransform
    from .data import BlockBatchSampler, ReplicaDataset, eval_collate, replica_collate
    from .evaluate import coco_from_dataset, evaluate
    from .transforms import ReplicaAugment

    check_match_args(args.model, args.lt_match, args.lt_match_iou)
    coco_detector = uses_coco_detector(args.detector_weights, args.detector_checkpoint)
    if coco_detector:
        check_coco_detector_args(args.model, args.backbone, args.pretrained, args.detector_checkpoint,
                                 {k: getattr(args, k) for k in COCO_FIXED_FLAGS})
    elif args.reset_predictors:
        raise UserError('--reset-predictors replaces the COCO detector\'s class predictors; it needs '
                        '--detector-weights coco or --detector-checkpoint FILE (or drop it).')
    label_space = dataset_label_space(args.dataset, coco_detector, args.reset_predictors)
    if args.threads:
        torch.set_num_threads(args.threads)
    world, rank = _init_distributed(args)
    primary = rank == 0
    if world > 1:
        _logger.info(f'Training in distributed mode: process {rank}/{world}, device {args.device}.')
    device = torch.device(args.device)
    with_masks = args.model == 'maskrcnn'
    train_base, tr_idx, val_base, va_idx = build_datasets(args, label_space)
    sampler = build_sampler(args, len(tr_idx), world, rank)
    num_classes = train_base.num_classes
    if label_space == 'coco_ids':  # the COCO detector's 91 outputs = COCO category ids
        from .backbone import coco_category_names
        names = coco_category_names(args.model)
        for ds in (train_base, val_base):
            check_coco_categories(ds.categories, names, ds.ann_file)
        num_classes = len(names)

    torch.manual_seed(args.seed)
    model = build_model(args.model, args.backbone, num_classes, coco_detector, args.detector_checkpoint,
                        args.reset_predictors, detector_options(args), runtime_options(args))
    args.freeze = list(args.freeze or [])  # a YAML 'freeze:' left empty is None
    frozen = freeze_submodules(model, args.freeze)
    rho = args.lt_rho if args.loss == 'losstransform' else 0.0
    net = InstanceLossTransform(model, args.aug_repeats, rho=rho, box_weight=args.lt_box_weight,
                                mask_weight=args.lt_mask_weight, min_visible=args.lt_min_visible,
                                detach_consensus=args.lt_detach, match=args.lt_match,
                                match_iou=args.lt_match_iou).to(device)
    params = [q for q in net.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start_epoch = load_checkpoint(args.resume, net.model, opt, args) if args.resume else 0
    train_net = net
    if world > 1:
        train_net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == 'cuda' else None)

    augment = ReplicaAugment(args.hflip, args.scale, args.translate, args.min_visible)
    train_ds = ReplicaDataset(train_base, args.aug_repeats, augment, indices=tr_idx, seed=args.seed)
    # Each item is (image, replicas): decoded once, augmented per replica; randomness = f(seed, epoch, image).
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=BlockBatchSampler(sampler),
                                         num_workers=args.workers, collate_fn=replica_collate)
    n_it = len(loader)
    out_dir, lock, coco_gt, val_loader = None, None, None, None
    if primary:
        val_ds = _Subset(val_base, va_idx)
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=2, shuffle=False, num_workers=args.workers,
                                                 collate_fn=eval_collate)
        coco_gt = coco_from_dataset(val_ds, with_masks=with_masks)

    output, exp = args.output, args.experiment
    if args.resume and not exp:  # continue in the checkpoint's own folder
        output, exp = os.path.split(os.path.dirname(os.path.abspath(args.resume)))
    exp = exp or f'{args.dataset}-{args.model}-{args.backbone}-{args.loss}-s{args.seed}'
    metrics: Dict = {}
    try:
        if primary:
            lock = claim_run_dir(output, exp, args.resume)
            out_dir = os.path.dirname(lock.path)
            truncate_summary(os.path.join(out_dir, 'summary.csv'), start_epoch)
            with open(os.path.join(out_dir, 'args.yaml'), 'w') as f:
                yaml.safe_dump(vars(args), f, sort_keys=False)
            if coco_detector:
                labels = ('COCO category ids' if getattr(train_base, 'label_space', '') == 'coco_ids'
                          else f'1..{num_classes - 1} (fresh class predictors)')
                source = args.detector_checkpoint or 'torchvision COCO_V1 (torch hub cache)'
                _logger.info(f'torchvision\'s COCO detector for --model {args.model}, weights from {source}; '
                             f'labels: {labels}.')
            if args.freeze:
                _logger.info(f'Frozen: {" ".join(args.freeze)} ({len(frozen)} parameter tensors); '
                             f'{sum(q.numel() for q in params) / 1e6:.2f}M parameters trained.')
            _logger.info(
                f'{args.model} on {args.backbone} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), '
                f'{len(tr_idx)} train / {len(va_idx)} val images, loss {args.loss} (rho {rho}, --lt-match '
                f'{args.lt_match}). Sampler: grouped '
                f'repeats m={args.aug_repeats}, mode {args.lt_epoch}, {n_it} batches/epoch of {args.batch_size} rows'
                + (f' per rank x {world} ranks' if world > 1 else '') + f'. Output: {out_dir}. '
                f'Epochs {start_epoch}..{args.epochs - 1}.')
            if args.resume:
                _logger.info(f'Resumed from {args.resume}, continuing at epoch {start_epoch}.')
        summary_path = os.path.join(out_dir, 'summary.csv') if out_dir else None
        for epoch in range(start_epoch, args.epochs):
            metrics = _train_epoch(args, epoch, train_net, net, params, opt, loader, train_ds, device, world,
                                   primary, out_dir)
            if not all_finite(net.model):
                raise _diverged('the weights are no longer finite (NaN/inf)', epoch, out_dir)
            evaluated = (epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs
            eval_metrics = {k: float('nan') for k in _eval_keys(with_masks)}
            if primary and evaluated:
                t1 = time.time()
                eval_metrics = evaluate(net, val_loader, coco_gt, device, with_masks=with_masks)
                eval_metrics['time'] = round(time.time() - t1, 1)
                _logger.info('Eval: ' + '  '.join(f'{k} {v:.2f}' for k, v in eval_metrics.items() if 'AP' in k))
            elif primary:
                eval_metrics['time'] = float('nan')
            if primary:  # checkpoint first, then its summary row (a resumed run drops rows past its start)
                save_checkpoint(os.path.join(out_dir, 'last.pth.tar'), net.model, opt, epoch, args,
                                metric=eval_metrics.get('box_AP'))
                lr_last = metrics.pop('lr_last')
                update_summary(epoch, metrics, eval_metrics, filename=summary_path, lr=lr_last)
                metrics.update({f'eval_{k}': v for k, v in eval_metrics.items()})
            if world > 1:
                import torch.distributed as dist
                dist.barrier()
        if primary and not args.no_plot and os.path.exists(summary_path):
            png = plot_training_curves(summary_path, os.path.join(out_dir, 'curves.png'),
                                       title=f'{exp}: --loss {args.loss}')
            _logger.info(f'Training curves: {png}')
    finally:
        if lock is not None:
            lock.release()
    return {'output': out_dir, 'final': metrics, 'num_train': len(tr_idx), 'num_val': len(va_idx)}


def _train_epoch(args, epoch, train_net, net, params, opt, loader, train_ds, device, world, primary, out_dir):
    """One epoch; returns the epoch's mean losses (``loss``, ``loss_base``, torchvision's terms,
    ``loss_consistency`` = rho x consistency, ``consistency`` = the unweighted term measured with either loss)."""
    loader.batch_sampler.set_epoch(epoch)
    train_ds.set_epoch(epoch)
    net.train()
    hold_frozen_norms(net.model, args.freeze)
    n_it = len(loader)
    keys, sums = None, None
    lr = lr_at(args, epoch, 0, n_it)
    t0 = time.time()
    for it, (images, targets, rparams) in enumerate(loader):
        lr = lr_at(args, epoch, it, n_it)
        for gr in opt.param_groups:
            gr['lr'] = lr
        images = [im.to(device) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        losses = train_net(images, targets, rparams)
        loss = sum(losses.values())
        if not bool(torch.isfinite(loss)):  # one sync per step: a bad step is never applied
            parts = ', '.join(f'{k} {float(v):.4g}' for k, v in losses.items())
            raise _diverged(f'the loss is {float(loss)} ({parts}) at step {it}', epoch, out_dir)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        opt.step()
        p = net.last_parts_tensors
        cons = (p['cls'] + args.lt_box_weight * p['box'] + args.lt_mask_weight * p['mask']) if p else loss.new_zeros(())
        vals = {'loss': loss, 'loss_base': loss - losses['loss_consistency'], **losses, 'consistency': cons}
        if keys is None:
            keys = list(vals)
            sums = torch.zeros(len(keys), dtype=torch.float64, device=loss.device)
        sums += torch.stack([vals[k].detach().to(torch.float64) for k in keys])  # summed on the device
        if primary and ((it + 1) % args.log_interval == 0 or it + 1 == n_it):
            now = torch.stack([vals[k].detach().float() for k in ('loss', 'consistency')]).tolist()
            mean_loss = float(sums[0]) / (it + 1)
            el = time.time() - t0
            _logger.info(f'Train: {epoch} [{it + 1:>4d}/{n_it} ({100. * (it + 1) / n_it:>3.0f}%)]  '
                         f'Loss: {now[0]:.4f} ({mean_loss:.4f})  Consistency: {now[1]:.4f}  LR: {lr:.3e}  '
                         f'Time: {el / (it + 1):.2f}s/it')
    if sums is None:  # the sampler guarantees at least one batch; kept for a clear message
        raise UserError(f'epoch {epoch} had no training batch; lower -b/--batch-size or add data.')
    mean = _all_reduce_mean(sums / n_it, world).tolist()
    out = dict(zip(keys, mean))
    out['epoch_time'] = round(time.time() - t0, 1)
    out['lr_last'] = lr
    return out


@exit_on_user_error
def _main(argv: Optional[List[str]]) -> int:
    from timm import utils
    utils.setup_default_logging()
    args = parse_args(argv)
    train(args)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point: user errors print ``error: ...`` (with the fix) and exit with code 2."""
    return _main(argv)
