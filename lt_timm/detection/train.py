"""Training loop behind ``train_detection.py``: torchvision Mask/Faster R-CNN or RetinaNet with l_multi or T(l_multi).

Same conventions as the classification ``train.py`` (:mod:`lt_timm.training`): a ``-c/--config`` YAML whose keys
are argument dest names (the command line still wins; :mod:`lt_timm.cli.detection`, the reader shared with
``train.py``), dashed flags, ``logging`` (timm's default setup), user errors as :class:`lt_timm.errors.UserError`
(``error: ...`` with the fix, exit code 2, nothing written or lost), run folders claimed with
:func:`lt_timm.run_dir.claim_run_dir` (never overwritten; ``--resume`` continues in the checkpoint's folder, as the
same experiment: its flags and data compared by :mod:`lt_timm.cli.detection`), ``summary.csv`` rows as
:func:`lt_timm.run_dir.summary_row` (timm's columns, one row per epoch), ``curves.png`` via
:func:`lt_timm.plots.plot_training_curves`, ``last.pth.tar`` written atomically (tmp file + ``os.replace``) and only
from finite weights, batches from :class:`lt_timm.sampler.RepeatedAugBatchSampler` (``--lt-epoch v1|full``, single
process or DDP under ``torchrun``). Every checkpoint holds the summary rows up to its epoch and the row is appended
after it, so ``--resume`` after a kill at any moment rewrites ``summary.csv`` to match the checkpoint; Ctrl-C,
SIGTERM and a lost DDP process stop the run with one line and the command that resumes it.

A run reads the typed :class:`~lt_timm.config.DetectionConfig` that :func:`lt_timm.cli.detection.resolve` builds
(never the flags' Namespace): :func:`setup` (datasets, sampler, detector, optimizer, resume, loaders: a
:class:`DetectionRun`) then :func:`fit` (the run folder, then per epoch: train, check the weights, evaluate,
checkpoint, summary row).

The paper's Table 6 protocol (fine-tune torchvision's COCO Faster R-CNN, RetinaNet and Mask R-CNN* with FPN and RPN
frozen): ``--detector-weights coco`` (or ``--detector-checkpoint FILE``, the same weights from disk) builds
torchvision's COCO detector for ``--model`` (:func:`lt_timm.detection.backbone.build_coco_detector`) and trains on
COCO category ids (``CocoDetectionDataset(label_space='coco_ids')``, chosen by the command line);
``--reset-predictors`` replaces its class predictors for another label set; ``--freeze NAME ...`` freezes submodules
(Mask R-CNN*: ``--freeze backbone.fpn rpn``). Recipes: ``configs/detection/table6_*.yaml``.
"""
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import yaml

from ..checkpoints import write_checkpoint
from ..config import (DetectionBatchOptions, DetectionConfig, DetectionDataOptions, DetectionSchedule,
                      DetectorOptions, Ranks, ResumePoint)
from ..errors import Terminated, UserError, os_error_message
from ..run_dir import (append_summary, claim_run_dir, lost_a_process, read_summary_rows, remove_stale_tmp,
                       resume_hint, stopped_run, summary_row, write_summary)
from .finetune import build_model, check_coco_categories, freeze_submodules, hold_frozen_norms

__all__ = ['setup', 'fit', 'train', 'evaluate_only', 'DetectionRun', 'build_datasets', 'build_sampler',
           'detector_options', 'runtime_options', 'lr_at', 'save_checkpoint', 'load_checkpoint']

_logger = logging.getLogger('train_detection')


