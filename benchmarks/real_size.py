#!/usr/bin/env python3
"""Real-size export: DeepSeek-R1-Distill-Qwen-1.5B's exact shape (exporter/data/model_configs.yaml) with random
weights, through r1deploy's own stages — export (+ verify against PyTorch), quantize FP16, quantize INT4 — each in
its own process, with wall time and peak RSS (the process tree, sampled every 0.2 s) against the FP32 weight bytes,
and each artifact's weight bytes against what `r1deploy plan` predicts. Not part of `make test`.

    python benchmarks/real_size.py --workdir /tmp/real-size [--int4-method rtn] [--rss-limit-gib 18]

Needs ~8 GB of RAM per stage or more and tens of GB of disk. A stage whose process tree passes --rss-limit-gib is
killed and reported as such (the machine is shared). Goal from issue 12: peak RSS ≤ 1.3 × FP32 weight bytes in
every stage; sizes within 1 % of the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
R1DEPLOY = [sys.executable, "-m", "exporter.cli"]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(name: str, argv: list[str], limit_bytes: int, log_dir: Path) -> dict:
    log = open(log_dir / f"{name}.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    ps = psutil.Process(proc.pid)
    peak, killed = 0, False

    def watch():
        nonlocal peak, killed
        while proc.poll() is None:
            rss = tree_rss(ps)
            peak = max(peak, rss)
            if rss > limit_bytes:
                killed = True
                proc.kill()
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    rc = proc.wait()
    t.join()
    log.close()
    return {"stage": name, "rc": rc, "seconds": round(time.perf_counter() - started, 1), "peak_rss_bytes": peak,
            "killed_at_limit": killed, "log": str(log_dir / f"{name}.log")}


def write_checkpoint(dest: Path, workdir: Path) -> None:
    """The 1.5B shape, random weights (safetensors) + the tiny preset's tokenizer (ids stay below its vocabulary)."""
    code = f"""
import json, shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from exporter.plan import builtin_shapes
from exporter.tiny_models import write_tiny_checkpoint
dest = Path({str(dest)!r})
tiny = write_tiny_checkpoint("r1-distill-tiny", Path({str(workdir)!r}) / "models" / "r1-distill-tiny")
cfg = dict(builtin_shapes()["r1-distill-qwen-1.5b"]["config"])
cfg.pop("torch_dtype", None); cfg.pop("architectures", None)
model_type = cfg.pop("model_type")
config = AutoConfig.for_model(model_type, **cfg, bos_token_id=0, eos_token_id=1, pad_token_id=2)
torch.manual_seed(0)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model = model.to_empty(device="cpu")
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
model.save_pretrained(str(dest), safe_serialization=True, max_shard_size="2GB")
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if (tiny / name).is_file():
        shutil.copy(tiny / name, dest / name)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/r1deploy-real-size"))
    ap.add_argument("--int4-method", default="rtn", choices=["rtn", "awq"],
                    help="rtn bounds the time on a CPU-only machine; awq adds the calibration passes")
    ap.add_argument("--rss-limit-gib", type=float, default=18.0)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    ap.add_argument("--out", type=Path, default=None, help="JSON result (default <workdir>/real_size.json)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from exporter.core import artifacts
    from exporter.core.profiles import QuantSpec
    from exporter.plan import load_shape, weight_bytes

    wd = args.workdir
    # not directly under the workdir: r1deploy writes <workdir>/<checkpoint folder name>/onnx/…
    ckpt = wd / "checkpoints" / "r1-distill-qwen-1.5b-random"
    logs = wd / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        write_checkpoint(ckpt, wd)
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s: {ckpt}", flush=True)
    shape = load_shape(ckpt)
    fp32_bytes = weight_bytes(shape, "fp32").total
    limit = int(args.rss_limit_gib * (1 << 30))
    base = [*R1DEPLOY, "--workdir", str(wd), "-q"]
    stages = [
        ("export", [*base, "export", "--model", str(ckpt), "--exporter", args.exporter]),
        ("quantize-fp16", [*base, "quantize", "--model", str(ckpt), "--precision", "fp16"]),
        ("quantize-int4", [*base, "quantize", "--model", str(ckpt), "--precision", "int4", "--method",
                           args.int4_method, "--block-size", "128", "--format", "qdq"]),
    ]
    layout = artifacts.ModelLayout(wd, ckpt.name)
    variants = {"export": ("fp32", "fp32"), "quantize-fp16": ("fp16", "fp16"),
                "quantize-int4": ("int4", f"int4-{args.int4_method}-b128-qdq")}
    results = []
    for name, argv in stages:
        print(f"running {name} …", flush=True)
        r = run_stage(name, argv, limit, logs)
        precision, variant = variants[name]
        r["peak_rss_over_fp32_weights"] = round(r["peak_rss_bytes"] / fp32_bytes, 3)
        onnx_path = layout.onnx_path(variant)
        if r["rc"] == 0 and onnx_path.is_file():
            sys.path.insert(0, str(REPO / "tests"))
            from test_plan import _initializer_bytes

            real = _initializer_bytes(onnx_path)
            planned = weight_bytes(shape, precision, QuantSpec(method=args.int4_method, block_size=128)).total
            r.update(onnx_weight_bytes=real, plan_weight_bytes=planned, size_vs_plan=round(real / planned - 1, 5),
                     files_bytes=artifacts.onnx_bytes(onnx_path))
        results.append(r)
        print(json.dumps(r), flush=True)
        if r["rc"] != 0:
            break
    summary = {"model": "r1-distill-qwen-1.5b shape, random weights", "parameters": shape.parameters,
               "fp32_weight_bytes": fp32_bytes, "exporter": args.exporter, "int4_method": args.int4_method,
               "load": os.getloadavg(), "stages": results}
    out = args.out or wd / "real_size.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written {out}")
    return 0 if all(r["rc"] == 0 for r in results) and len(results) == len(stages) else 1


if __name__ == "__main__":
    sys.exit(main())
