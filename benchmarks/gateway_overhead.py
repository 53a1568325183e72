"""What the OpenAI gateway costs: streaming tokens/s and TTFT through `r1deploy gateway` (POST /v1/completions,
server-sent events) against a direct Triton gRPC stream of the same `generate` model, with the same prompts,
output lengths and measurement rules, at each concurrency — measured with `r1deploy bench` both times
(`--protocol grpc` and `--protocol openai`), one after the other, the order flipping every round so that drift
favours neither.

The server is real: r1-distill-tiny exported, written as a python_ort repository (fp32) and served by the CPU
Triton; the gateway runs in its own process, as in the pod. On this 2-core machine the benchmark client, the
gateway and Triton share the cores, so the gateway's CPU cost shows up as lost throughput.

    .venv/bin/python benchmarks/gateway_overhead.py --concurrency 1,16 --duration 5 --rounds 2 \
        --aiperf /work/wt/_venvs/aiperf/bin/aiperf

With --aiperf (NVIDIA's OpenAI benchmark client, 0.13, in its own venv: `python -m venv V && V/bin/pip install
aiperf`), the same gateway is also measured by aiperf at each concurrency (synthetic prompts of the same token
length, the same max_tokens, server token counts), as a cross-check of `r1deploy bench --protocol openai`.
aiperf 0.13 quirks met here: with HF_HUB_OFFLINE=1 it treats a local tokenizer path as a hub repo id (so it runs
without it; nothing is downloaded from a local path), and its `builtin` tokenizer downloads tiktoken data.
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


def prompt_tokens(tokenizer_dir: Path, words: int, seed: int = 0) -> int:
    """Mean token count of the synthetic prompts `r1deploy bench` sends (--input-tokens counts words; this tiny
    vocabulary spends several tokens on a word), so that aiperf is given prompts of the same length."""
    import numpy as np
    from tokenizers import Tokenizer

    from exporter.bench.inputs import _words

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    return round(statistics.mean(len(tok.encode(_words(words, rng)).ids) for _ in range(64)))


def run_aiperf(binary: str, port: int, concurrency: int, tokenizer: Path, input_tokens: int, args, out: Path) -> dict:
    requests = max(40, int(args.aiperf_requests_per_conc * concurrency))
    cmd = [binary, "profile", "--model-names", "generate", "--url", f"http://127.0.0.1:{port}", "--endpoint-type",
           "completions", "--streaming", "--concurrency", str(concurrency), "--request-count", str(requests),
           "--warmup-request-count", str(2 * concurrency),
           "--prompt-input-tokens-mean", str(input_tokens), "--prompt-input-tokens-stddev", "0",
           "--prompt-output-tokens-mean", str(args.output_tokens), "--prompt-output-tokens-stddev", "0",
           "--tokenizer", str(tokenizer.resolve()), "--use-server-token-count", "--output-artifact-dir", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    export = out / "profile_export_aiperf.json"
    if proc.returncode != 0 or not export.is_file():
        raise RuntimeError(f"aiperf c={concurrency} failed: {(proc.stdout + proc.stderr).strip()[-400:]}")
    d = json.loads(export.read_text())
    return {"tokens_per_s": d["output_token_throughput"]["avg"], "ttft_p50_ms": d["time_to_first_token"]["p50"],
            "itl_p50_ms": d["inter_token_latency"]["p50"], "input_tokens": input_tokens}


def aiperf_tokenizer(src: Path, dest: Path) -> Path:
    """A copy of the tokenizer files that aiperf's loader takes (tokenizer_class spelled the way every
    transformers release reads it)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dest / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens", [])
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def ttft_probe(grpc_url: str, repo: Path, gateway: str, requests: int, input_words: int, output_tokens: int) -> dict:
    """TTFT p50 of `requests` sequential streamed requests: the gateway's own gRPC client calling Triton, then the
    same prompt through the gateway (raw aiohttp, first event with text) — what the gateway adds, without the
    load generator's windows."""
    import asyncio

    import aiohttp
    import numpy as np

    from exporter.bench.inputs import _words
    from exporter.gateway.models import read_repositories
    from exporter.gateway.triton import Generation, TritonClient, build_request

    model = read_repositories([repo])["generate"]
    rng = np.random.default_rng(0)
    prompts = [_words(input_words, rng) for _ in range(32)]

    async def run() -> dict:
        client = TritonClient(grpc_url)
        direct, via = [], []
        async with aiohttp.ClientSession() as session:
            for i in range(requests):
                prompt = prompts[i % len(prompts)]
                t0 = time.perf_counter()
                req = build_request(model, Generation(prompt=prompt, max_tokens=output_tokens, stream=True))
                async for chunk in client.generate(req):
                    if chunk.text:
                        direct.append(time.perf_counter() - t0)
                        break
                t0 = time.perf_counter()
                body = {"model": "generate", "prompt": prompt, "max_tokens": output_tokens, "stream": True}
                async with session.post(gateway + "/v1/completions", json=body) as r:
                    async for line in r.content:
                        if line.startswith(b"data: ") and b'"text": ""' not in line:
                            via.append(time.perf_counter() - t0)
                            break
        await client.close()
        return {"direct_ttft_p50_ms": statistics.median(direct) * 1e3, "gateway_ttft_p50_ms": statistics.median(via) * 1e3}

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--input-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None, help="r1deploy workdir to reuse (default: a temporary one)")
    ap.add_argument("--aiperf", default=None, help="aiperf binary (its own venv): cross-check the gateway figures")
    ap.add_argument("--aiperf-requests-per-conc", type=float, default=60.0)
    ap.add_argument("--probe", type=int, default=100, help="sequential requests of the TTFT probe (0: none)")
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
            probe = ttft_probe(triton.endpoints.grpc, repo, f"http://127.0.0.1:{port}", args.probe, args.input_tokens,
                               args.output_tokens) if args.probe else None
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
                if args.aiperf:
                    tok = aiperf_tokenizer(repo / "generate" / "1" / "tokenizer", work / "aiperf-tokenizer")
                    n_in = prompt_tokens(tok, args.input_tokens)
                    med["aiperf"] = run_aiperf(args.aiperf, port, c, tok, n_in, args, work / "aiperf" / f"c{c}")
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
        if "aiperf" in med:
            a = med["aiperf"]
            print(f"    aiperf on the gateway ({a['input_tokens']} prompt tokens): {a['tokens_per_s']:.0f} tok/s ({g['tokens_per_s'] / a['tokens_per_s']:.2f}x "
                  f"r1deploy/aiperf), TTFT p50 {a['ttft_p50_ms']:.2f} ms ({g['ttft_p50_ms'] / a['ttft_p50_ms']:.2f}x), "
                  f"ITL p50 {a['itl_p50_ms']:.2f} ms (r1deploy {g['itl_p50_ms']:.2f})")
        unstable = [p for p, v in runs.items() for x in v if not x["stable"] or x["errors"]]
        if unstable:
            print(f"    note: c={c} had unstable or failing windows in {', '.join(sorted(set(unstable)))}")
    if probe:
        print(f"TTFT probe ({args.probe} sequential requests): direct {probe['direct_ttft_p50_ms']:.2f} ms, through the "
              f"gateway {probe['gateway_ttft_p50_ms']:.2f} ms (+{probe['gateway_ttft_p50_ms'] - probe['direct_ttft_p50_ms']:.2f} ms)")
    print(json.dumps([{"concurrency": c, **{p: m for p, m in med.items()}} for c, med, _ in rows]))


if __name__ == "__main__":
    main()
