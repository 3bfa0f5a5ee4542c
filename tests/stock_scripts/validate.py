#!/usr/bin/env python3
"""Stand-in for timm's validate.py shape, written for lt_timm's launcher tests.

Like timm's script it has a module-level ``parser`` (no ``--aug-repeats``), a ``main()`` that parses ``sys.argv``,
creates the model with ``timm.create_model`` and loads ``--checkpoint`` with ``timm.models.load_checkpoint``, reads
the folder with ``create_dataset`` (``--class-map``) and ``create_loader``, and writes top-1 to ``--results-file``.
It knows nothing about lt_timm.
"""
import argparse
import json

import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model, load_checkpoint

parser = argparse.ArgumentParser(description='stand-in timm validation script')
parser.add_argument('data', metavar='DIR')
parser.add_argument('--model', default='test_resnet', type=str)
parser.add_argument('--checkpoint', default='', type=str)
parser.add_argument('--num-classes', type=int, default=None)
parser.add_argument('--class-map', default='', type=str)
parser.add_argument('--img-size', type=int, default=None)
parser.add_argument('-b', '--batch-size', type=int, default=8)
parser.add_argument('--results-file', default='', type=str)


def main():
    args = parser.parse_args()
    model = create_model(args.model, num_classes=args.num_classes)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    model.eval()
    data_config = resolve_data_config(vars(args), model=model)
    dataset = create_dataset('', root=args.data, class_map=args.class_map)
    loader = create_loader(dataset, input_size=data_config['input_size'], batch_size=args.batch_size,
                           use_prefetcher=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
                           std=data_config['std'], crop_pct=data_config['crop_pct'], num_workers=0)
    correct, labels = 0, []
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            labels += y.tolist()
    results = dict(top1=100 * correct / len(dataset), labels=sorted(set(labels)), mean=list(data_config['mean']))
    if args.results_file:
        with open(args.results_file, 'w') as f:
            json.dump(results, f)
    return results


if __name__ == '__main__':
    main()