# ------------------------------------------------------------------------------------------------ data
def build_datasets(data: DetectionDataOptions):
    """Training and validation datasets and their indices (``data.label_space``: the COCO dataset's labels, see
    :func:`lt_timm.detection.finetune.dataset_label_space`)."""
    from .data import CocoDetectionDataset, PennFudanDataset, split_indices
    if not os.path.isdir(data.data_dir):
        raise UserError(f'dataset directory not found: {data.data_dir}; pass the dataset root with --data-dir '
                        f'(PennFudanPed: the folder holding PNGImages/ and PedMasks/; COCO: the folder holding '
                        f'{data.train_split}/, {data.val_split}/ and annotations/).')
    if data.dataset == 'pennfudan':
        base = PennFudanDataset(data.data_dir, img_size=data.img_size)
        tr, va = split_indices(len(base), data.val_size, data.split_seed)
        train_base, val_base = base, base
    elif data.dataset == 'voc':
        train_base, val_base = _voc(data, data.train_split), _voc(data, data.val_split)
        tr, va = list(range(len(train_base))), list(range(len(val_base)))
    else:
        def coco(split):
            return CocoDetectionDataset(os.path.join(data.data_dir, split),
                                        os.path.join(data.data_dir, 'annotations', f'instances_{split}.json'),
                                        img_size=data.img_size, masks=data.masks,
                                        remove_empty=False, label_space=data.label_space)
        train_base, val_base = coco(data.train_split), coco(data.val_split)
        tr, va = list(range(len(train_base))), list(range(len(val_base)))
    if data.train_size:
        tr = tr[:data.train_size]
    if data.max_val:
        va = va[:data.max_val]
    if not va:
        raise UserError(f'no validation images (--val-size {data.val_size}, --max-val {data.max_val}); every run '
                        f'is evaluated: set --val-size (PennFudanPed) or --max-val to at least 1.')
    return train_base, tr, val_base, va


def _voc(data: DetectionDataOptions, image_set: str):
    """PASCAL VOC 2012 (``--data-dir`` = the VOC2012 folder), instances as ``--voc-instances`` says."""
    from .voc import VOCInstanceDataset
    return VOCInstanceDataset(data.data_dir, image_set, instances=data.voc_instances,
                              connectivity=data.voc_connectivity, min_area=data.voc_min_area, img_size=data.img_size)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, base, idx):
        self.base, self.idx = base, list(idx)
        self.num_classes = getattr(base, 'num_classes', None)
        self.categories = getattr(base, 'categories', None)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.base[self.idx[i]]


def runtime_options(det: DetectorOptions) -> Dict:
    """The flags' torchvision detector settings that do not change the architecture (state dict): image size of
    the internal transform (``--img-size``, else torchvision's 800 / 1333), proposal / RoI counts, detection cap
    (R-CNN-only options are not passed to RetinaNet)."""
    sizes = dict(min_size=det.img_size, max_size=det.img_size) if det.img_size else dict(min_size=800, max_size=1333)
    if det.model == 'retinanet':
        return dict(sizes, detections_per_img=det.detections_per_img)
    return dict(sizes, rpn_pre_nms_top_n_train=det.rpn_pre_nms, rpn_post_nms_top_n_train=det.rpn_post_nms,
                box_batch_size_per_image=det.box_batch_per_image, box_detections_per_img=det.detections_per_img)


def detector_options(det: DetectorOptions) -> Dict:
    """Keyword arguments of :func:`lt_timm.detection.backbone.build_detector` from the flags (R-CNN-only options
    are not passed to RetinaNet)."""
    arch = dict(pretrained=det.pretrained, anchor_sizes=det.anchor_sizes, fpn_channels=det.fpn_channels)
    if det.model != 'retinanet':
        arch.update(mask_head_channels=det.mask_head_channels, box_head_dim=det.box_head_dim,
                    fpn_strides=det.fpn_strides, fpn_extra=det.fpn_extra)
    return dict(runtime_options(det), **arch)


def build_sampler(batch: DetectionBatchOptions, num_images: int, world_size: int = 1, rank: int = 0):
    """The grouped repeated-augmentation batch sampler of the classification loader (``-b`` rows per batch;
    ``--lt-epoch original``: ``-b`` images x m rows)."""
    from ..layout import rows_per_step
    from ..sampler import RepeatedAugBatchSampler
    rows = rows_per_step(batch.batch_size, batch.aug_repeats, batch.lt_epoch)
    try:
        return RepeatedAugBatchSampler(num_images, rows, batch.aug_repeats, num_replicas=world_size,
                                       rank=rank, shuffle=True, epoch_mode=batch.lt_epoch, seed=batch.seed)
    except ValueError as e:
        hint = '' if batch.lt_epoch == 'full' else ' (or --lt-epoch full: each image m times per epoch)'
        raise UserError(f'{e}{hint}') from e


