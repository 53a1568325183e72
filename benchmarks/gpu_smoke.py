"""GPU smoke run for the first session with a GPU (issue 21 item 5): NOT YET RUN — no GPU has been lent.

    python3 benchmarks/gpu_smoke.py [--models tiny,122m] [--precision fp32|fp16] [--levels 1,4,16]
                                    [--workdir DIR] [--budget-s 420]

1. Finds the GPU (nvidia-smi, else torch.cuda, else cuda-python); none: one line, exit 2.
2. Builds the edge profile's TensorRT-RTX engine for that GPU through the project's own path (`r1deploy
   build-engine`, export first), with the edge profile's settings and this GPU's compute capability (a profile
   `gpu-smoke` written beside the workdir; max batch 16 so that the sweep's top level is one engine call).
   TensorRT-RTX 1.7 targets SM75/80/86/89/120/121: on another GPU (an H100/H200 is SM90) the row says so.
3. Serves it through Triton's CUDA path when `tritonserver` is on PATH (the edge repository: the generate model
   runs the plan in-process, one instance per GPU; HTTP generate_stream, closed loop); else runs it in this
   process through the generate model's own runner and scheduler (engine_runtimes.TensorRTRunner under
   kv_padded.PaddedKVEngine and llm_scheduler.Scheduler), beside ONNX Runtime's CUDA execution provider on the same
   ONNX (the same scheduler over engine_runtimes' onnxruntime runner) for comparison.
4. Checks greedy tokens of the plan against ONNX Runtime on the CPU (same ONNX), then sweeps concurrency (1, 4, 16:
   closed loop, 128-token prompts, 64 output tokens, ignore_eos) and prints one table: output tokens/s, TTFT
   p50/p99, inter-token latency p99 per level, with the GPU's name; ONNX Runtime on the CPU is a baseline row for
   the tiny model only. Ends within --budget-s (the 122M model is skipped, saying so, when the tiny one used over
   half of it).

Needs only what the repo's venv installs (r1deploy[rtx,serve] and its dependencies) plus a CUDA driver; on a machine
without network carry the wheels: tensorrt_rtx_cu13_libs + tensorrt_rtx_cu13_bindings (1.7.1.116, --no-deps),
cuda-python, and onnxruntime-gpu for the CUDA EP row (absent: the row says so). Every missing piece is one line in
the table, never a traceback; exit 0 when at least one GPU row ran, 1 when none could, 2 when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "exporter/repository/python_models"))

PROMPT_TOKENS, OUTPUT_TOKENS = 128, 64
PROFILE = "gpu-smoke"


@dataclass
class Gpu:
    name: str
    compute_capability: str  # "8.9"
    memory_gib: int
    found_by: str


def find_gpu() -> Gpu | None:
    """The first GPU, from whichever of nvidia-smi, torch.cuda and cuda-python is there."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()
            if out:
                name, cc, mib = (x.strip() for x in out[0].split(","))
                return Gpu(name, cc, round(float(mib) / 1024), "nvidia-smi")
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return Gpu(p.name, f"{p.major}.{p.minor}", round(p.total_memory / 2**30), "torch.cuda")
    except Exception:  # noqa: BLE001 — a broken torch is one more way of finding no GPU
        pass
    try:
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        if int(err) == 0 and count > 0:
            err, p = cudart.cudaGetDeviceProperties(0)
            if int(err) == 0:
                return Gpu(p.name.decode().strip("\0"), f"{p.major}.{p.minor}", round(p.totalGlobalMem / 2**30), "cuda-python")
    except Exception:  # noqa: BLE001
        pass
    return None


@dataclass
class Row:
    model: str
    path: str  # what ran: tensorrt_rtx in-process, onnxruntime CUDA EP, triton …
    level: int | None = None
    tokens_per_s: float = float("nan")
    ttft_p50_ms: float = float("nan")
    ttft_p99_ms: float = float("nan")
    itl_p99_ms: float = float("nan")
    note: str = ""
    gpu: bool = True  # a row that ran (or was to run) on the GPU; the ORT CPU baseline is not


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


