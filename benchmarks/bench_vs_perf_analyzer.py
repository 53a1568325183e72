"""`r1deploy bench` against perf_analyzer: the same real Triton server, the same models, inputs, concurrencies
and measurement rules (time windows, ±10 % over 3 windows), one after the other at each level — the order flips
from level to level so that drift does not favour either tool.

Models: the served MiniLM (`embed`: the tokenizer + ONNX Runtime encoder ensemble that `r1deploy repository`
writes for CPU, milliseconds per request) and `echo`, a sub-millisecond python-backend model where the client's
own cost per request dominates.

perf_analyzer: the binary inside the tritonclient 2.51.0 wheel (newer ones need glibc ≥ 2.38), with libb64 from
Debian's libb64-0d package and libcudart from nvidia-cuda-runtime-cu12, prepared once in
~/.cache/r1deploy/perf_analyzer (downloaded with `pip download` and `apt-get download`; nothing is installed).

    .venv/bin/python benchmarks/bench_vs_perf_analyzer.py --concurrency 1,2,4,8 --interval 2

Client CPU per request: r1deploy measures its own process CPU time (all threads) over the measured windows;
for perf_analyzer it is the child's whole CPU time (getrusage) over an estimate of the requests it sent
(its reported throughput × its run time), so it slightly overstates perf_analyzer's cost (start-up included).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

R1DEPLOY = Path(sys.executable).parent / "r1deploy"
TEXT = "A quick measurement of how fast the served sentence encoder answers one short English sentence."


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "r1deploy"


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed: {' | '.join(tail)}")


def setup_perf_analyzer() -> tuple[Path, dict[str, str]]:
    """(binary, env) — prepared once; every step says what it needs when it cannot be done here."""
    root = cache_root() / "perf_analyzer"
    binary, lib = root / "perf_analyzer", root / "lib"
    if not (root / ".complete").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="pa-setup-"))
        try:
            lib.mkdir(parents=True, exist_ok=True)
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmp)]
            _run(pip + ["--platform", "manylinux1_x86_64", "--python-version", "3.11", "tritonclient==2.51.0"], tmp)
            _run(pip + ["nvidia-cuda-runtime-cu12"], tmp)
            _run(["apt-get", "download", "libb64-0d"], tmp)
            import zipfile

            wheel = next(tmp.glob("tritonclient-2.51.0-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                binary.write_bytes(z.read("tritonclient-2.51.0.data/data/bin/perf_analyzer"))
            binary.chmod(0o755)
            with zipfile.ZipFile(next(tmp.glob("nvidia_cuda_runtime_cu12-*.whl"))) as z:
                (lib / "libcudart.so.12").write_bytes(z.read("nvidia/cuda_runtime/lib/libcudart.so.12"))
            _run(["dpkg", "-x", str(next(tmp.glob("libb64-0d_*.deb"))), str(tmp / "deb")], tmp)
            shutil.copy2(next((tmp / "deb").rglob("libb64.so.0d")), lib / "libb64.so.0d")
            (root / ".complete").write_text("tritonclient 2.51.0\n")
        except (RuntimeError, StopIteration, OSError, KeyError) as exc:
            sys.exit(
                f"cannot prepare perf_analyzer in {root}: {exc}\n"
                "It needs: `pip download tritonclient==2.51.0` (the manylinux1 wheel: its binary runs on glibc 2.36; "
                "≥2.53 needs glibc 2.38), `pip download nvidia-cuda-runtime-cu12` (libcudart.so.12) and "
                "`apt-get download libb64-0d` + dpkg (libb64.so.0d). Place perf_analyzer and lib/ there by hand "
                "and touch .complete to skip this step."
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join([str(lib), os.environ.get("LD_LIBRARY_PATH", "")])}
    check = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env)
    if check.returncode != 0:
        sys.exit(f"perf_analyzer in {root} does not run: {(check.stderr or check.stdout).strip()[:300]}")
    return binary, env


def prepare_repositories(workdir: Path, out: Path) -> list[Path]:
    """The served MiniLM (`embed`, CPU python_ort variant) and the `echo` model, as two repositories."""
    from exporter.bench import samples
    from exporter.export import ExportConfig, export_model
    from exporter.repository import RepositoryConfig, write_repository

    export_model(ExportConfig(model="minilm", workdir=workdir))
    minilm = write_repository(RepositoryConfig(model="minilm", profile="edge", variant="python_ort", workdir=workdir,
                                               out=out / "minilm"))
    samples.write_echo(out / "echo")
    return [minilm.out, out / "echo"]


def input_files(out: Path) -> dict[str, Path]:
    files = {"embed": {"text": [TEXT]}, "echo": {"INPUT0": [0.25] * 16}}
    paths = {}
    for model, data in files.items():
        paths[model] = out / f"{model}.json"
        paths[model].write_text(json.dumps({"data": [data]}))
    return paths


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_perf_analyzer(pa: Path, env: dict, url: str, model: str, c: int, data: Path, interval_s: float, work: Path,
                      stability: float) -> dict:
    csv_path = work / f"pa-{model}-c{c}.csv"
    cmd = [str(pa), "-m", model, "-u", url, "-i", "grpc", "--concurrency-range", f"{c}:{c}",
           "--measurement-interval", str(int(interval_s * 1000)), "--stability-percentage", str(stability), "--max-trials", "10",
           "--input-data", str(data), "-f", str(csv_path)]
    cpu0, t0 = _child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - cpu0
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr).strip().splitlines()[-1:]}
    row = next(csv.DictReader(csv_path.open()))
    tput = float(row["Inferences/Second"])
    return {
        "throughput_rps": tput, "p50_ms": float(row["p50 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000,
        "server_queue_us": float(row["Server Queue"]),
        "client_cpu_us_per_request": cpu * 1e6 / max(tput * wall, 1.0), "seconds": wall,
    }


def run_r1deploy(url: str, model: str, c: int, data: Path, interval_s: float, work: Path, stability: float) -> dict:
    cmd = [str(R1DEPLOY), "--json", "bench", "--url", url, "--model", model, "--concurrency", str(c),
           "--duration", str(interval_s), "--stability-percentage", str(stability), "--max-trials", "10",
           "--input-data", str(data), "--out", str(work / f"r1-{model}-c{c}")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    (lv,) = json.loads(proc.stdout)["levels"]
    return {
        "throughput_rps": lv["throughput_rps"], "p50_ms": lv["latency_ms"]["p50"], "p99_ms": lv["latency_ms"]["p99"],
        "avg_ms": lv["latency_ms"]["avg"], "server_queue_us": lv["server"]["queue_us"] if lv["server"] else None,
        "avg_batch": lv["server"]["avg_batch_size"] if lv["server"] else None,
        "client_cpu_us_per_request": lv["client_cpu_us_per_request"], "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--models", default="embed,echo")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds per measurement window (both tools)")
    ap.add_argument("--stability", type=float, default=10.0, help="±%% over 3 windows (both tools)")
    ap.add_argument("--workdir", type=Path, default=cache_root() / "bench-workdir")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench_vs_perf_analyzer")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    models = args.models.split(",")
    pa, env = setup_perf_analyzer()

    from exporter.serve import ServerConfig, TritonServer

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-vs-pa-"))
    repos = prepare_repositories(args.workdir, work / "repos")
    data = input_files(work)
    rows = []
    cfg = ServerConfig(model_repository=repos[0], extra_args=[f"--model-repository={r}" for r in repos[1:]])
    with TritonServer(cfg) as server:
        url = server.endpoints.grpc
        for model in models:
            for i, c in enumerate(concurrencies):
                runs = {}
                order = ["perf_analyzer", "r1deploy"] if i % 2 == 0 else ["r1deploy", "perf_analyzer"]
                for tool in order:
                    if tool == "perf_analyzer":
                        runs[tool] = run_perf_analyzer(pa, env, url, model, c, data[model], args.interval, work,
                                                        args.stability)
                    else:
                        runs[tool] = run_r1deploy(url, model, c, data[model], args.interval, work, args.stability)
                a, b = runs["r1deploy"], runs["perf_analyzer"]
                row = {"model": model, "concurrency": c, "r1deploy": a, "perf_analyzer": b}
                if "error" not in a and "error" not in b:
                    row["throughput_ratio"] = a["throughput_rps"] / b["throughput_rps"]
                    row["p50_ratio"] = a["p50_ms"] / b["p50_ms"]
                rows.append(row)
                print(_line(row), flush=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Triton 2.51 CPU (python backend)",
        "date": time.strftime("%Y-%m-%d"), "interval_s": args.interval, "stability_pct": args.stability,
        "load_average_at_end": os.getloadavg(), "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(rows))
    print(f"results: {args.out / 'results.json'}")
    shutil.rmtree(work, ignore_errors=True)


def _line(row: dict) -> str:
    a, b = row["r1deploy"], row["perf_analyzer"]
    if "throughput_ratio" not in row:
        return f"{row['model']} c={row['concurrency']}: r1deploy {a.get('error', 'ok')} / perf_analyzer {b.get('error', 'ok')}"
    return (f"{row['model']} c={row['concurrency']}: {a['throughput_rps']:.0f} vs {b['throughput_rps']:.0f} req/s "
            f"(×{row['throughput_ratio']:.3f}), p50 {a['p50_ms']:.3f} vs {b['p50_ms']:.3f} ms (×{row['p50_ratio']:.3f}), "
            f"client CPU {a['client_cpu_us_per_request']:.0f} vs ~{b['client_cpu_us_per_request']:.0f} µs/req")


def markdown(rows: list[dict]) -> str:
    out = ["| model | c | r1deploy req/s | perf_analyzer req/s | ratio | r1deploy p50 ms | perf_analyzer p50 ms | p50 ratio "
           "| r1deploy p99 ms | perf_analyzer p99 ms | client CPU µs/req (r1deploy / perf_analyzer) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        a, b = row["r1deploy"], row["perf_analyzer"]
        if "throughput_ratio" not in row:
            out.append(f"| {row['model']} | {row['concurrency']} | {a.get('error', '')} | {b.get('error', '')} |  |  |  |  |  |  |  |")
            continue
        out.append(
            f"| {row['model']} | {row['concurrency']} | {a['throughput_rps']:.0f} | {b['throughput_rps']:.0f} | "
            f"{row['throughput_ratio']:.3f} | {a['p50_ms']:.2f} | {b['p50_ms']:.2f} | {row['p50_ratio']:.3f} | "
            f"{a['p99_ms']:.2f} | {b['p99_ms']:.2f} | {a['client_cpu_us_per_request']:.0f} / "
            f"~{b['client_cpu_us_per_request']:.0f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