def lr_at(schedule: DetectionSchedule, epoch: int, it: int, iters_per_epoch: int) -> float:
    """Step schedule with linear warmup: a pure function of (epoch, step), so ``--resume`` continues it exactly."""
    lr = schedule.lr * schedule.lr_gamma ** sum(1 for s in schedule.lr_steps if epoch >= s)
    step = epoch * iters_per_epoch + it
    if schedule.warmup_iters and step < schedule.warmup_iters:
        a = step / schedule.warmup_iters
        lr *= 0.001 * (1 - a) + a
    return lr


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str, model: torch.nn.Module, optimizer, epoch: int, saved_args: Any, metric=None,
                    extra: Optional[Dict] = None) -> None:
    """timm's checkpoint layout (``state_dict``, ``optimizer``, ``epoch``, ``args``: ``saved_args`` as given, see
    :meth:`lt_timm.config.DetectionConfig.saved_args`; ``version`` 2; ``extra`` entries added), written to a tmp
    file and moved over ``path`` with ``os.replace``: ``path`` is always a complete checkpoint. A write that fails
    (full disk, file-size limit) removes the tmp file and is one UserError."""
    state = {'epoch': epoch, 'arch': type(model).__name__, 'state_dict': model.state_dict(),
             'optimizer': optimizer.state_dict(), 'args': saved_args, 'version': 2, 'metric': metric, **(extra or {})}
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        write_checkpoint(state, tmp)
    except OSError as e:
        doing = f'cannot write the checkpoint of epoch {epoch} to {tmp}'
        raise UserError(f'{os_error_message(e, doing, in_run=True) or f"{doing} ({e})"}, '
                        f'{resume_hint(os.path.dirname(path), epoch)}; nothing of epoch {epoch} was saved.') from None
    os.replace(tmp, path)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer, detector: DetectorOptions) -> int:
    """Restore model and optimizer from ``path``; returns the epoch to continue at. Problems are UserErrors (naming
    ``detector``'s ``--model`` and ``--backbone``)."""
    from ..modeling import checkpoint_problem, read_checkpoint
    if not os.path.isfile(path):
        raise UserError(f'--resume checkpoint {path} not found; pass the last.pth.tar of the run to continue.')
    try:
        ck = read_checkpoint(path)
        model.load_state_dict(ck['state_dict'])
        optimizer.load_state_dict(ck['optimizer'])
        return int(ck['epoch']) + 1
    except UserError:
        raise
    except Exception as e:
        raise UserError(checkpoint_problem(path, e, f'--model {detector.model} --backbone {detector.backbone} of this '
                                                    f'dataset')) from e


def _diverged(what: str, epoch: int, out_dir: Optional[str]) -> UserError:
    return UserError(f'{what} at epoch {epoch}: training diverged and nothing of this epoch was saved; lower --lr '
                     f'or --clip-grad, {resume_hint(out_dir, epoch)}.')


def _all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
        t = t / world
    return t


def _eval_keys(with_masks: bool) -> List[str]:
    return [f'{kind}_{k}' for kind in (('box', 'mask') if with_masks else ('box',)) for k in ('AP', 'AP50', 'AP75')]


# ----------------------------------------------------------------------------------------------- setup
@dataclass
class DetectionRun:
    """What :func:`setup` built and :func:`fit` trains: the detector inside its
    :class:`~lt_timm.detection.consistency.InstanceLossTransform` (``net``; ``train_net`` is it or its DDP wrapper),
    the optimizer over the trainable ``params``, the grouped training loader and, on the primary rank, the
    validation loader and its COCO ground truth."""
    ranks: Ranks
    device: torch.device
    net: torch.nn.Module
    train_net: torch.nn.Module
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    loader: Any
    train_ds: Any
    start_epoch: int
    num_train: int
    num_val: int
    num_classes: int
    rho: float
    frozen: List[str] = field(default_factory=list)
    labels: str = ''  # COCO detector: what its labels are (logged)
    val_loader: Any = None
    coco_gt: Any = None
    resumed: Optional[ResumePoint] = None  # --resume (the flags compared by the command line)
    summary_rows: List[Dict] = field(default_factory=list)  # the rows so far, kept in every checkpoint
    epoch: Optional[int] = None  # the epoch in progress (named when the run is stopped)