def r1deploy(workdir: Path, profiles: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "exporter.cli", "-q", "--workdir", str(workdir), "--profiles", str(profiles), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def smoke_profile(gpu: Gpu, dest: Path) -> Path:
    """The edge profile with this GPU's identity and a batch of 16 (the sweep's top level)."""
    import yaml

    from exporter.core.profiles import builtin_profile_data

    data = builtin_profile_data()["edge"]
    data.update(max_batch_size=16, preferred_batch_sizes=[4, 16],
                gpu={**data["gpu"], "product": gpu.name.replace(" ", "-"), "compute_capability": gpu.compute_capability,
                     "memory_gib": max(1, gpu.memory_gib)})
    dest.write_text(yaml.safe_dump({PROFILE: data}))
    return dest


def rtx_supports(cc: str) -> str | None:
    """None when TensorRT-RTX can build for this compute capability, else why not (one line)."""
    try:
        import tensorrt_rtx_bindings as trt
    except ImportError:
        try:
            import tensorrt_rtx as trt
        except ImportError:
            return "TensorRT-RTX is not installed (tensorrt_rtx_cu13_libs + tensorrt_rtx_cu13_bindings, --no-deps)"
    from exporter.core.profiles import sm_name

    sm = sm_name(cc)
    if not hasattr(trt.ComputeCapability, sm):
        known = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
        return f"TensorRT-RTX {trt.__version__} cannot target {sm} (it targets {', '.join(known)})"
    return None


def model_source(model: str, work: Path) -> str:
    """The preset name, or a 122 M-parameter random Qwen2 checkpoint (benchmarks/serving_scaling.py's)."""
    if model == "tiny":
        return "r1-distill-tiny"
    ckpt = work / "qwen2-122m"
    if not (ckpt / "config.json").is_file():
        sys.path.insert(0, str(REPO / "benchmarks"))
        from serving_scaling import random_qwen2

        random_qwen2(ckpt, 12, 768)
    return str(ckpt)


# -- in process: the generate model's runner and scheduler ---------------------------------------------------------
def _slots(onnx_path: Path):
    import onnxruntime as ort
    from kv_padded import CacheSlot

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    slots = [CacheSlot(i.name, i.name.replace("past_key_values.", "present."), i.shape[1], i.shape[3])
             for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    dtype = "float16" if "float16" in session.get_inputs()[-1].type else "float32"
    return session, slots, dtype


def _plan_kv_dtype(plan: Path, default: str) -> str:
    """The plan's cache element type, from its engine.json: the engine stage's serving graph keeps the cache in the
    compute dtype (float16 for fp16 and int4), which is not the ONNX's (FP32 IO) — docs/engines.md."""
    try:
        meta = json.loads((plan.parent / "engine.json").read_text())
        return next(t["dtype"] for t in meta["inputs"] if t["name"].startswith("past_key_values."))
    except (OSError, ValueError, KeyError, StopIteration):
        return default


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(5, min(vocab, 30000), PROMPT_TOKENS)] for _ in range(n)]


def sweep_inprocess(run, max_batch, slots, dtype, levels: list[int], vocab: int) -> list[dict]:
    """Closed loop at each level on llm_scheduler.Scheduler over kv_padded.PaddedKVEngine(run)."""
    return [_level(run, max_batch, slots, dtype, level, vocab) for level in levels]


def _level(run, max_batch, slots, dtype, level: int, vocab: int) -> dict:
    """`level` requests in flight (a new one as each finishes), 4 × level in all (at least 8): output tokens/s, TTFT
    (arrival → first token) and the gaps between a request's steps."""
    import llm_scheduler as ls
    from kv_padded import PaddedKVEngine

    limits = ls.Limits(max_rows=level, kv_budget_tokens=level * (PROMPT_TOKENS + OUTPUT_TOKENS), max_queue=4 * level,
                       max_sequence_len=PROMPT_TOKENS + OUTPUT_TOKENS)
    sched = ls.Scheduler(PaddedKVEngine(run, slots, dtype, level, max_batch=max_batch), limits, set())
    todo = _prompts(max(8, 4 * level), vocab, level)
    total, stamps, ttft = len(todo), {}, []
    params = ls.SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True)

    def submit():
        seq = ls.Sequence(todo.pop(), params, ls.TextStream(lambda ids: "", []))
        sched.submit(seq)
        stamps[id(seq)] = []

    for _ in range(min(level, len(todo))):
        submit()
    tokens, done_n = 0, 0
    start = time.perf_counter()
    while done_n < total:
        ready, done, _ = sched.step()
        now = time.perf_counter()
        for seq in ready + done:
            if seq.pending_tokens:
                stamps[id(seq)].append(now)
                tokens += len(seq.pending_tokens)
                seq.pending_tokens, seq.pending_text = [], ""
        for seq in done:
            done_n += 1
            ttft.append(seq.first_token_at - seq.arrival)
            if todo:
                submit()
    wall = time.perf_counter() - start
    itl = [b - a for s in stamps.values() for a, b in zip(s, s[1:], strict=False)]
    return {"level": level, "tokens_per_s": tokens / wall, "ttft_p50_ms": _pct(ttft, 50),
            "ttft_p99_ms": _pct(ttft, 99), "itl_p99_ms": _pct(itl, 99)}


