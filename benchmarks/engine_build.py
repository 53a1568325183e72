"""Engine build time, cold vs warm, through the real CLI (`r1deploy build-engine --json`).

For each model: export + quantize once (not timed), then time
  cold     first build into an empty engine dir (fresh process),
  skip     the same command again: the stage cache finds unchanged inputs and skips,
  force    `--force`: a full rebuild (reusing the timing cache where the runtime keeps one — TensorRT-RTX does not),
and a build of the production deployment profile's much larger shape profiles (batch 64, 5 120 positions) with
`--runtime tensorrt-rtx` (SM80), to check that big max dimensions do not make the build slow.

Peer: the bare TensorRT-RTX Python API (the calls in the platform notes: strongly typed network, OnnxParser, one
compute capability, the same shape profiles read from engine.json, build_serialized_network) in a fresh process —
what r1deploy's build costs over hand-written code. (trtexec / tensorrt_rtx are not installable here.)

    .venv/bin/python benchmarks/engine_build.py [--repeats 3] [--workdir DIR]

Prints a Markdown table (median of the repeats; wall = whole CLI process, build = parse + build inside it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

R1 = str(Path(sys.executable).parent / "r1deploy")
CASES = [
    # (model, deployment profile, extra args, ONNX variant it needs)
    ("r1-distill-tiny", "edge", [], "int4"),
    ("r1-distill-tiny", "edge", ["--precision", "fp16"], "fp16"),
    ("minilm", "edge", ["--precision", "fp16"], "fp16"),
    ("r1-distill-tiny", "production", ["--runtime", "tensorrt-rtx"], "fp16"),
]


def cli(workdir: Path, *args: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = subprocess.run([R1, "--workdir", str(workdir), "--json", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"r1deploy {' '.join(args)} failed: {res.stderr.strip()}")
    return wall, json.loads(res.stdout)


def bare_build(onnx_path: str, engine_json: str) -> float:
    """Parse + build with the bare API, as a user would without r1deploy; returns seconds."""
    import tensorrt_rtx_bindings as trt

    meta = json.loads(Path(engine_json).read_text())
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, meta["workspace_bytes"])
    ccs = meta["compute_capabilities"]
    config.num_compute_capabilities = len(ccs)
    for i, cc in enumerate(ccs):
        config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")), i)
    for sp in meta["shape_profiles"]:
        op = builder.create_optimization_profile()
        for name, r in sp["inputs"].items():
            op.set_shape(name, r["min"], r["opt"], r["max"])
        config.add_optimization_profile(op)
    assert builder.build_serialized_network(network, config) is not None
    return time.perf_counter() - t0


def bare_build_process(onnx_path: str, engine_json: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--bare-build", onnx_path, engine_json],
                         capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, float(res.stdout.strip().splitlines()[-1])


def prepare(workdir: Path, model: str, precision: str) -> None:
    cli(workdir, "export", "--model", model)
    from quantize import QuantizeConfig, quantize_model

    settings = dict(precision="fp16") if precision == "fp16" else dict(precision="int4", method="awq", block_size=128, format="qdq")
    quantize_model(QuantizeConfig(model=model, workdir=workdir, **settings))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="reuse exports here (default: a fresh temp dir)")
    ap.add_argument("--bare-build", nargs=2, metavar=("ONNX", "ENGINE_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_build:
        print(f"{bare_build(*args.bare_build):.4f}")
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="engine-bench-"))
    rows = []
    for model, profile, extra, precision in CASES:
        prepare(workdir, model, precision)
        engine_dir = workdir / model / "engines" / profile
        cold, skip, force, bare = [], [], [], []
        out: dict = {}
        for _ in range(args.repeats):
            shutil.rmtree(engine_dir, ignore_errors=True)
            # --no-prepare: the engine stage alone (its inputs are prepared above, once)
            base = ["build-engine", "--model", model, "--profile", profile, "--no-prepare", *extra]
            wall, out = cli(workdir, *base)
            assert not out["skipped"]
            cold.append((wall, out["build_seconds"]))
            wall, again = cli(workdir, *base)
            assert again["skipped"]
            skip.append((wall, 0.0))
            wall, forced = cli(workdir, *base, "--force")
            assert not forced["skipped"]
            force.append((wall, forced["build_seconds"]))
            variant_onnx = workdir / model / "onnx" / forced["onnx_variant"] / "model.onnx"
            bare.append(bare_build_process(str(variant_onnx), forced["metadata_path"]))
        tc = out["timing_cache"]
        rows.append({
            "case": f"{model} / {profile} {' '.join(extra)}".strip(),
            "variant": out["onnx_variant"],
            "cc": ",".join(out["compute_capabilities"]),
            "max_batch": out["max_batch_size"],
            "engine_mb": out["engine_bytes"] / 1e6,
            "cold": [statistics.median(x[i] for x in cold) for i in (0, 1)],
            "skip": statistics.median(x[0] for x in skip),
            "force": [statistics.median(x[i] for x in force) for i in (0, 1)],
            "bare": [statistics.median(x[i] for x in bare) for i in (0, 1)],
            "timing_cache": "yes" if tc["supported"] else "none (no-op in runtime)",
            "runtime": f"{out['runtime']} {out['runtime_version']}",
        })
    print(f"\nmachine: {platform.machine()}, {platform.python_version()}, repeats {args.repeats} (median)\n")
    print("| model / deployment profile | ONNX variant | CC | max batch | engine MB | cold wall / build s "
          "| unchanged (skipped) wall s | --force wall / build s | bare API wall / build s | timing cache |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['variant']} | {r['cc']} | {r['max_batch']} | {r['engine_mb']:.1f} | "
              f"{r['cold'][0]:.2f} / {r['cold'][1]:.2f} | {r['skip']:.2f} | {r['force'][0]:.2f} / {r['force'][1]:.2f} | "
              f"{r['bare'][0]:.2f} / {r['bare'][1]:.2f} | "
              f"{r['timing_cache']} |")
    print(f"\nruntime: {rows[0]['runtime']}; workdir: {workdir}")


if __name__ == "__main__":
    main()