def setup(config: DetectionConfig) -> DetectionRun:
    """Datasets and the grouped sampler, the detector and its optimizer (restored with ``--resume``), the loaders."""
    device = torch.device(config.device)
    ranks = config.ranks
    train_base, tr_idx, val_base, va_idx = build_datasets(config.data)
    sampler = build_sampler(config.batch, len(tr_idx), ranks.world_size, ranks.rank)
    num_classes = _num_classes(config, train_base, val_base)
    _check_resumed_data(config.resumed, len(tr_idx), len(va_idx), num_classes)
    torch.manual_seed(config.seed)
    run = _build_net(config, device, num_classes)
    run.num_train, run.num_val, run.resumed = len(tr_idx), len(va_idx), config.resumed
    run.labels = _coco_labels(train_base, num_classes) if config.detector.coco_detector else ''
    _build_loaders(config, run, sampler, train_base, tr_idx, val_base, va_idx)
    return run


def _check_resumed_data(resumed: Optional[ResumePoint], num_train: int, num_val: int, num_classes: int) -> None:
    """``--resume``: the data must be the run's (its image counts and classes); one error names each difference."""
    if resumed is None:
        return
    diffs = [f'{now} {what} (the run: {then})' for what, now, then in (
        ('training images', num_train, resumed.train_images), ('validation images', num_val, resumed.eval_images),
        ('classes', num_classes, resumed.num_classes)) if then is not None and now != then]
    if diffs:
        raise UserError(f'--resume {resumed.path}: this data is not the run\'s: {"; ".join(diffs)}. Resume on the '
                        f'run\'s data, or start a new run (a new --experiment) on this data.')


def _num_classes(config: DetectionConfig, train_base, val_base) -> int:
    """The dataset's classes; the COCO detector's 91 outputs (COCO category ids) when it keeps its predictors."""
    if config.data.label_space != 'coco_ids':
        return train_base.num_classes
    from .backbone import coco_category_names
    names = coco_category_names(config.detector.model, config.detector.backbone)
    for ds in (train_base, val_base):
        check_coco_categories(ds.categories, names, ds.ann_file)
    return len(names)


def _coco_labels(train_base, num_classes: int) -> str:
    return ('COCO category ids' if getattr(train_base, 'label_space', '') == 'coco_ids'
            else f'1..{num_classes - 1} (fresh class predictors)')


def _build_net(config: DetectionConfig, device: torch.device, num_classes: int) -> DetectionRun:
    """The detector (frozen parts), T(l_multi) around it, SGD over what trains, ``--resume``, DDP."""
    from .consistency import InstanceLossTransform
    det, loss, sched = config.detector, config.loss, config.schedule
    model = build_model(det.model, det.backbone, num_classes, det.coco_detector, det.detector_checkpoint,
                        det.reset_predictors, detector_options(det), runtime_options(det))
    frozen = freeze_submodules(model, det.freeze)
    rho = loss.rho
    net = InstanceLossTransform(model, loss.aug_repeats, rho=rho, box_weight=loss.lt_box_weight,
                                mask_weight=loss.lt_mask_weight, min_visible=loss.lt_min_visible,
                                detach_consensus=loss.lt_detach, match=loss.lt_match,
                                match_iou=loss.lt_match_iou, area_ratio=loss.lt_area_ratio).to(device)
    params = [q for q in net.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=sched.lr, momentum=sched.momentum, weight_decay=sched.weight_decay)
    resume = config.run.resume
    start_epoch = load_checkpoint(resume, net.model, opt, det) if resume else 0
    train_net = net
    if config.ranks.world_size > 1:
        train_net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == 'cuda' else None)
    return DetectionRun(ranks=config.ranks, device=device, net=net, train_net=train_net, params=params,
                        optimizer=opt, loader=None, train_ds=None, start_epoch=start_epoch, num_train=0, num_val=0,
                        num_classes=num_classes, rho=rho, frozen=frozen)


