"""What structured output costs: output tokens/s of r1deploy's `generate` (CPU Triton, the tiny model) with every
request constrained by a JSON schema against the same requests unconstrained, at concurrency 1 and 16, in one run.

    .venv/bin/python benchmarks/structured_output.py [--levels 1,16] [--max-tokens 64] [--rounds 3]

Both arms send the same prompts over Triton's HTTP generate with `ignore_eos` and the same max_tokens, so they
generate the same number of tokens; the constrained arm adds `guided_decoding_guide_type: json_schema` with a
schema that cannot be complete within max_tokens (an array of at least 50 objects, each an enum and a bounded
integer, or a string of at least 400 characters), so every token of every request is masked by its grammar. The
arms alternate round by round (the machine is shared: alternating spreads its load over both); the median round
is reported, and the spread. A warm-up request per arm compiles the grammar (xgrammar is loaded on the first
guided request) before anything is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_scaling import closed_loop, cpu_seconds, prompts, summarise  # noqa: E402

from exporter.export import ExportConfig, export_model  # noqa: E402
from exporter.repository import RepositoryConfig, write_repository  # noqa: E402
from exporter.serve import ServerConfig, TritonServer  # noqa: E402

SCHEMAS = {
    "array_of_objects": {"type": "array", "minItems": 50, "items": {
        "type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                         "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["color", "n"], "additionalProperties": False}},
    "long_string": {"type": "object", "properties": {"text": {"type": "string", "minLength": 400}},
                    "required": ["text"]},
}


async def request(session, base: str, prompt: str, max_tokens: int, schema: dict | None) -> dict:
    body = {"text_input": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    if schema is not None:
        body.update(guided_decoding_guide_type="json_schema", guided_decoding_guide=json.dumps(schema))
    start = time.perf_counter()
    async with session.post(f"{base}/v2/models/generate/generate", json=body) as r:
        data = await r.json()
    if "error" in data:
        raise RuntimeError(data["error"])
    ids = data["token_ids"]
    return {"latency": time.perf_counter() - start, "tokens": len(ids) if isinstance(ids, list) else 1, "stamps": []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=REPO / "build" / "bench-structured")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    wd = args.workdir
    export_model(ExportConfig(model="r1-distill-tiny", workdir=wd))
    export_model(ExportConfig(model="r1-distill-tiny", workdir=wd, graph="fused"))
    repo = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort", workdir=wd,
                                             out=wd / "repo", graph="fused", max_rows=max(levels),
                                             max_queue=4 * max(levels)))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(repo.out / "generate/1/tokenizer/tokenizer.json"))
    texts = prompts(4 * max(levels) + 16, args.prompt_tokens, 0, tokenizer)
    print(f"# {platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; r1-distill-tiny, fused graph; "
          f"prompts of {args.prompt_tokens} tokens, {args.max_tokens} new (ignore_eos)", flush=True)
    results: dict = {"machine": {"cores": os.cpu_count(), "load_at_start": os.getloadavg()[0]}, "levels": {}}
    with TritonServer(ServerConfig(model_repository=repo.out)) as srv:
        base = f"http://{srv.endpoints.http}"
        arms = {"free": None, **SCHEMAS}
        for schema in arms.values():  # warm-up: grammar compiled, xgrammar loaded
            asyncio.run(closed_loop(lambda s, t, sc=schema: request(s, base, t, args.max_tokens, sc), texts[:1], 1))
        for c in levels:
            n = max(16, 2 * c)
            rows: dict = {name: [] for name in arms}
            for _ in range(args.rounds):
                for name, schema in arms.items():
                    cpu0 = cpu_seconds(srv.pid)
                    wall, res = asyncio.run(closed_loop(
                        lambda s, t, sc=schema: request(s, base, t, args.max_tokens, sc), texts[:n], c))
                    rows[name].append(summarise(wall, res, cpu_seconds(srv.pid) - cpu0))
            level = results["levels"][str(c)] = {}
            for name, runs in rows.items():
                tps = sorted(r["tokens_per_s"] for r in runs)
                level[name] = {"tokens_per_s": float(np.median(tps)), "min": tps[0], "max": tps[-1],
                               "p50_ms": float(np.median([r["p50_ms"] for r in runs]))}
                print(f"c={c:3d} {name:17s} {level[name]['tokens_per_s']:7.0f} tok/s (rounds {tps[0]:.0f}–{tps[-1]:.0f})"
                      f"  p50 {level[name]['p50_ms']:7.1f} ms  vs free {level[name]['tokens_per_s'] / level['free']['tokens_per_s']:.2f}",
                      flush=True)
    results["load_at_end"] = os.getloadavg()[0]
    print(f"# load at end {results['load_at_end']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
