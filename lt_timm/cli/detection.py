"""``train_detection.py``'s command line: its flags (a ``-c`` YAML recipe, read by the same reader as ``train.py``'s,
sets their defaults), the checks of the flags, and the resolve step before the run (matching mode and COCO detector
checks, ``--threads``, the DDP ranks under ``torchrun``, ``--resume`` against its run) that returns the typed
:class:`~lt_timm.config.DetectionConfig` the run reads.

:func:`parse_args` only parses (and normalises what a recipe may leave empty); :func:`resolve` acts on the process
and is the last place the flags' Namespace changes (``--device`` of a DDP rank); nothing below it reads the Namespace.
"""
import argparse
import logging
import os
from typing import List, Optional

import torch

from ..config import (DetectionBatchOptions, DetectionConfig, DetectionDataOptions, DetectionRunOptions,
                      DetectionSchedule, DetectorOptions, InstanceLossOptions, Ranks, ReplicaAugmentOptions,
                      ResumePoint, settings_from)
from ..errors import UserError, exit_on_user_error
from .checks import (DETECTION_RESUME_FREE, DETECTION_RESUME_RECOVERY, anchor_size_entries, check_augment_args,
                     check_detection_args, check_lr, check_match_args, check_resumed_flags, resumed_changes,
                     resumed_folder)
from .recipe import add_config_option, parse_with_recipe

__all__ = ['build_parser', 'parse_args', 'resolve', 'detection_config', 'main', 'LOSSES', 'MODELS', 'MATCH_MODES',
           'DATASETS', 'DET_EPOCH_MODES', 'DETECTOR_WEIGHTS']

_logger = logging.getLogger('train_detection')

LOSSES = ('multi', 'losstransform')
MODELS = ('maskrcnn', 'fasterrcnn', 'retinanet')
# lt_timm.detection.consistency.MATCH_MODES (not imported: keeps --help light)
MATCH_MODES = ('gt', 'predicted', 'resort', 'area-greedy')
DATASETS = ('pennfudan', 'coco', 'voc')
DET_EPOCH_MODES = ('v1', 'full', 'original')
VOC_INSTANCES = ('components', 'objects', 'annotations')  # lt_timm.detection.voc.INSTANCE_SOURCES
FPN_EXTRA = ('pool', 'none')  # R-CNN FPN extra level (lt_timm.detection.backbone.EXTRA_LEVELS; RetinaNet: P6/P7)
DETECTOR_WEIGHTS = ('none', 'coco')  # 'coco': torchvision's COCO_V1 detector (lt_timm.detection.backbone)