def greedy_check(run, run_dtype, session, slots, dtype, vocab: int) -> str:
    """The plan's greedy tokens (its cache in `run_dtype`) against ONNX Runtime on the CPU, same ONNX (its cache in
    `dtype`), two prompts of 16 tokens."""
    import llm_scheduler as ls
    from kv_padded import PaddedKVEngine

    def tokens(r, dtype):
        limits = ls.Limits(max_rows=2, kv_budget_tokens=1024, max_queue=4, max_sequence_len=512)
        sched = ls.Scheduler(PaddedKVEngine(r, slots, dtype, 2), limits, set())
        seqs = [ls.Sequence(p, ls.SamplingParams(max_tokens=16, ignore_eos=True), ls.TextStream(lambda ids: "", []))
                for p in _prompts(2, vocab, 99)]
        for s in seqs:
            sched.submit(s)
        while sched.running or sched.waiting:
            sched.step()
        return [s.tokens for s in seqs]

    got, ref = tokens(run, run_dtype), tokens(lambda feeds, outs: session.run(outs, feeds), dtype)
    if got == ref:
        return "greedy = ORT CPU (2×16 tokens)"
    first = next(i for i, (a, b) in enumerate(zip(sum(got, []), sum(ref, []), strict=False)) if a != b)
    return f"greedy differs from ORT CPU at token {first}"


def run_model(model: str, gpu: Gpu, args, work: Path, profiles: Path) -> list[Row]:
    rows: list[Row] = []
    source = model_source(model, work)
    wd = work / "workdir"
    t0 = time.perf_counter()
    why_not = rtx_supports(gpu.compute_capability)
    plan = None
    if why_not is None:
        res = r1deploy(wd, profiles, "build-engine", "--model", source, "--profile", PROFILE, "--precision", args.precision)
        if res.returncode != 0:
            why_not = "build-engine failed: " + (res.stderr.strip().splitlines() or ["?"])[-1]
        else:
            plan = next((wd / Path(source).name).glob(f"engines/{PROFILE}/model.plan"), None)
    else:  # the ONNX rows still need the export
        res = r1deploy(wd, profiles, "export", "--model", source)
        if res.returncode != 0:
            return [Row(model, "export", note="export failed: " + (res.stderr.strip().splitlines() or ["?"])[-1])]
    build_s = time.perf_counter() - t0
    model_dir = wd / Path(source).name
    variant = {"fp32": "fp32", "fp16": "fp16"}[args.precision]
    onnx_path = model_dir / "onnx" / variant / "model.onnx"
    session, slots, dtype = _slots(onnx_path)
    vocab = int(json.loads((model_dir / "tokenizer" / "config.json").read_text()).get("vocab_size", 1000))
    from engine_runtimes import MissingRuntime, load_runner

    if plan is None:
        rows.append(Row(model, "tensorrt_rtx", note=why_not or "no plan"))
    elif shutil.which("tritonserver"):
        rows += triton_rows(model, source, wd, profiles, args)
    else:
        try:
            run, max_batch = load_runner("tensorrt_rtx", plan, {}, 0)
            plan_dtype = _plan_kv_dtype(plan, dtype)
            note = f"built in {build_s:.0f} s; " + greedy_check(run, plan_dtype, session, slots, dtype, vocab)
            for r in sweep_inprocess(run, max_batch, slots, plan_dtype, args.levels, vocab):
                rows.append(Row(model, "tensorrt_rtx in-process (TensorRTRunner)", note=note, **r))
                note = ""
        except (MissingRuntime, RuntimeError, OSError) as exc:
            rows.append(Row(model, "tensorrt_rtx in-process (TensorRTRunner)", note=_line(exc)))
    try:
        cuda = {"parameters": {"ort_providers": {"string_value": '["CUDAExecutionProvider"]'}}}
        run, _ = load_runner("onnxruntime", onnx_path, cuda)
        for r in sweep_inprocess(run, None, slots, dtype, args.levels, vocab):
            rows.append(Row(model, f"onnxruntime CUDA EP ({variant} ONNX)", **r))
    except (MissingRuntime, RuntimeError, OSError) as exc:
        rows.append(Row(model, "onnxruntime CUDA EP", note=_line(exc)))
    if model != "tiny":  # the CPU baseline of the 122 M model would eat the budget (~220 ms a step on 2 cores)
        return rows
    # the baseline every machine has: the same scheduler over ONNX Runtime on the CPU (all cores)
    run, _ = load_runner("onnxruntime", onnx_path, {"parameters": {"intra_op_num_threads": {"string_value": "0"}}})
    for r in sweep_inprocess(run, None, slots, dtype, args.levels, vocab):
        rows.append(Row(model, f"onnxruntime CPU ({variant} ONNX)", gpu=False, **r))
    return rows