def _build_loaders(config: DetectionConfig, run: DetectionRun, sampler, train_base, tr_idx, val_base,
                   va_idx) -> None:
    """The grouped training loader (each item: an image decoded once, augmented per replica; randomness = f(seed,
    epoch, image)); on the primary rank the validation loader and its COCO ground truth."""
    from .copy_paste import CopyPaste
    from .data import BlockBatchSampler, ReplicaDataset, eval_collate, replica_collate
    from .evaluate import coco_from_dataset
    from .transforms import ReplicaAugment
    aug, batch = config.augment, config.batch
    augment = ReplicaAugment(aug.hflip, aug.scale, aug.translate, aug.min_visible, crop_scale=aug.crop_scale)
    paste = CopyPaste(aug.copy_paste, aug.copy_paste_scale, aug.min_visible) if aug.copy_paste else None
    run.train_ds = ReplicaDataset(train_base, batch.aug_repeats, augment, indices=tr_idx, seed=batch.seed,
                                  copy_paste=paste)
    run.loader = torch.utils.data.DataLoader(run.train_ds, batch_sampler=BlockBatchSampler(sampler),
                                             num_workers=batch.workers, collate_fn=replica_collate)
    if run.ranks.is_primary:
        val_ds = _Subset(val_base, va_idx)
        run.val_loader = torch.utils.data.DataLoader(val_ds, batch_size=2, shuffle=False, num_workers=batch.workers,
                                                     collate_fn=eval_collate)
        run.coco_gt = coco_from_dataset(val_ds, with_masks=config.detector.model == 'maskrcnn')


