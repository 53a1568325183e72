"""Soak the served `generate` model (in-flight batching scheduler, CPU Triton) and check that it survives:

1. 8 streaming clients × 500 requests each (gRPC streams), then 8 clients mixing streaming and whole requests
   (gRPC streams and HTTP /generate), with a CPU hog (`yes > /dev/null`) beside them;
2. 64 concurrent requests: no errors; then more requests at once than rows + queue hold: the excess is refused
   with "server busy", nothing else fails;
3. memory: the server's RSS (tritonserver and its python-backend stubs) after 500 more requests is within 10 % of
   its level after warm-up.

Each repeat starts a fresh server; the server must never die. Prints one line per phase and exits 1 on any miss.

    .venv/bin/python benchmarks/serving_soak.py [--repeats 5] [--requests 500] [--max-tokens 16] [--no-hog]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_scaling import CHANNELS, GrpcStreams, triton_request  # noqa: E402

from exporter.export import ExportConfig, export_model  # noqa: E402
from exporter.repository import RepositoryConfig, write_repository  # noqa: E402
from exporter.serve import ServerConfig, TritonServer  # noqa: E402


def rss_bytes(pid: int) -> int:
    import psutil

    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])


async def clients(srv, n_clients: int, per_client: int, max_tokens: int, mix: bool) -> tuple[int, list[str]]:
    import aiohttp

    streams = GrpcStreams(srv.endpoints.grpc)
    base = f"http://{srv.endpoints.http}"
    errors: list[str] = []
    done = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client(k: int):
            nonlocal done
            for i in range(per_client):
                prompt = f"client {k} request {i}: the cache of the model holds keys and values"
                try:
                    if mix and i % 2:
                        r = await triton_request(session, base, prompt, max_tokens, False)
                    else:
                        r = await streams(prompt, max_tokens)
                    if r["tokens"] != max_tokens:
                        errors.append(f"{r['tokens']} tokens, expected {max_tokens}")
                    done += 1
                except Exception as exc:  # noqa: BLE001 — counted and reported
                    errors.append(str(exc).splitlines()[0][:200])

        await asyncio.gather(*(client(k) for k in range(n_clients)))
    for channel in CHANNELS.pop(id(asyncio.get_running_loop()), []):
        await channel.close()
    return done, errors


def run(srv, coro):
    result = asyncio.run(coro)
    if srv.process.poll() is not None:
        raise SystemExit(f"FAIL: tritonserver died (exit {srv.process.returncode}); log {srv.log_path}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=500, help="per client in the streaming phase")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--queue", type=int, default=64)
    ap.add_argument("--no-hog", action="store_true")
    ap.add_argument("--graph", choices=["fused", "generic"], default="fused")
    ap.add_argument("--workdir", type=Path, default=REPO / "build" / "bench-soak")
    args = ap.parse_args()
    export_model(ExportConfig(model="r1-distill-tiny", workdir=args.workdir))
    if args.graph == "fused":
        export_model(ExportConfig(model="r1-distill-tiny", workdir=args.workdir, graph="fused"))
    repo = write_repository(RepositoryConfig(
        model="r1-distill-tiny", profile="edge", variant="python_ort", workdir=args.workdir,
        out=args.workdir / "repo", graph=args.graph, max_rows=args.rows, max_queue=args.queue,
    ))
    hog = None if args.no_hog else subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    failures = 0
    try:
        for rep in range(args.repeats):
            with TritonServer(ServerConfig(model_repository=repo.out)) as srv:
                t = time.perf_counter()
                done, errors = run(srv, clients(srv, 8, args.requests, args.max_tokens, mix=False))
                print(f"repeat {rep}: 8 streaming clients x {args.requests}: {done} ok, {len(errors)} errors "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
                t = time.perf_counter()
                done2, errors2 = run(srv, clients(srv, 8, args.requests // 2, args.max_tokens, mix=True))
                print(f"repeat {rep}: 8 mixed clients x {args.requests // 2}: {done2} ok, {len(errors2)} errors "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
                done3, errors3 = run(srv, clients(srv, 64, 1, args.max_tokens, mix=True))
                print(f"repeat {rep}: 64 concurrent: {done3} ok, {len(errors3)} errors", flush=True)
                over = args.rows + args.queue + 32
                done4, errors4 = run(srv, clients(srv, over, 1, 256, mix=False))
                busy = [e for e in errors4 if "server busy" in e]
                print(f"repeat {rep}: {over} at once (rows {args.rows} + queue {args.queue}): {done4} ok, "
                      f"{len(busy)} refused busy, {len(errors4) - len(busy)} other errors", flush=True)
                run(srv, clients(srv, 8, 8, args.max_tokens, mix=True))  # warm-up done: memory baseline
                base = rss_bytes(srv.pid)
                run(srv, clients(srv, 10, 50, args.max_tokens, mix=True))
                after = rss_bytes(srv.pid)
                growth = after / base - 1
                print(f"repeat {rep}: RSS after warm-up {base / 2**20:.0f} MiB, after 500 more requests "
                      f"{after / 2**20:.0f} MiB ({growth:+.1%})", flush=True)
                bad = (errors or errors2 or errors3 or (len(errors4) - len(busy)) or not busy or growth > 0.10)
                failures += bool(bad)
    finally:
        if hog is not None:
            hog.kill()
    print(f"{'FAIL' if failures else 'OK'}: {args.repeats - failures}/{args.repeats} repeats clean; "
          f"load {os.getloadavg()[0]:.1f}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
