"""Shared helpers for the benchmark scripts: environment record, CSV/JSON writing, subprocess runs."""
import csv
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'benchmarks', 'results')
# The Imagenette training augmentation shared by accuracy.py, sweep.py and finetune.py.
IMAGENETTE_AUG = ['--scale', '0.35', '1.0', '--hflip', '0.5', '--color-jitter', '0.3']


def environment() -> Dict[str, object]:
    import torch
    import timm
    env = dict(python=sys.version.split()[0], torch=torch.__version__, timm=timm.__version__,
               platform=platform.platform(), processor=platform.processor() or platform.machine(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    try:
        import lt_timm
        env['lt_timm'] = lt_timm.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    env['cpu_model'] = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        env['git_commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip() or None
    except OSError:
        pass
    return env


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def write_csv(path: str, rows: List[Dict[str, object]], fields: Optional[List[str]] = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fields is None:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def run_cmd(cmd: List[str], log_path: str, threads: int = 1) -> Dict[str, object]:
    """Run ``cmd`` from the repo root; stdout+stderr to ``log_path``; returns rc, wall_s, max RSS (MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    with open(log_path, 'w') as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    return dict(rc=rc, wall_s=time.time() - t0, max_rss_mib=usage.ru_maxrss / 1024.0)


def read_summary(output_dir: str) -> List[Dict[str, float]]:
    rows = []
    for r in read_csv(os.path.join(output_dir, 'summary.csv')):
        rows.append({k: float(v) if v not in ('', None) else float('nan') for k, v in r.items()})
    return rows


def shell_join(cmd: List[str]) -> str:
    import shlex
    return ' '.join(shlex.quote(c) for c in cmd)


def run_validate(cmd: List[str], out_json: str, threads: int = 1, reuse: bool = False) -> Dict[str, object]:
    """Run a ``validate.py ... --results-file out_json`` command (log next to it; ``reuse``: keep an existing
    ``out_json``) and return its results with the command; a failed run stops the benchmark."""
    log_path = out_json[:-len('.json')] + '.log'
    if not (reuse and os.path.exists(out_json)):
        r = run_cmd(cmd, log_path, threads=threads)
        if r['rc'] != 0:
            raise SystemExit(f'validate failed (rc {r["rc"]}): see {log_path}')
    with open(out_json) as f:
        res = json.load(f)
    res['command'] = shell_join(cmd)
    return res
