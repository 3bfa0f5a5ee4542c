"""Typed run settings below the command line: small frozen dataclasses that the builders, the :class:`Trainer` and
validation read, the way :class:`lt_timm.registry.LossOptions` carries the loss flags.

:mod:`lt_timm.cli` builds them once, from the parsed and resolved flags (field names are the flags' dest names);
no argparse ``Namespace`` travels below it. The one exception is :attr:`TrainConfig.record`: the parsed flags as timm
saves them in every checkpoint's ``args`` (and hands them to wandb); nothing below the CLI reads it
(``train_detection.py``'s :class:`DetectionConfig` keeps them as a mapping, :meth:`DetectionConfig.saved_args`).
"""
import argparse
from dataclasses import dataclass, field, fields
from typing import Any, List, Mapping, Optional, Tuple

import torch

from .registry import LossOptions

__all__ = ['Ranks', 'Precision', 'DataOptions', 'ModelOptions', 'LoaderOptions', 'MixupOptions', 'OptimOptions',
           'EmaOptions', 'RunOptions', 'LoopOptions', 'ResumePoint', 'TrainConfig', 'ViewOptions', 'ValidateConfig',
           'DetectionDataOptions', 'DetectorOptions', 'InstanceLossOptions', 'DetectionBatchOptions',
           'ReplicaAugmentOptions', 'DetectionSchedule', 'DetectionRunOptions', 'DetectionConfig', 'settings_from']


