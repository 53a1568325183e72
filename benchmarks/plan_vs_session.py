#!/usr/bin/env python3
"""`r1deploy plan`'s memory figures against the memory an ONNX Runtime session really takes, at three sizes.

For each checkpoint the streaming builder writes the fused graph (FP32, or --precision), and a fresh process opens
it the way the served engine does (`kv_shared.SharedKVEngine.from_path`: one session, one KV buffer per cache slot
of [rows, kv_heads, capacity + 1, head_dim]) and runs one prefill of --prefill tokens. Its RSS is sampled every
5 ms: after the imports (the baseline), after the session is created (the weights), after the KV buffers are
allocated and touched, and the peak during the prefill (activations + logits). The plan's figures come from
`exporter.plan`: weight_bytes, kv_bytes_per_token × rows × capacity, prefill_activation_bytes + logits_bytes for
`exporter.plan.cpu_session_memory`: resident weights (the mapped embedding table left out), KV of rows × capacity,
one prefill's activations + last-position logits as ONNX Runtime's arena reserves them, and the session's fixed
overhead; the process baseline (Python + numpy + ONNX Runtime imports, ~0.1 GiB) is subtracted from the measured
side. The GPU plan's 1 GiB allowance (CUDA context + Triton) has no CPU counterpart.

    python benchmarks/plan_vs_session.py --workdir /tmp/plan-vs-session [--checkpoint DIR ...]

The default checkpoints: r1-distill-tiny and random Qwen2s of 55 M and 122 M parameters (written here); the 1.5B shape is
passed as a checkpoint directory (benchmarks/real_size.py writes one). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys, threading, time
import numpy as np, psutil
sys.path.insert(0, {models!r})
proc = psutil.Process()
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
import onnxruntime
from kv_shared import SharedKVEngine
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
base = proc.memory_info().rss
engine = SharedKVEngine.from_path({onnx!r}, {rows}, {capacity}, threads=0)
after_session = proc.memory_info().rss
for b in engine.buffers.values():
    b.fill(0)  # touch every page: the buffer is what serving holds
after_kv = proc.memory_info().rss
peak[0] = after_kv
prompt = [int(t) for t in np.random.default_rng(0).integers(3, {vocab}, {prefill})]
engine.prefill([0], [prompt])
time.sleep(0.05)
print(json.dumps(dict(base=base, session=after_session - base, kv=after_kv - after_session,
                      prefill=peak[0] - after_kv, total=peak[0] - base,
                      kv_buffer_bytes=sum(b.nbytes for b in engine.buffers.values()))))
"""


# random Qwen2s (layers, hidden), written by serving_scaling.random_qwen2: the 122 M of docs/benchmarks.md, and a
# 55 M that no constant of the plan was fitted on (an out-of-sample check)
SIZES = ((8, 512), (12, 768))


def measure(ckpt: Path, out: Path, precision: str, rows: int, prefill: int, capacity: int) -> dict:
    sys.path.insert(0, str(REPO))
    from exporter.core.profiles import QuantSpec
    from exporter.plan import cpu_session_memory, load_shape
    from exporter.stream_build import StreamConfig, stream_build

    shutil.rmtree(out, ignore_errors=True)
    built = stream_build(ckpt, out, StreamConfig(precision=precision, method="rtn"))
    shape = load_shape(ckpt)
    code = PROBE.format(models=str(REPO / "exporter" / "repository" / "python_models"), onnx=str(built.onnx_path),
                        rows=rows, capacity=capacity, vocab=min(shape.vocab_size, 256), prefill=prefill)
    got = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout.strip().splitlines()[-1])
    m = cpu_session_memory(shape, precision, rows, capacity + 1, prefill, QuantSpec(method="rtn", block_size=128))
    # the session's overhead shows in the measured step "session created", beside the weights
    plan = {"weights": m.weights + m.runtime, "kv": m.kv_cache, "prefill": m.prefill, "total": m.total}
    measured = {"weights": got["session"], "kv": got["kv"], "prefill": got["prefill"], "total": got["total"]}
    shutil.rmtree(out, ignore_errors=True)
    return {"checkpoint": str(ckpt), "parameters": shape.parameters, "precision": precision, "rows": rows,
            "prefill_tokens": prefill, "capacity": capacity, "plan": plan, "measured": measured,
            "measured_over_plan": {k: round(measured[k] / plan[k], 3) if plan[k] else None for k in plan}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/r1deploy-plan-vs-session"))
    ap.add_argument("--checkpoint", type=Path, action="append", default=[], help="more checkpoints (the 1.5B shape)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int4"])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--capacity", type=int, default=2560)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from exporter.tiny_models import write_tiny_checkpoint

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    ckpts = [write_tiny_checkpoint("r1-distill-tiny", wd / "models" / "r1-distill-tiny")]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from serving_scaling import random_qwen2

    for layers, hidden in SIZES:
        d = wd / "models" / f"qwen2-{layers}x{hidden}"
        if not (d / "config.json").is_file():
            random_qwen2(d, layers, hidden)
        ckpts.append(d)
    ckpts += args.checkpoint
    results = []
    for ckpt in ckpts:
        cfg = json.loads((ckpt / "config.json").read_text())
        prefill = min(args.prefill, int(cfg.get("max_position_embeddings", 4096)) // 2)
        capacity = min(args.capacity, int(cfg.get("max_position_embeddings", 4096)) - 1)
        r = measure(ckpt, wd / "onnx", args.precision, args.rows, prefill, capacity)
        results.append(r)
        print(json.dumps(r), flush=True)
    out = args.out or wd / "plan_vs_session.json"
    out.write_text(json.dumps({"load": os.getloadavg(), "results": results}, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