def build_parser():
    """(config_parser, parser) of ``train_detection.py``."""
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    add_config_option(config_parser, 'YAML config file specifying default arguments')
    p = argparse.ArgumentParser(
        description='LossTransform detection training (torchvision Mask/Faster R-CNN, RetinaNet)')
    add_config_option(p, 'YAML config (keys = arg dests)')
    g = p.add_argument_group('Dataset parameters')
    g.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional is *deprecated*, use --data-dir)')
    g.add_argument('--data-dir', metavar='DIR', help='path to dataset root')
    g.add_argument('--dataset', default='pennfudan', choices=DATASETS, help='dataset type')
    g.add_argument('--train-split', default='train2017',
                   help='COCO: image folder / annotation suffix for training; VOC: the ImageSets list (train)')
    g.add_argument('--val-split', default='val2017',
                   help='COCO: image folder / annotation suffix for validation; VOC: the ImageSets list (val)')
    g.add_argument('--voc-instances', default='components', choices=VOC_INSTANCES,
                   help='VOC: components = connected components of each class in SegmentationClass (the paper\'s '
                        'instance split); objects = SegmentationObject; annotations = boxes from Annotations/*.xml')
    g.add_argument('--voc-connectivity', type=int, default=8, choices=(4, 8), help='VOC components: 4 or 8')
    g.add_argument('--voc-min-area', type=int, default=1, help='VOC components: drop components under N pixels')
    g.add_argument('--val-size', type=int, default=50, help='PennFudanPed: images held out for validation')
    g.add_argument('--train-size', type=int, default=None, help='use only the first N training images')
    g.add_argument('--max-val', type=int, default=None, help='use only the first N validation images')
    g.add_argument('--split-seed', type=int, default=0, help='seed of the PennFudanPed train/val permutation')
    g.add_argument('--img-size', type=int, default=None, help='resize so the longer side is this (reduced resolution)')
    g = p.add_argument_group('Model parameters')
    g.add_argument('--model', default='maskrcnn', choices=MODELS,
                   help='retinanet: one-stage, needs a detection-based --lt-match (no RoI heads for GT instances)')
    g.add_argument('--backbone', default='resnet50', help='timm model name, or tv_<torchvision name>')
    g.add_argument('--pretrained', action='store_true', default=False, help='load pretrained backbone weights')
    g.add_argument('--detector-weights', default='none', choices=DETECTOR_WEIGHTS,
                   help='coco: torchvision\'s COCO detector for --model (fasterrcnn/maskrcnn/retinanet_resnet50_fpn, '
                        'COCO_V1 weights via torchvision\'s weights API, downloaded once into the torch hub cache; '
                        'needs --backbone tv_resnet50; Faster R-CNN also tv_mobilenet_v3_large: '
                        'fasterrcnn_mobilenet_v3_large_fpn); trains on COCO category ids (the paper\'s Table 6)')
    g.add_argument('--detector-checkpoint', default='', metavar='FILE',
                   help='the COCO detector\'s weights from FILE instead of the download: a torchvision-format state '
                        'dict (the COCO_V1 .pth file, or a dict holding it as model/state_dict); implies '
                        '--detector-weights coco')
    g.add_argument('--reset-predictors', action='store_true', default=False,
                   help='with the COCO detector: fresh class predictors for this dataset\'s classes (torchvision\'s '
                        'fine-tuning tutorial; box/mask predictor, RetinaNet cls_logits) instead of COCO category ids')
    g.add_argument('--freeze', nargs='*', default=[], metavar='NAME',
                   help='freeze these submodules of the detector (dotted names, e.g. backbone rpn = the paper\'s '
                        'Mask R-CNN*): no gradient, not in the optimizer, BatchNorm statistics kept')
    g.add_argument('--fpn-channels', type=int, default=256, help='FPN width (timm backbones)')
    g.add_argument('--mask-head-channels', type=int, default=256, help='mask head conv width (torchvision: 256)')
    g.add_argument('--box-head-dim', type=int, default=1024, help='box head MLP width (torchvision: 1024)')
    g.add_argument('--detections-per-img', type=int, default=100, help='max detections per image at eval')
    g.add_argument('--rpn-pre-nms', type=int, default=2000, help='RPN proposals kept before NMS (training)')
    g.add_argument('--rpn-post-nms', type=int, default=2000, help='RPN proposals kept after NMS (training)')
    g.add_argument('--box-batch-per-image', type=int, default=512, help='sampled RoIs per image for the box loss')
    g.add_argument('--anchor-sizes', type=_anchor_level, nargs='+', default=None, metavar='SIZES',
                   help='one entry per FPN level, finest first: a size or comma-separated sizes (the paper\'s '
                        'two-level FPN: 32,64,128,256,512 32,64,128,256,512); YAML: a list of ints or of lists')
    g.add_argument('--fpn-strides', type=int, nargs='+', default=None, metavar='S',
                   help='backbone strides that feed the FPN (default 4 8 16 32; the paper\'s two-level FPN: 16 32)')
    g.add_argument('--fpn-extra', default='pool', choices=FPN_EXTRA,
                   help='R-CNN FPN extra level: pool (max-pooled level) or none (the paper\'s two-level FPN)')
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
                        '(R-CNN only); predicted = the model\'s own detections, matched across the replicas of an '
                        'image by greedy IoU matching in the source frame; resort = section 3.2 from scratch: each '
                        'annotation takes its replica\'s nearest detection; area-greedy = section 3.2 otherwise: '
                        'replicas paired by their detections\' area ratio, then greedy matching')
    g.add_argument('--lt-match-iou', type=float, default=0.5,
                   help='predicted / area-greedy: IoU with a cluster\'s first box needed to join it; resort: IoU of '
                        'the nearest detection with its annotation needed to keep it')
    g.add_argument('--lt-area-ratio', type=float, default=0.8,
                   help='--lt-match area-greedy: area ratio two replicas need to be matched (the paper\'s '
                        '"predefined confidence threshold", value not given)')
    g.add_argument('--lt-epoch', default='v1', choices=DET_EPOCH_MODES,
                   help='v1: an epoch holds as many rows as the training set has images (N/m images, m replicas '
                        'each: the cost of a plain epoch); full: every image m times per epoch (m x the cost); '
                        'original: the paper\'s first LossTransform, -b images x m replicas per step')
    g = p.add_argument_group('Augmentation parameters')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--scale', type=float, nargs=2, default=[0.8, 1.2], metavar=('MIN', 'MAX'), help='scale range')
    g.add_argument('--translate', type=float, default=0.1, help='max translation as a fraction of the size')
    g.add_argument('--min-visible', type=float, default=0.3, help='drop training instances less visible than this')
    g.add_argument('--crop-scale', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'),
                   help='random crop (with --scale 1 1 --translate 0): each side of the window a fraction in '
                        '[MIN, MAX] of the image\'s, the replica is the crop')
    g.add_argument('--copy-paste', type=float, default=0.0, metavar='P',
                   help='simple copy-paste (Ghiasi et al. 2021): probability that a replica gets instances of '
                        'another training image pasted (0 = off; needs instance masks)')
    g.add_argument('--copy-paste-scale', type=float, nargs=2, default=[0.5, 1.5], metavar=('MIN', 'MAX'),
                   help='copy-paste: the donor\'s scale jitter (relative to the image\'s longer side)')
    g = p.add_argument_group('Optimizer / schedule')
    g.add_argument('-b', '--batch-size', type=int, default=4,
                   help='rows per batch (replicas, as in timm); holds batch_size // aug_repeats source images '
                        '(--lt-epoch original: images per batch, each m rows)')
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
    g.add_argument('--eval-only', action='store_true', default=False,
                   help='evaluate the detector as built/loaded (e.g. torchvision\'s COCO weights: the paper\'s Table 6 '
                        'baseline) on the validation set, write eval.json in the run folder, no training')
    return config_parser, p