def settings_from(cls, source, **overrides):
    """A ``cls`` whose fields are read from ``source``'s attributes of the same name (``overrides`` win)."""
    values = {f.name: getattr(source, f.name) for f in fields(cls)
              if f.name not in overrides and hasattr(source, f.name)}
    return cls(**values, **overrides)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: one process, or a rank of a DDP group."""
    distributed: bool = False
    world_size: int = 1
    rank: int = 0

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Precision:
    """Device, AMP and dtypes (``model_dtype``: ``--model-dtype`` resolved to a torch dtype, or ``None``)."""
    device: str = 'cpu'
    amp: bool = False
    amp_dtype: str = 'float16'
    model_dtype: Optional[torch.dtype] = None
    channels_last: bool = False


@dataclass(frozen=True)
class DataOptions:
    """Where the images come from (:func:`lt_timm.builders.open_datasets` / :func:`~lt_timm.builders.open_dataset`).

    ``root`` is ``--data-dir`` (or the positional ``data``); ``extras`` holds timm's iterable/HF dataset options
    (dest -> value) that :func:`lt_timm.builders.dataset_options` checks and maps to ``create_dataset`` kwargs."""
    root: Optional[str] = None
    dataset: str = ''
    train_split: str = 'train'
    val_split: str = 'validation'
    class_map: str = ''
    input_img_mode: str = 'RGB'
    batch_size: int = 128
    seed: int = 42
    dataset_download: bool = False
    check_images: str = 'header'
    workers: int = 4
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelOptions:
    """``timm.create_model`` and the setup after it (timm's model flags; ``in_chans`` resolved)."""
    model: str = 'resnet50'
    pretrained: bool = False
    pretrained_path: Optional[str] = None
    initial_checkpoint: str = ''
    num_classes: Optional[int] = None
    in_chans: int = 3
    gp: Optional[str] = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    drop: float = 0.
    drop_path: Optional[float] = None
    drop_block: Optional[float] = None
    bn_momentum: Optional[float] = None
    bn_eps: Optional[float] = None
    head_init_scale: Optional[float] = None
    head_init_bias: Optional[float] = None
    grad_checkpointing: bool = False
    split_bn: bool = False
    sync_bn: bool = False
    aug_splits: int = 0
    resplit: bool = False
    channels_last: bool = False


@dataclass(frozen=True)
class LoaderOptions:
    """The training and evaluation loaders (timm's loader flags, lt-timm's grouped repeats)."""
    batch_size: int = 128
    validation_batch_size: Optional[int] = None
    workers: int = 4
    pin_mem: bool = False
    prefetcher: bool = True
    no_aug: bool = False
    reprob: float = 0.
    remode: str = 'pixel'
    recount: int = 1
    resplit: bool = False
    train_crop_mode: Optional[str] = None
    train_crop_pad: int = 4
    cutout: int = 0
    scale: Tuple[float, ...] = (0.08, 1.0)
    ratio: Tuple[float, ...] = (3. / 4., 4. / 3.)
    hflip: float = 0.5
    vflip: float = 0.
    color_jitter: float = 0.4
    color_jitter_prob: Optional[float] = None
    grayscale_prob: Optional[float] = None
    gaussian_blur_prob: Optional[float] = None
    aa: Optional[str] = None
    worker_seeding: str = 'all'
    use_multi_epochs_loader: bool = False
    aug_repeats: int = 0
    aug_splits: int = 0
    lt_epoch: str = 'v1'
    seed: int = 42
    no_decode_once: bool = False
    train_interpolation: str = 'random'


@dataclass(frozen=True)
class MixupOptions:
    """timm's Mixup/CutMix flags."""
    mixup: float = 0.
    cutmix: float = 0.
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    smoothing: float = 0.1

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0. or self.cutmix_minmax is not None


@dataclass(frozen=True)
class OptimOptions:
    """Optimizer and schedule: timm's ``optimizer_kwargs`` / ``scheduler_kwargs`` of the resolved flags."""
    opt: str = 'sgd'
    lr: Optional[float] = None
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    opt_kwargs: Mapping[str, Any] = field(default_factory=dict)
    scheduler_kwargs: Mapping[str, Any] = field(default_factory=dict)
    sched_on_updates: bool = False
    grad_accum_steps: int = 1
    start_epoch: Optional[int] = None


@dataclass(frozen=True)
class EmaOptions:
    """timm's model EMA flags, and ``--torchcompile`` / DDP's (what is set up around the task)."""
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    model_ema_force_cpu: bool = False
    torchcompile: Optional[str] = None
    torchcompile_mode: Optional[str] = None
    no_ddp_bb: bool = False


@dataclass(frozen=True)
class RunOptions:
    """The run folder, resume and recording (checkpoints, summary, wandb)."""
    model: str = 'resnet50'
    output: str = ''
    experiment: str = ''
    resume: str = ''
    no_resume_opt: bool = False
    checkpoint_hist: int = 10
    eval_metric: str = 'top1'
    log_wandb: bool = False
    wandb_project: Optional[str] = None
    wandb_tags: List[str] = field(default_factory=list)
    wandb_resume_id: str = ''


@dataclass(frozen=True)
class LoopOptions:
    """What :class:`lt_timm.trainer.Trainer` reads."""
    ranks: Ranks = field(default_factory=Ranks)
    seed: int = 42
    grad_accum_steps: int = 1
    log_interval: int = 50
    val_interval: int = 1
    recovery_interval: int = 0
    check_loss_every_step: bool = False
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    prefetcher: bool = False
    channels_last: bool = False
    synchronize_step: bool = False
    save_images: bool = False
    mixup_off_epoch: int = 0
    eval_metric: str = 'top1'
    dist_bn: str = 'reduce'
    model_ema_force_cpu: bool = False
    no_plot: bool = False
    plot_title: str = ''


@dataclass(frozen=True)
class ResumePoint:
    """What the command line read from the ``--resume`` checkpoint (its flags already compared with this run's):
    the run folder it continues in ('' = a new folder: the file is not in a run folder), the run's data (class map,
    image counts) for the data check, its lr, and the :data:`~lt_timm.cli.checks.RESUME_RECOVERY` options this
    resume changes (logged and recorded)."""
    path: str
    folder: str = ''
    class_to_idx: Mapping[str, int] = field(default_factory=dict)
    train_images: Optional[int] = None
    eval_images: Optional[int] = None
    num_classes: Optional[int] = None  # train_detection.py (train.py compares the class map)
    lr: Optional[float] = None
    changes: Tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train.py`` runs with, resolved by :func:`lt_timm.cli.train.resolve`."""
    ranks: Ranks
    precision: Precision
    data: DataOptions
    model: ModelOptions
    data_config_args: Mapping[str, Any]  # what timm's resolve_data_config reads (input size, mean, std, ...)
    loader: LoaderOptions
    mixup: MixupOptions
    loss: str
    loss_options: LossOptions
    optim: OptimOptions
    ema: EmaOptions
    run: RunOptions
    loop: LoopOptions
    seed: int
    fast_norm: bool
    record: argparse.Namespace  # saved as each checkpoint's 'args' (timm's format); not read below the CLI
    record_text: str  # args.yaml
    resumed: Optional[ResumePoint] = None  # --resume


@dataclass(frozen=True)
class ViewOptions:
    """``validate.py``'s augmented views: ``--consistency``, ``--tta``, ``--plot`` and the view transform."""
    consistency: int = 0
    consistency_images: int = 1000
    tta: int = 0
    plot: str = ''
    plot_images: int = 6
    aa: Optional[str] = None
    scale: Tuple[float, ...] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    train_crop_mode: Optional[str] = None
    train_crop_pad: int = 4

    @property
    def num_views(self) -> int:
        return max(self.consistency, self.tta, 2 if self.plot else 0)


@dataclass(frozen=True)
class ValidateConfig:
    """Everything ``validate.py`` runs with, resolved by :func:`lt_timm.cli.validate.resolve`."""
    precision: Precision
    data: DataOptions
    model: ModelOptions
    data_config_args: Mapping[str, Any]
    views: ViewOptions
    split: str = 'validation'
    checkpoint: str = ''
    use_ema: bool = False
    reparam: bool = False
    use_train_size: bool = False
    test_pool: bool = False
    crop_border_pixels: Optional[int] = None
    prefetcher: bool = True
    pin_mem: bool = False
    log_freq: int = 10
    fast_norm: bool = False
    torchcompile: Optional[str] = None
    torchcompile_mode: Optional[str] = None
    results_file: str = ''
    results_format: Optional[str] = None
    seed: int = 42


# ------------------------------------------------------------------------------------------ train_detection.py
@dataclass(frozen=True)
class DetectionDataOptions:
    """The detection images (:func:`lt_timm.detection.train.build_datasets`): ``masks`` says whether COCO instance
    masks are read (``--model maskrcnn``), ``label_space`` what a COCO dataset's labels are (``'contiguous'``, or
    ``'coco_ids'`` when torchvision's COCO detector keeps its predictors)."""
    data_dir: str = ''
    dataset: str = 'pennfudan'
    train_split: str = 'train2017'
    val_split: str = 'val2017'
    voc_instances: str = 'components'
    voc_connectivity: int = 8
    voc_min_area: int = 1
    val_size: int = 50
    train_size: Optional[int] = None
    max_val: Optional[int] = None
    split_seed: int = 0
    img_size: Optional[int] = None
    masks: bool = True
    label_space: str = 'contiguous'


@dataclass(frozen=True)
class DetectorOptions:
    """The detector (:func:`lt_timm.detection.finetune.build_model`): its architecture, torchvision's COCO detector
    (``coco_detector``: ``--detector-weights coco`` or ``--detector-checkpoint``), the frozen submodules, and the
    settings that do not change its state dict (image size, proposal / RoI counts, detection cap)."""
    model: str = 'maskrcnn'
    backbone: str = 'resnet50'
    pretrained: bool = False
    coco_detector: bool = False
    detector_checkpoint: str = ''
    reset_predictors: bool = False
    freeze: Tuple[str, ...] = ()
    fpn_channels: int = 256
    mask_head_channels: int = 256
    box_head_dim: int = 1024
    detections_per_img: int = 100
    rpn_pre_nms: int = 2000
    rpn_post_nms: int = 2000
    box_batch_per_image: int = 512
    anchor_sizes: Optional[Tuple[Any, ...]] = None  # one entry per FPN level: a size or a tuple of sizes
    fpn_strides: Optional[Tuple[int, ...]] = None
    fpn_extra: str = 'pool'
    img_size: Optional[int] = None


@dataclass(frozen=True)
class InstanceLossOptions:
    """l_multi or T(l_multi) (:class:`lt_timm.detection.consistency.InstanceLossTransform`)."""
    loss: str = 'losstransform'
    aug_repeats: int = 2
    lt_rho: float = 1.0
    lt_box_weight: float = 1.0
    lt_mask_weight: float = 1.0
    lt_min_visible: float = 0.5
    lt_detach: bool = False
    lt_match: str = 'gt'
    lt_match_iou: float = 0.5
    lt_area_ratio: float = 0.8

    @property
    def rho(self) -> float:
        """The consistency's weight: ``--lt-rho`` with ``--loss losstransform``; 0 with ``--loss multi`` (the term
        is still measured and logged)."""
        return self.lt_rho if self.loss == 'losstransform' else 0.0


@dataclass(frozen=True)
class DetectionBatchOptions:
    """The grouped training batches (:func:`lt_timm.detection.train.build_sampler`: ``-b`` rows of blocks of m
    replicas, ``--lt-epoch``) and the loaders' workers."""
    batch_size: int = 4
    aug_repeats: int = 2
    lt_epoch: str = 'v1'
    seed: int = 42
    workers: int = 0


@dataclass(frozen=True)
class ReplicaAugmentOptions:
    """Each replica's augmentation (:class:`lt_timm.detection.transforms.ReplicaAugment`, copy-paste)."""
    hflip: float = 0.5
    scale: Tuple[float, ...] = (0.8, 1.2)
    translate: float = 0.1
    min_visible: float = 0.3
    crop_scale: Optional[Tuple[float, ...]] = None
    copy_paste: float = 0.0
    copy_paste_scale: Tuple[float, ...] = (0.5, 1.5)


@dataclass(frozen=True)
class DetectionSchedule:
    """SGD, its step schedule with linear warmup (:func:`lt_timm.detection.train.lr_at`) and gradient clipping."""
    epochs: int = 18
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_steps: Tuple[int, ...] = (12, 16)
    lr_gamma: float = 0.1
    warmup_iters: int = 100
    clip_grad: float = 10.0


@dataclass(frozen=True)
class DetectionRunOptions:
    """The run folder (``--output``, ``--experiment``, ``--resume``), logging and evaluation."""
    output: str = 'output/detection'
    experiment: str = ''
    resume: str = ''
    log_interval: int = 10
    eval_interval: int = 1
    no_plot: bool = False
    eval_only: bool = False


@dataclass(frozen=True)
class DetectionConfig:
    """Everything ``train_detection.py`` runs with, resolved by :func:`lt_timm.cli.detection.resolve`: its ranks and
    device, the typed options, and with ``--resume`` the run it continues (its flags already compared).

    ``record`` holds the flags as parsed and resolved (dest -> value, in the parser's order): ``args.yaml`` is its
    YAML, and each checkpoint's ``args`` is :meth:`saved_args`."""
    ranks: Ranks
    device: str
    seed: int
    data: DetectionDataOptions
    detector: DetectorOptions
    loss: InstanceLossOptions
    batch: DetectionBatchOptions
    augment: ReplicaAugmentOptions
    schedule: DetectionSchedule
    run: DetectionRunOptions
    record: Mapping[str, Any]
    resumed: Optional[ResumePoint] = None

    def saved_args(self, **extra: Any) -> argparse.Namespace:
        """The flags as a checkpoint's ``args``: an argparse Namespace (timm's checkpoint format, which older runs
        have and ``--resume`` reads back), with ``extra`` (the data's size, the number of processes) set after
        them."""
        saved = argparse.Namespace(**self.record)
        for key, value in extra.items():
            setattr(saved, key, value)
        return saved
