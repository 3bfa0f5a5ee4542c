"""Instance-level LossTransform for torchvision detectors (Faster/Mask R-CNN, RetinaNet). See docs/detection.md."""
from .align import assign_to_gt, cluster_mean_boxes, greedy_match, greedy_match_rows, gt_instance_groups
from .backbone import build_backbone, build_detector
from .consistency import InstanceLossTransform
from .transforms import ReplicaAugment, ReplicaParams, invert_boxes, invert_masks

__all__ = ['assign_to_gt', 'cluster_mean_boxes', 'greedy_match', 'greedy_match_rows', 'gt_instance_groups',
           'build_backbone', 'build_detector', 'InstanceLossTransform', 'ReplicaAugment', 'ReplicaParams',
           'invert_boxes', 'invert_masks']