def _anchor_level(text: str):
    """``--anchor-sizes`` entry: ``32`` (one size) or ``32,64,128`` (several on one level)."""
    sizes = tuple(int(v) for v in str(text).split(','))
    return sizes[0] if len(sizes) == 1 else sizes


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The flags: ``-c`` recipe, then the command line; ``--data-dir`` (or the positional ``data``), the batch and
    repeats checked (argparse's usage error, exit 2)."""
    config_parser, parser = build_parser()
    args, config = parse_with_recipe(config_parser, parser, argv)
    args.config = config
    args.data_dir = args.data_dir or args.data
    check_detection_args(args, parser.error)
    args.freeze = list(args.freeze or [])  # a YAML 'freeze:' left empty is None
    args.anchor_sizes = anchor_size_entries(args.anchor_sizes, parser.error)  # YAML: ints or lists
    return args


def resolve(args: argparse.Namespace) -> DetectionConfig:
    """The checks that need the flags together (one UserError each), ``--threads``, then the DDP ranks under
    ``torchrun`` (``--device cuda`` becomes this rank's ``cuda:LOCAL_RANK``) and ``--resume`` against its run;
    returns the typed config."""
    from ..detection.finetune import (COCO_FIXED_FLAGS, check_coco_detector_args, dataset_label_space,
                                      uses_coco_detector)
    check_match_args(args.model, args.lt_match, args.lt_match_iou, args.lt_area_ratio)
    check_augment_args(args)
    check_lr(args.lr)
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
    ranks = _init_distributed(args)
    if ranks.distributed:
        _logger.info(f'Training in distributed mode: process {ranks.rank}/{ranks.world_size}, device {args.device}.')
    return detection_config(args, ranks, coco_detector, label_space, _resolve_resume(args, ranks))


def _tuple(values) -> Optional[tuple]:
    return None if values is None else tuple(values)


def detection_config(args: argparse.Namespace, ranks: Ranks = Ranks(), coco_detector: bool = False,
                     label_space: str = 'contiguous', resumed: Optional[ResumePoint] = None) -> DetectionConfig:
    """The resolved flags as typed settings (field names are the flags' dest names; lists become tuples);
    ``record``: the flags themselves, for ``args.yaml`` and each checkpoint's ``args``."""
    return DetectionConfig(
        ranks=ranks, device=args.device, seed=args.seed,
        data=settings_from(DetectionDataOptions, args, masks=args.model == 'maskrcnn', label_space=label_space),
        detector=settings_from(DetectorOptions, args, coco_detector=coco_detector, freeze=tuple(args.freeze),
                               anchor_sizes=_tuple(args.anchor_sizes), fpn_strides=_tuple(args.fpn_strides)),
        loss=settings_from(InstanceLossOptions, args),
        batch=settings_from(DetectionBatchOptions, args),
        augment=settings_from(ReplicaAugmentOptions, args, scale=tuple(args.scale),
                              crop_scale=_tuple(args.crop_scale), copy_paste_scale=tuple(args.copy_paste_scale)),
        schedule=settings_from(DetectionSchedule, args, lr_steps=tuple(args.lr_steps or ())),
        run=settings_from(DetectionRunOptions, args),
        record=dict(vars(args)), resumed=resumed)


def _resolve_resume(args: argparse.Namespace, ranks: Ranks) -> Optional[ResumePoint]:
    """``--resume``: the checkpoint's run compared with this command (every option but
    :data:`~lt_timm.cli.checks.DETECTION_RESUME_FREE` and ``..._RECOVERY`` must be the run's), and the run folder it
    continues in (the checkpoint's; ``--experiment`` may only name it)."""
    from ..modeling import read_checkpoint_args
    if not args.resume:
        return None
    if not os.path.isfile(args.resume):
        raise UserError(f'--resume checkpoint {args.resume} not found; pass the last.pth.tar of the run to continue.')
    saved = read_checkpoint_args(args.resume)
    if saved is None:  # a bad file is named when it is loaded
        return ResumePoint(path=args.resume)
    current = argparse.Namespace(**vars(args), world_size=ranks.world_size)  # the number of processes compared too
    flags = {a.dest: '/'.join(a.option_strings) or a.dest for a in build_parser()[1]._actions if a.dest != 'help'}
    new_run = 'start a new run (without --resume)'
    check_resumed_flags(current, saved, flags, DETECTION_RESUME_FREE, DETECTION_RESUME_RECOVERY, new_run)
    return ResumePoint(path=args.resume, folder=resumed_folder(args.resume, '', args.experiment, args.output, new_run),
                       train_images=getattr(saved, 'train_images', None),
                       eval_images=getattr(saved, 'eval_images', None),
                       num_classes=getattr(saved, 'num_classes', None), lr=getattr(saved, 'lr', None),
                       changes=resumed_changes(args, saved, flags, DETECTION_RESUME_RECOVERY))


def _init_distributed(args: argparse.Namespace) -> Ranks:
    """torchrun (``WORLD_SIZE`` > 1): one process per device, gloo on CPU / nccl on CUDA."""
    import torch.distributed as dist
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group('nccl' if str(args.device).startswith('cuda') else 'gloo')
    rank = dist.get_rank()
    if str(args.device).startswith('cuda'):
        local = int(os.environ.get('LOCAL_RANK', '0'))
        args.device = f'cuda:{local}'
        torch.cuda.set_device(local)
    return Ranks(distributed=True, world_size=dist.get_world_size(), rank=rank)


@exit_on_user_error
def _main(argv: Optional[List[str]]) -> int:
    from timm import utils
    from ..detection.train import evaluate_only, train
    from ..training import close_process_group
    utils.setup_default_logging()
    config = resolve(parse_args(argv))
    (evaluate_only if config.run.eval_only else train)(config)
    close_process_group()  # DDP: the process group torn down before exit
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``train_detection.py``: user errors print ``error: ...`` (with the fix) and exit with code 2."""
    return _main(argv)
