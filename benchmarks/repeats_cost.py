"""What m costs under the paper's original batching (Tables 1-2: m = 32), measured, not assumed.

Under ``--lt-epoch original`` a step holds ``-b`` images x ``m`` replicas, so rows, activation memory and compute per
step grow ``m``-fold while the number of steps per epoch stays plain training's. For each CIFAR model of Tables 1-2
this measures, on the CPU in float32 at 32 x 32:

* **activations kept for the backward pass per row**: the bytes of every tensor autograd saves in one training
  forward (``torch.autograd.graph.saved_tensors_hooks``, storages counted once), as the slope between two batch
  sizes (what does not grow with the batch, e.g. saved weights, drops out);
* **forward FLOPs per row** (``torch.utils.flop_counter.FlopCounterMode``); a training step costs about 3x the
  forward (forward + backward of activations and weights);
* **weights, gradients and SGD momentum**: 3 x the parameter bytes, independent of m.

and reports them per step and per epoch for m = 1 (plain CE), 3 (the project's LT-v1 default) and 32 (Table 1).
The memory is the floor of what a GPU needs (no allocator slack, no cuDNN workspace, no AMP copies).

    python benchmarks/repeats_cost.py            # -> benchmarks/results/repeats_cost.{csv,json}
"""
import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, environment, log, write_csv, write_json  # noqa: E402

# model -> images per step of its recipe (He et al.: 128, Huang et al.: 64)
MODELS = {'cifar_resnet20': 128, 'cifar_resnet44': 128, 'cifar_resnet110': 128, 'cifar_densenet40': 64}
TRAIN_IMAGES = 50000


def saved_bytes(model: torch.nn.Module, rows: int, classes: int) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one training forward of ``rows`` rows."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(rows, 3, 32, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, classes, (rows,)))
    del loss
    return sum(storages.values())


def forward_flops(model: torch.nn.Module, rows: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(rows, 3, 32, 32))
    return counter.get_total_flops() / rows


def measure(name: str, classes: int = 10):
    import timm
    import lt_timm.models  # noqa: F401  (registers the CIFAR models)
    model = timm.create_model(name, num_classes=classes).train()
    small, large = saved_bytes(model, 8, classes), saved_bytes(model, 16, classes)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(act_bytes_per_row=(large - small) / 8, flops_per_row=forward_flops(model.eval(), 4),
                param_bytes=params)


def rows_for(name: str, per_row, repeats):
    images = MODELS[name]
    out = []
    for m in repeats:
        rows = images * m
        step_flops = 3 * per_row['flops_per_row'] * rows
        out.append(dict(model=name, m=m, images_per_step=images, rows_per_step=rows,
                        steps_per_epoch=TRAIN_IMAGES // images,
                        activation_gib_per_step=per_row['act_bytes_per_row'] * rows / 2 ** 30,
                        weights_grads_momentum_mib=3 * per_row['param_bytes'] / 2 ** 20,
                        train_tflop_per_step=step_flops / 1e12,
                        train_tflop_per_epoch=step_flops * (TRAIN_IMAGES // images) / 1e12,
                        act_kib_per_row=per_row['act_bytes_per_row'] / 1024,
                        fwd_mflop_per_row=per_row['flops_per_row'] / 1e6))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument('--repeats', nargs='+', type=int, default=[1, 3, 32])
    p.add_argument('--name', default='repeats_cost')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        per_row = measure(name)
        log(f'{name}: {per_row["act_bytes_per_row"] / 1024:.0f} KiB of saved activations and '
            f'{per_row["flops_per_row"] / 1e6:.1f} forward MFLOP per 32x32 row')
        rows += rows_for(name, per_row, args.repeats)
    write_csv(os.path.join(RESULTS, f'{args.name}.csv'), rows)
    write_json(os.path.join(RESULTS, f'{args.name}.json'), dict(environment=environment(), rows=rows))
    for r in rows:
        print(f'{r["model"]:18s} m={r["m"]:2d}  {r["rows_per_step"]:5d} rows/step  '
              f'{r["activation_gib_per_step"]:6.2f} GiB activations  {r["train_tflop_per_step"]:6.3f} TFLOP/step  '
              f'{r["train_tflop_per_epoch"]:7.1f} TFLOP/epoch')


if __name__ == '__main__':
    main()
