#!/usr/bin/env python3
"""Real-size builds: a shape of exporter/data/model_configs.yaml (R1-Distill-Qwen-1.5B by default, 7B with
--shape r1-distill-qwen-7b) with random weights written as BF16 safetensors shards + model.safetensors.index.json
(the hub layout), built by r1deploy's streaming builder (exporter/stream_build.py: FP16, INT4 RTN, INT4 AWQ) and,
in the same run on the same checkpoint, by onnxruntime-genai's model builder (int4, CPU) — each stage in its own
process, with wall time, peak RSS (the process tree, sampled every 0.2 s), output bytes on disk, and the issue's
goal: peak RSS ≤ 1.5 GiB + the largest shard + 10 % of the output bytes. Today's export/quantize stages can be run
too (--stages export,quantize-fp16,quantize-int4). Not part of `make test`.

    python benchmarks/real_size.py --workdir /tmp/real-size [--shape r1-distill-qwen-1.5b] [--rss-limit-gib 14]

A stage whose process tree passes --rss-limit-gib is killed and reported as such (the machine is shared). Each
output is deleted after it is measured (--keep-outputs keeps them); the checkpoint stays in the workdir.
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


def write_checkpoint(dest: Path, workdir: Path, shape_name: str, shard_bytes: int) -> None:
    """The shape's config with random BF16 weights, written the way hub checkpoints arrive: safetensors shards of
    at most `shard_bytes` + model.safetensors.index.json, one shard in memory at a time (never the model), and the
    tiny preset's tokenizer (random ids stay below its vocabulary; calibration text is tokenized with it)."""
    code = f"""
import json, shutil, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from exporter.plan import builtin_shapes
from exporter.tiny_models import write_tiny_checkpoint
dest = Path({str(dest)!r}); dest.mkdir(parents=True, exist_ok=True)
tiny = write_tiny_checkpoint("r1-distill-tiny", Path({str(workdir)!r}) / "models" / "r1-distill-tiny")
cfg = dict(builtin_shapes()[{shape_name!r}]["config"])
cfg.pop("torch_dtype", None); architectures = cfg.pop("architectures")
model_type = cfg.pop("model_type")
config = AutoConfig.for_model(model_type, **cfg, bos_token_id=0, eos_token_id=1, pad_token_id=2)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
params = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
del model
gen = torch.Generator().manual_seed(0)
shards, current, size = [], {{}}, 0
def flush():
    global current, size
    if current:
        name = f"model-{{len(shards) + 1:05d}}.safetensors"
        save_file(current, str(dest / name), metadata={{"format": "pt"}})
        shards.append((name, list(current)))
        current, size = {{}}, 0
for n, shp in params:
    t = torch.empty(shp, dtype=torch.bfloat16)
    if len(shp) >= 2:
        t.normal_(0.0, 0.02, generator=gen)
    elif n.endswith("bias"):
        t.normal_(0.0, 0.02, generator=gen)
    else:
        t.fill_(1.0)
    nbytes = t.numel() * 2
    if size and size + nbytes > {shard_bytes}:
        flush()
    current[n] = t
    size += nbytes
flush()
total = len(shards)
weight_map = {{}}
for i, (name, names) in enumerate(shards):
    final = f"model-{{i + 1:05d}}-of-{{total:05d}}.safetensors"
    (dest / name).rename(dest / final)
    weight_map.update(dict.fromkeys(names, final))
(dest / "model.safetensors.index.json").write_text(json.dumps({{"metadata": {{}}, "weight_map": weight_map}}, indent=1))
config.architectures = architectures
config.save_pretrained(str(dest))
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if (tiny / name).is_file():
        shutil.copy(tiny / name, dest / name)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def stage_commands(stages: list[str], ckpt: Path, wd: Path, exporter: str, int4_method: str) -> dict[str, tuple[list[str], Path]]:
    """Each stage's command and the directory it writes."""
    base = [*R1DEPLOY, "--workdir", str(wd), "-q"]
    stream = [*R1DEPLOY, "-q", "stream-build", str(ckpt), "--out"]
    out = wd / "out"
    layout = wd / ckpt.name / "onnx"
    table = {
        # r1deploy's streaming builder (exporter/stream_build.py): shards -> fused graph, precision on the way
        "stream-fp16": ([*stream, str(out / "stream-fp16"), "--precision", "fp16"], out / "stream-fp16"),
        "stream-int4-rtn": ([*stream, str(out / "stream-int4-rtn"), "--precision", "int4", "--method", "rtn",
                             "--block-size", "128", "--format", "qdq"], out / "stream-int4-rtn"),
        "stream-int4-awq": ([*stream, str(out / "stream-int4-awq"), "--precision", "int4", "--method", "awq",
                             "--block-size", "128", "--format", "qdq"], out / "stream-int4-awq"),
        # the peer, same checkpoint, same run: onnxruntime-genai's model builder (RTN int4, CPU)
        "genai-int4": ([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o",
                        str(out / "genai-int4"), "-p", "int4", "-e", "cpu", "-c", str(wd / "genai-cache")],
                       out / "genai-int4"),
        # today's stages (torch export of the generic graph, then quantize)
        "export": ([*base, "export", "--model", str(ckpt), "--exporter", exporter], layout / "fp32"),
        "quantize-fp16": ([*base, "quantize", "--model", str(ckpt), "--precision", "fp16"], layout / "fp16"),
        "quantize-int4": ([*base, "quantize", "--model", str(ckpt), "--precision", "int4", "--method", int4_method,
                           "--block-size", "128", "--format", "qdq"], layout / f"int4-{int4_method}-b128-qdq"),
    }
    unknown = [s for s in stages if s not in table]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; known: {', '.join(table)}")
    return {s: table[s] for s in stages}