# ----------------------------------------------------------------------------------------------- fit
def fit(config: DetectionConfig, run: DetectionRun) -> Dict:
    """Train ``run`` from its start epoch to ``--epochs`` (run folder on the primary rank); returns the output folder,
    the last epoch's metrics and the dataset sizes."""
    from ..plots import plot_training_curves
    output, exp = _run_name(config)
    out_dir, lock, metrics = None, None, {}
    try:
        if run.ranks.is_primary:
            lock = claim_run_dir(output, exp, config.run.resume, folder=run.resumed.folder if run.resumed else '')
            out_dir = os.path.dirname(lock.path)
            _open_run_dir(config, run, out_dir)
        summary_path = os.path.join(out_dir, 'summary.csv') if out_dir else None
        for epoch in range(run.start_epoch, config.schedule.epochs):
            run.epoch = epoch
            metrics = _fit_epoch(config, run, epoch, out_dir)
        if run.ranks.is_primary and not config.run.no_plot and os.path.exists(summary_path):
            png = plot_training_curves(summary_path, os.path.join(out_dir, 'curves.png'),
                                       title=f'{exp}: --loss {config.loss.loss}')
            _logger.info(f'Training curves: {png}')
    except (KeyboardInterrupt, Terminated, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not (run.ranks.world_size > 1 and lost_a_process(e)):
            raise
        last = os.path.join(out_dir, 'last.pth.tar') if out_dir else (run.resumed.path if run.resumed else '')
        raise stopped_run(e, run.epoch, last, run.ranks.rank, run.ranks.world_size > 1) from None
    finally:
        if lock is not None:
            lock.release()
    return {'output': out_dir, 'final': metrics, 'num_train': run.num_train, 'num_val': run.num_val}


def train(config: DetectionConfig) -> Dict:
    """:func:`setup` then :func:`fit`."""
    return fit(config, setup(config))


def evaluate_only(config: DetectionConfig) -> Dict:
    """``--eval-only``: :func:`setup`, then the detector as built / loaded (e.g. torchvision's COCO weights, the
    paper's Table 6 baseline row) evaluated on the validation set; ``eval.json`` (and ``args.yaml``) in the run
    folder. No training, no checkpoint."""
    import json
    run = setup(config)
    output, exp = _run_name(config)
    if not run.ranks.is_primary:
        return {}
    lock = claim_run_dir(output, exp + '-eval' if not config.run.experiment else exp, '')
    try:
        out_dir = os.path.dirname(lock.path)
        with open(os.path.join(out_dir, 'args.yaml'), 'w') as f:
            _dump_flags(config, f)
        metrics = _evaluate(config, run, config.schedule.epochs - 1)
        with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
            json.dump({'epoch': run.start_epoch, 'num_val': run.num_val, **metrics}, f, indent=2)
    finally:
        lock.release()
    return {'output': out_dir, 'final': metrics, 'num_train': run.num_train, 'num_val': run.num_val}


def _run_name(config: DetectionConfig):
    """(output root, run folder name): a resumed run continues in its checkpoint's own folder."""
    output, exp, resume = config.run.output, config.run.experiment, config.run.resume
    if resume and not exp:
        output, exp = os.path.split(os.path.dirname(os.path.abspath(resume)))
    det = config.detector
    return output, exp or f'{config.data.dataset}-{det.model}-{det.backbone}-{config.loss.loss}-s{config.seed}'


def _dump_flags(config: DetectionConfig, stream) -> None:
    """The flags as ``args.yaml`` holds them (in the parser's order)."""
    yaml.safe_dump(dict(config.record), stream, sort_keys=False)


def _resumed_rows(config: DetectionConfig, run: DetectionRun, out_dir: str) -> None:
    """A resumed run: what a kill left half-done removed, ``summary.csv`` rewritten from the rows its checkpoint
    holds (older checkpoints: the file's rows before the start), ``args.yaml`` kept (changed options recorded in
    ``args-resume-<epoch>.yaml``)."""
    from ..modeling import read_checkpoint_meta
    summary, resume = os.path.join(out_dir, 'summary.csv'), config.run.resume
    in_place = os.path.abspath(os.path.dirname(resume)) == os.path.abspath(out_dir)
    if in_place:
        remove_stale_tmp(out_dir)
    rows = (read_checkpoint_meta(resume) or {}).get('summary')
    if rows is None:
        rows = read_summary_rows(summary) if in_place else []
    run.summary_rows = [r for r in rows if int(float(r['epoch'])) < run.start_epoch]
    if run.summary_rows or os.path.exists(summary):
        write_summary(summary, run.summary_rows)
    changes = run.resumed.changes if run.resumed else ()
    if in_place and changes:
        record = os.path.join(out_dir, f'args-resume-{run.start_epoch}.yaml')
        with open(record, 'w') as f:
            f.write(f'# resumed at epoch {run.start_epoch} with: {"; ".join(changes)}\n')
            _dump_flags(config, f)
        _logger.warning(f'Resumed with {"; ".join(changes)} from epoch {run.start_epoch} on; recorded in {record}.')
    if not in_place:
        _write_args(config, out_dir)


def _write_args(config: DetectionConfig, out_dir: str) -> None:
    tmp = os.path.join(out_dir, 'args.yaml.tmp')
    with open(tmp, 'w') as f:
        _dump_flags(config, f)
    os.replace(tmp, os.path.join(out_dir, 'args.yaml'))


def _open_run_dir(config: DetectionConfig, run: DetectionRun, out_dir: str) -> None:
    """A resumed run's folder completed (:func:`_resumed_rows`), else ``args.yaml`` written; the run described in
    the log."""
    from ..layout import rows_per_step
    det, batch, resume = config.detector, config.batch, config.run.resume
    if resume:
        _resumed_rows(config, run, out_dir)
    else:
        _write_args(config, out_dir)
    if run.labels:
        source = det.detector_checkpoint or 'torchvision COCO_V1 (torch hub cache)'
        _logger.info(f'torchvision\'s COCO detector for --model {det.model}, weights from {source}; '
                     f'labels: {run.labels}.')
    if det.freeze:
        _logger.info(f'Frozen: {" ".join(det.freeze)} ({len(run.frozen)} parameter tensors); '
                     f'{sum(q.numel() for q in run.params) / 1e6:.2f}M parameters trained.')
    world = run.ranks.world_size
    _logger.info(
        f'{det.model} on {det.backbone} ({sum(p.numel() for p in run.net.model.parameters()) / 1e6:.2f}M params), '
        f'{run.num_train} train / {run.num_val} val images, loss {config.loss.loss} (rho {run.rho}, --lt-match '
        f'{config.loss.lt_match}). Sampler: grouped '
        f'repeats m={batch.aug_repeats}, mode {batch.lt_epoch}, {len(run.loader)} batches/epoch of '
        f'{rows_per_step(batch.batch_size, batch.aug_repeats, batch.lt_epoch)} rows'
        + (f' per rank x {world} ranks' if world > 1 else '') + f'. Output: {out_dir}. '
        f'Epochs {run.start_epoch}..{config.schedule.epochs - 1}.')
    if resume:
        _logger.info(f'Resumed from {resume}, continuing at epoch {run.start_epoch}.')


def _fit_epoch(config: DetectionConfig, run: DetectionRun, epoch: int, out_dir: Optional[str]) -> Dict:
    """One epoch: train, check the weights, evaluate (every ``--eval-interval`` and the last), then on the primary
    rank the checkpoint and its summary row (checkpoint first: a resumed run drops rows past its start)."""
    from ..modeling import all_finite
    metrics = _train_epoch(config, epoch, run, out_dir)
    if not all_finite(run.net.model):
        raise _diverged('the weights are no longer finite (NaN/inf)', epoch, out_dir)
    eval_metrics = _evaluate(config, run, epoch)
    if run.ranks.is_primary:
        _commit_epoch(config, run, epoch, metrics, eval_metrics, out_dir)
        metrics.update({f'eval_{k}': v for k, v in eval_metrics.items()})
    if run.ranks.world_size > 1:
        import torch.distributed as dist
        dist.barrier()
    return metrics


def _commit_epoch(config: DetectionConfig, run: DetectionRun, epoch: int, metrics: Dict, eval_metrics: Dict,
                  out_dir: str) -> None:
    """The checkpoint (holding every summary row up to this epoch, and the data's size for ``--resume``), then the
    epoch's ``summary.csv`` row."""
    row = summary_row(epoch, metrics, eval_metrics, lr=metrics.pop('lr_last'))
    saved = config.saved_args(train_images=run.num_train, eval_images=run.num_val, num_classes=run.num_classes,
                              world_size=run.ranks.world_size)
    last = os.path.join(out_dir, 'last.pth.tar')
    save_checkpoint(last, run.net.model, run.optimizer, epoch, saved, metric=eval_metrics.get('box_AP'),
                    extra={'summary': run.summary_rows + [row]})
    run.summary_rows.append(row)
    try:
        append_summary(os.path.join(out_dir, 'summary.csv'), row)
    except OSError as e:
        raise UserError(f'{os_error_message(e, in_run=True) or e}, then --resume {last} (epoch {epoch} is saved '
                        f'there with its summary row, which resuming writes).') from None


def _evaluate(config: DetectionConfig, run: DetectionRun, epoch: int) -> Dict:
    """COCO box (and mask) AP on the primary rank every ``--eval-interval`` epochs and at the end; NaN otherwise."""
    from .evaluate import evaluate
    with_masks = config.detector.model == 'maskrcnn'
    evaluated = (epoch + 1) % config.run.eval_interval == 0 or epoch + 1 == config.schedule.epochs
    eval_metrics = {k: float('nan') for k in _eval_keys(with_masks)}
    if run.ranks.is_primary and evaluated:
        t1 = time.time()
        eval_metrics = evaluate(run.net, run.val_loader, run.coco_gt, run.device, with_masks=with_masks)
        eval_metrics['time'] = round(time.time() - t1, 1)
        _logger.info('Eval: ' + '  '.join(f'{k} {v:.2f}' for k, v in eval_metrics.items() if 'AP' in k))
    elif run.ranks.is_primary:
        eval_metrics['time'] = float('nan')
    return eval_metrics


def _train_epoch(config: DetectionConfig, epoch: int, run: DetectionRun, out_dir: Optional[str]) -> Dict:
    """One epoch; returns the epoch's mean losses (``loss``, ``loss_base``, torchvision's terms,
    ``loss_consistency`` = rho x consistency, ``consistency`` = the unweighted term measured with either loss)."""
    run.loader.batch_sampler.set_epoch(epoch)
    run.train_ds.set_epoch(epoch)
    torch.manual_seed(config.seed + 100_003 * (epoch + 1) + run.ranks.rank)  # RPN/RoI sampling: --resume replays it
    run.net.train()
    hold_frozen_norms(run.net.model, config.detector.freeze)
    n_it = len(run.loader)
    keys, sums = None, None
    lr = lr_at(config.schedule, epoch, 0, n_it)
    t0 = time.time()
    for it, batch in enumerate(run.loader):
        lr = lr_at(config.schedule, epoch, it, n_it)
        vals = _train_step(config, run, batch, lr, epoch, it, out_dir)
        if keys is None:
            keys = list(vals)
            sums = torch.zeros(len(keys), dtype=torch.float64, device=vals['loss'].device)
        sums += torch.stack([vals[k].detach().to(torch.float64) for k in keys])  # summed on the device
        if run.ranks.is_primary and ((it + 1) % config.run.log_interval == 0 or it + 1 == n_it):
            _log_step(epoch, it, n_it, vals, float(sums[0]) / (it + 1), lr, time.time() - t0)
    if sums is None:  # the sampler guarantees at least one batch; kept for a clear message
        raise UserError(f'epoch {epoch} had no training batch; lower -b/--batch-size or add data.')
    mean = _all_reduce_mean(sums / n_it, run.ranks.world_size).tolist()
    out = dict(zip(keys, mean))
    out['epoch_time'] = round(time.time() - t0, 1)
    out['lr_last'] = lr
    return out


def _train_step(config: DetectionConfig, run: DetectionRun, batch, lr: float, epoch: int, it: int,
                out_dir: Optional[str]) -> Dict:
    """One optimizer step at ``lr``; a non-finite loss stops the run before the step (one sync per step). Returns the
    step's loss, its parts and the unweighted consistency, as device tensors."""
    images, targets, rparams = batch
    for gr in run.optimizer.param_groups:
        gr['lr'] = lr
    images = [im.to(run.device) for im in images]
    targets = [{k: (v.to(run.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    losses = run.train_net(images, targets, rparams)
    loss = sum(losses.values())
    if not bool(torch.isfinite(loss)):  # one sync per step: a bad step is never applied
        parts = ', '.join(f'{k} {float(v.detach()):.4g}' for k, v in losses.items())
        raise _diverged(f'the loss is {float(loss.detach())} ({parts}) at step {it}', epoch, out_dir)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = config.schedule.clip_grad
    if clip:
        torch.nn.utils.clip_grad_norm_(run.params, clip)
    run.optimizer.step()
    p, weights = run.net.last_parts_tensors, config.loss
    cons = (p['cls'] + weights.lt_box_weight * p['box'] + weights.lt_mask_weight * p['mask']) if p \
        else loss.new_zeros(())
    return {'loss': loss, 'loss_base': loss - losses['loss_consistency'], **losses, 'consistency': cons}


def _log_step(epoch: int, it: int, n_it: int, vals: Dict, mean_loss: float, lr: float, elapsed: float) -> None:
    now = torch.stack([vals[k].detach().float() for k in ('loss', 'consistency')]).tolist()
    _logger.info(f'Train: {epoch} [{it + 1:>4d}/{n_it} ({100. * (it + 1) / n_it:>3.0f}%)]  '
                 f'Loss: {now[0]:.4f} ({mean_loss:.4f})  Consistency: {now[1]:.4f}  LR: {lr:.3e}  '
                 f'Time: {elapsed / (it + 1):.2f}s/it')
