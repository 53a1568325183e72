"""Served LLM tokens/s (Triton `generate` over gRPC streaming, greedy) against the same ONNX model run in-process
with an ONNX Runtime greedy loop. One run over a fixed prompt set; prints both rates and their ratio.

    .venv/bin/python benchmarks/served_vs_inprocess.py [--workdir build] [--max-tokens 64] [--engine-call both]

The served side is the python_ort repository of r1-distill-tiny (edge profile, fp32 ONNX) on the CPU Triton
bundled with nvidia-pytriton; requests go one at a time, as the in-process loop runs, so the ratio is the cost
of serving (tokenizer, python backend, one gRPC response per token), not of batching. Both sides run ONNX
Runtime with one intra-op thread (the fastest setting for this model here). The two sides alternate for
`--rounds` rounds over the same prompts and the median of each is compared, so that load from other processes
on a small machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.export import ExportConfig, export_model  # noqa: E402
from exporter.repository import RepositoryConfig, parse, write_repository  # noqa: E402
from exporter.repository.reference import GreedyLoop  # noqa: E402
from exporter.serve import ServerConfig, TritonServer  # noqa: E402
from exporter.tiny_models import CORPUS  # noqa: E402

MODEL = "r1-distill-tiny"


def served_client(server: TritonServer, max_tokens: int):
    """A gRPC streaming client: `one(prompt) -> token ids`, and a `close()`."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.endpoints.grpc)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))

    def one(prompt: str) -> list[int]:
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        mt = grpcclient.InferInput("max_tokens", [1], "INT32")
        mt.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
        stream = grpcclient.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        client.async_stream_infer("generate", [text, mt, stream])
        tokens = []
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise RuntimeError(str(error))
            tokens += result.as_numpy("token_ids").tolist()
            if result.as_numpy("finish_reason")[0]:
                return tokens

    def close() -> None:
        client.stop_stream()
        client.close()

    return one, close


def timed(fn, items) -> tuple[list, float]:
    started = time.perf_counter()
    out = [fn(x) for x in items]
    return out, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("build"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine-call", choices=["inprocess", "bls", "both"], default="both")
    args = ap.parse_args()

    export_model(ExportConfig(model=MODEL, workdir=args.workdir))
    prompts = [line.split("\n")[0] for line in CORPUS[: args.prompts]]
    calls = ["inprocess", "bls"] if args.engine_call == "both" else [args.engine_call]
    report = {"model": MODEL, "prompts": len(prompts), "max_tokens": args.max_tokens, "served": {}}
    inprocess_rates: list[float] = []
    for call in calls:
        repo = write_repository(RepositoryConfig(
            model=MODEL, profile="edge", variant="python_ort", engine_call=call, onnx_variant="fp32",
            workdir=args.workdir, out=args.workdir / MODEL / "model_repository" / f"bench-{call}",
        ))
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(repo.out / "generate/1/tokenizer/tokenizer.json"))
        generate_cfg = parse((repo.out / "generate/config.pbtxt").read_text(), "generate")
        eos = set(json.loads(generate_cfg.parameters["eos_token_ids"].string_value))
        ids = [tok.encode(p).ids for p in prompts]
        loop = GreedyLoop(repo.out / "llm/1/model.onnx", intra_op_num_threads=1)
        expected = [loop(i, args.max_tokens, eos) for i in ids]  # also the warm-up
        n_tokens = sum(map(len, expected))
        served_rates = []
        with TritonServer(ServerConfig(model_repository=repo.out)) as server:
            one, close = served_client(server, args.max_tokens)
            try:
                one(prompts[0])  # warm-up
                for _ in range(args.rounds):
                    ref, ref_s = timed(partial(loop, max_tokens=args.max_tokens, eos_ids=eos), ids)
                    served, served_s = timed(one, prompts)
                    if served != expected or ref != expected:
                        raise SystemExit(f"served tokens ({call}) differ from the in-process greedy loop")
                    inprocess_rates.append(n_tokens / ref_s)
                    served_rates.append(n_tokens / served_s)
            finally:
                close()
        report["tokens_per_round"] = n_tokens
        median = statistics.median(served_rates)
        report["served"][call] = {
            "tokens_per_s": round(median, 1),
            "rounds": [round(r, 1) for r in served_rates],
            "ratio": round(median / statistics.median(inprocess_rates[-args.rounds:]), 3),
        }
    report["inprocess_tokens_per_s"] = round(statistics.median(inprocess_rates), 1)
    report["inprocess_rounds"] = [round(r, 1) for r in inprocess_rates]
    print(json.dumps(report, indent=2))
    for call, r in report["served"].items():
        print(f"served ({call}): {r['tokens_per_s']:.0f} tok/s  vs in-process ORT greedy loop: ratio {r['ratio']:.2f}x "
              f"(goal >= 0.8x)")
    print(f"in-process: {report['inprocess_tokens_per_s']:.0f} tok/s (median)")


if __name__ == "__main__":
    main()
