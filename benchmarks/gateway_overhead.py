"""What the OpenAI gateway costs: streaming tokens/s and TTFT through `r1deploy gateway` (POST /v1/completions,
server-sent events) against a direct Triton gRPC stream of the same `generate` model, with the same prompts,
output lengths and measurement rules, at each concurrency — measured with `r1deploy bench` both times
(`--protocol grpc` and `--protocol openai`), one after the other, the order flipping every round so that drift
favours neither.

The server is real: r1-distill-tiny exported, written as a python_ort repository (fp32) and served by the CPU
Triton; the gateway runs in its own process, as in the pod. On this 2-core machine the benchmark client, the
gateway and Triton share the cores, so the gateway's CPU cost shows up as lost throughput.

    .venv/bin/python benchmarks/gateway_overhead.py --concurrency 1,16 --duration 5 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

R1DEPLOY = Path(sys.executable).parent / "r1deploy"


def bench(url: str, protocol: str, concurrency: int, args, out: Path) -> dict:
    cmd = [str(R1DEPLOY), "--json", "bench", "--url", url, "--protocol", protocol, "--model", "generate",
           "--concurrency", str(concurrency), "--duration", str(args.duration), "--warmup", "1",
           "--input-tokens", str(args.input_tokens), "--output-tokens", str(args.output_tokens),
           "--stability-percentage", "25", "--max-trials", "6", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    if not proc.stdout.strip():
        raise RuntimeError(f"bench {protocol} c={concurrency} failed: {proc.stderr.strip()[-300:]}")
    level = json.loads(proc.stdout)["levels"][0]
    return {"tokens_per_s": level["llm"]["output_tokens_per_s"], "ttft_p50_ms": level["llm"]["ttft_ms"]["p50"],
            "itl_p50_ms": level["llm"]["itl_ms"]["p50"], "stable": level["stable"], "errors": level["errors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--input-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None, help="r1deploy workdir to reuse (default: a temporary one)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from exporter.export import ExportConfig, export_model
    from exporter.repository import RepositoryConfig, write_repository
    from exporter.serve import ServerConfig, TritonServer, free_port

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    export_model(ExportConfig(model="r1-distill-tiny", workdir=work))
    repo = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort",
                                             workdir=work, out=work / "repo", onnx_variant="fp32")).out
    with TritonServer(ServerConfig(model_repository=repo)) as triton:
        port = free_port()
        gw = subprocess.Popen([str(R1DEPLOY), "-q", "gateway", "--triton", triton.endpoints.grpc, "--repository", str(repo),
                               "--port", str(port)], env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("gateway never became ready") from None
                    time.sleep(0.2)
            rows = []
            for c in levels:
                runs: dict[str, list[dict]] = {"grpc": [], "openai": []}
                for r in range(args.rounds):
                    order = ["grpc", "openai"] if (r + c) % 2 == 0 else ["openai", "grpc"]
                    for protocol in order:
                        url = triton.endpoints.grpc if protocol == "grpc" else f"127.0.0.1:{port}"
                        runs[protocol].append(bench(url, protocol, c, args, work / "bench" / f"{protocol}-c{c}-r{r}"))
                med = {p: {k: statistics.median(x[k] for x in v) for k in ("tokens_per_s", "ttft_p50_ms", "itl_p50_ms")}
                       for p, v in runs.items()}
                rows.append((c, med, runs))
        finally:
            gw.send_signal(signal.SIGTERM)
            gw.wait(timeout=30)
    print(f"machine: {platform.node()} {os.cpu_count()} cores; load after: {os.getloadavg()}")
    print(f"{'c':>3} {'direct tok/s':>13} {'gateway tok/s':>14} {'ratio':>6} {'TTFT p50 direct':>16} "
          f"{'TTFT p50 gateway':>17} {'added ms':>9}")
    for c, med, runs in rows:
        d, g = med["grpc"], med["openai"]
        print(f"{c:>3} {d['tokens_per_s']:>13.0f} {g['tokens_per_s']:>14.0f} {g['tokens_per_s'] / d['tokens_per_s']:>6.2f} "
              f"{d['ttft_p50_ms']:>16.2f} {g['ttft_p50_ms']:>17.2f} {g['ttft_p50_ms'] - d['ttft_p50_ms']:>9.2f}")
        unstable = [p for p, v in runs.items() for x in v if not x["stable"] or x["errors"]]
        if unstable:
            print(f"    note: c={c} had unstable or failing windows in {', '.join(sorted(set(unstable)))}")
    print(json.dumps([{"concurrency": c, **{p: m for p, m in med.items()}} for c, med, _ in rows]))


if __name__ == "__main__":
    main()