PRECISION = {"stream-fp16": ("fp16", "rtn"), "stream-int4-rtn": ("int4", "rtn"), "stream-int4-awq": ("int4", "awq"),
             "quantize-fp16": ("fp16", "rtn"), "export": ("fp32", "rtn")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/r1deploy-real-size"))
    ap.add_argument("--shape", default="r1-distill-qwen-1.5b", help="a shape of exporter/data/model_configs.yaml")
    ap.add_argument("--stages", default="stream-fp16,stream-int4-rtn,stream-int4-awq,genai-int4",
                    help="comma list of: stream-fp16, stream-int4-rtn, stream-int4-awq, genai-int4, export, "
                         "quantize-fp16, quantize-int4")
    ap.add_argument("--shard-gib", type=float, default=2.0, help="safetensors shard size of the random checkpoint")
    ap.add_argument("--int4-method", default="rtn", choices=["rtn", "awq"], help="for the quantize-int4 stage")
    ap.add_argument("--rss-limit-gib", type=float, default=14.0)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    ap.add_argument("--keep-outputs", action="store_true", help="leave each stage's output on disk (multi-GB)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result (default <workdir>/real_size.json)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import shutil

    from exporter.core.profiles import QuantSpec
    from exporter.plan import load_shape, weight_bytes

    wd = args.workdir
    # not directly under the workdir: r1deploy writes <workdir>/<checkpoint folder name>/onnx/…
    ckpt = wd / "checkpoints" / f"{args.shape}-random"
    logs = wd / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        write_checkpoint(ckpt, wd, args.shape, int(args.shard_gib * (1 << 30)))
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s: {ckpt}", flush=True)
    shards = sorted(ckpt.glob("*.safetensors"))
    largest_shard = max(p.stat().st_size for p in shards)
    shape = load_shape(ckpt)
    fp32_bytes = weight_bytes(shape, "fp32").total
    limit = int(args.rss_limit_gib * (1 << 30))
    results = []
    sys.path.insert(0, str(REPO / "tests"))
    from test_plan import _initializer_bytes

    for name, (argv, out_dir) in stage_commands(args.stages.split(","), ckpt, wd, args.exporter, args.int4_method).items():
        shutil.rmtree(out_dir, ignore_errors=True)
        print(f"running {name} …", flush=True)
        r = run_stage(name, argv, limit, logs)
        r["output_bytes"] = dir_bytes(out_dir)
        # the goal: 1.5 GiB + the largest single shard + 10 % of the output bytes
        goal = int(1.5 * (1 << 30) + largest_shard + 0.1 * r["output_bytes"])
        r.update(goal_rss_bytes=goal, goal_met=r["rc"] == 0 and r["peak_rss_bytes"] <= goal,
                 peak_rss_over_fp32_weights=round(r["peak_rss_bytes"] / fp32_bytes, 3))
        onnx_path = out_dir / "model.onnx"
        if r["rc"] == 0 and onnx_path.is_file() and name in PRECISION:
            precision, method = PRECISION[name]
            real = _initializer_bytes(onnx_path)
            planned = weight_bytes(shape, precision, QuantSpec(method=method, block_size=128)).total
            r.update(onnx_weight_bytes=real, plan_weight_bytes=planned, size_vs_plan=round(real / planned - 1, 5))
        report = out_dir / "stream_report.json"  # the streaming builder's accuracy, measured on the way
        if report.is_file():
            rep = json.loads(report.read_text())
            r.update(evaluation=rep["evaluation"], evaluation_seconds=rep["evaluation_seconds"],
                     accuracy={k: rep["accuracy"][k] for k in ("cosine", "top1", "kl_divergence", "tokens")
                               if k in rep["accuracy"]})
        if not args.keep_outputs:
            shutil.rmtree(out_dir, ignore_errors=True)
        results.append(r)
        print(json.dumps(r), flush=True)
    summary = {"model": f"{args.shape} shape, random BF16 weights", "parameters": shape.parameters,
               "fp32_weight_bytes": fp32_bytes, "checkpoint_bytes": sum(p.stat().st_size for p in shards),
               "shards": len(shards), "largest_shard_bytes": largest_shard, "load": os.getloadavg(),
               "stages": results}
    out = args.out or wd / "real_size.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written {out}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
