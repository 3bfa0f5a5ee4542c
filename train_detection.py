#!/usr/bin/env python3
"""LossTransform detection training: torchvision Mask/Faster R-CNN with l_multi or T(l_multi).

Example (PennFudanPed, Table 4 recipe):
    python train_detection.py -c configs/detection/pennfudan_maskrcnn_resnet50_lt.yaml --data-dir /data/PennFudanPed

Multi-process (DDP): torchrun --nproc_per_node N train_detection.py ... (gloo with --device cpu).
User errors print one line "error: ..." with the fix and exit with code 2. The command line lives in
lt_timm/cli/detection.py, the training in lt_timm/detection/ (see docs/detection.md).
"""
import sys

from lt_timm.cli.detection import main

if __name__ == '__main__':
    sys.exit(main())