def triton_rows(model: str, source: str, wd: Path, profiles: Path, args) -> list[Row]:
    """The edge repository (generate runs the plan in-process, one instance per GPU) on the tritonserver found on
    PATH, through HTTP generate_stream, closed loop (benchmarks/serving_scaling.py's client)."""
    import asyncio

    sys.path.insert(0, str(REPO / "benchmarks"))
    from serving_scaling import closed_loop, summarise, triton_request

    from exporter.serve import ServerConfig, TritonServer

    repo = wd / "repo"
    res = r1deploy(wd, profiles, "repository", "--model", source, "--profile", PROFILE, "--out", str(repo))
    if res.returncode != 0:
        return [Row(model, "triton", note="repository failed: " + (res.stderr.strip().splitlines() or ["?"])[-1])]
    rows = []
    try:
        with TritonServer(ServerConfig(model_repository=repo)) as srv:
            base = f"http://{srv.endpoints.http}"
            for level in args.levels:
                texts = [" ".join(["hello"] * PROMPT_TOKENS) + f" {i}" for i in range(max(8, 4 * level))]
                send = lambda s, t: triton_request(s, base, t, OUTPUT_TOKENS, True)  # noqa: E731
                wall, results = asyncio.run(closed_loop(send, texts, level))
                r = summarise(wall, results, 0.0)
                itl = [(b[0] - a[0]) / b[1] for x in results for a, b in zip(x["stamps"], x["stamps"][1:], strict=False)]
                rows.append(Row(model, "triton (tritonserver, generate in-process)", level, r["tokens_per_s"],
                                r["ttft_p50_ms"], r["ttft_p99_ms"], _pct(itl, 99)))
    except Exception as exc:  # noqa: BLE001 — one line in the table, the run goes on
        rows.append(Row(model, "triton", note=_line(exc)))
    return rows


def table(gpu: Gpu, rows: list[Row]) -> str:
    head = f"GPU: {gpu.name} (compute capability {gpu.compute_capability}, {gpu.memory_gib} GiB; found by {gpu.found_by})"
    lines = [head, "| model | path | concurrency | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p99 ms | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        level = "" if r.level is None else str(r.level)
        nums = [f"{x:.1f}" if x == x else "—" for x in (r.tokens_per_s, r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p99_ms)]
        lines.append(f"| {r.model} | {r.path} | {level} | {' | '.join(nums)} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,122m", help="tiny (r1-distill-tiny) and/or 122m (random Qwen2)")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--workdir", type=Path, help="keeps exports and engines between runs [default: a temp dir]")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--rehearse", metavar="CC", help="no GPU needed: act as if a GPU of this compute capability "
                    "(e.g. 8.9) were found — builds the engine (TensorRT-RTX builds without a GPU); every GPU row then "
                    "says in one line why it could not run. Exit 1 (no GPU row ran).")
    args = ap.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in models if m not in ("tiny", "122m")]:
        print(f"gpu_smoke: unknown model {bad[0]!r} (tiny, 122m)", file=sys.stderr)
        return 2
    gpu = Gpu("rehearsal (no GPU)", args.rehearse, 24, "--rehearse") if args.rehearse else find_gpu()
    if gpu is None:
        print("gpu_smoke: no GPU found (nvidia-smi, torch.cuda and cuda-python see none); run it on a GPU machine",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    profiles = smoke_profile(gpu, work / "profiles.yaml")
    rows: list[Row] = []
    for model in models:
        if model != models[0] and time.perf_counter() - start > args.budget_s / 2:
            rows.append(Row(model, "—", note=f"skipped: {time.perf_counter() - start:.0f} s of the {args.budget_s:.0f} s budget used"))
            continue
        try:
            rows += run_model(model, gpu, args, work, profiles)
        except Exception as exc:  # noqa: BLE001 — the table still prints what ran
            rows.append(Row(model, "—", note=_line(exc)))
    print(table(gpu, rows))
    print(f"total {time.perf_counter() - start:.0f} s; load {os.getloadavg()[0]:.1f}")
    return 0 if any(r.gpu and r.level is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
