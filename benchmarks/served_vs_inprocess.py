"""Served LLM tokens/s (Triton `generate` over gRPC streaming, greedy) against the same ONNX model run in-process
with an ONNX Runtime greedy loop. One run over a fixed prompt set; prints the rates, their ratio and what serving
adds per token.

    .venv/bin/python benchmarks/served_vs_inprocess.py [--workdir build] [--max-tokens 64] [--engine-call both]

The served side is the python_ort repository of r1-distill-tiny (edge profile, fp32 ONNX) on the CPU Triton
bundled with nvidia-pytriton; requests go one at a time, as the in-process loop runs, so the ratio is the cost
of serving (tokenizer, python backend, one gRPC response per token), not of batching. Measured: gRPC streaming
(one response per token) for engine_call inprocess and bls, and — for inprocess — the whole completion in one
HTTP /generate response, which separates the per-token response cost from the rest. Both sides run ONNX Runtime
with one intra-op thread (the fastest setting for this model here). The sides alternate for `--rounds` rounds
over the same prompts and medians are compared, so that load from other processes hits both alike; every served
answer is checked token for token against the in-process loop.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import struct
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
from exporter.tiny_models import reproduction_cases  # noqa: E402

MODEL = "r1-distill-tiny"


def stream_client(endpoint: str, max_tokens: int):
    """gRPC streaming (`ModelStreamInfer`) with the raw protobuf stubs tritonclient ships: `one(prompt) -> token
    ids` and `close()`. tritonclient's InferResult costs ~200 µs of client CPU per chunk here, on the same 2 cores
    as the server; reading raw_output_contents directly costs ~90 µs."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(endpoint)
    requests: queue.SimpleQueue = queue.SimpleQueue()
    responses = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests.get, None))
    tensor = pb.ModelInferRequest.InferInputTensor

    def one(prompt: str) -> list[int]:
        text = prompt.encode()
        requests.put(pb.ModelInferRequest(
            model_name="generate",
            inputs=[tensor(name="text_input", datatype="BYTES", shape=[1]),
                    tensor(name="max_tokens", datatype="INT32", shape=[1]),
                    tensor(name="stream", datatype="BOOL", shape=[1])],
            raw_input_contents=[struct.pack("<I", len(text)) + text, struct.pack("<i", max_tokens), b"\x01"],
        ))
        tokens: list[int] = []
        for r in responses:
            if r.error_message:
                raise RuntimeError(r.error_message)
            out = {o.name: raw for o, raw in zip(r.infer_response.outputs, r.infer_response.raw_output_contents, strict=True)}
            tokens += np.frombuffer(out["token_ids"], dtype=np.int64).tolist()
            if len(out["finish_reason"]) > 4:  # a BYTES element is a 4-byte length and the bytes
                return tokens
        raise RuntimeError("the stream ended without a final response")

    def close() -> None:
        requests.put(None)
        channel.close()

    return one, close


def http_client(endpoint: str, max_tokens: int):
    """One response per request: POST /v2/models/generate/generate (stream false), on one kept-alive connection."""
    import http.client

    conn = http.client.HTTPConnection(endpoint, timeout=120)

    def one(prompt: str) -> list[int]:
        conn.request("POST", "/v2/models/generate/generate", body=json.dumps({"text_input": prompt, "max_tokens": max_tokens}))
        reply = json.loads(conn.getresponse().read())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["token_ids"]

    return one, conn.close


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
    # corpus prompts of the trained model (chat turns first): each continues with its corpus text, up to 64 tokens
    prompts = [prompt for prompt, _ in reproduction_cases()[: args.prompts]]
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
        modes = {"grpc_stream": stream_client}
        if call == "inprocess":
            modes["http_whole"] = http_client
        rates: dict[str, list[float]] = {m: [] for m in modes}
        with TritonServer(ServerConfig(model_repository=repo.out)) as server:
            clients = {m: make(server.endpoints.grpc if m == "grpc_stream" else server.endpoints.http, args.max_tokens)
                       for m, make in modes.items()}
            try:
                for one, _ in clients.values():
                    one(prompts[0])  # warm-up
                for _ in range(args.rounds):
                    ref, ref_s = timed(partial(loop, max_tokens=args.max_tokens, eos_ids=eos), ids)
                    inprocess_rates.append(n_tokens / ref_s)
                    for m, (one, _) in clients.items():
                        served, served_s = timed(one, prompts)
                        if served != expected or ref != expected:
                            raise SystemExit(f"served tokens ({call}, {m}) differ from the in-process greedy loop")
                        rates[m].append(n_tokens / served_s)
            finally:
                for _, close in clients.values():
                    close()
        report["tokens_per_round"] = n_tokens
        inprocess_median = statistics.median(inprocess_rates[-args.rounds:])
        for m, r in rates.items():
            median = statistics.median(r)
            report["served"][f"{call}/{m}"] = {
                "tokens_per_s": round(median, 1),
                "rounds": [round(x, 1) for x in r],
                "ratio": round(median / inprocess_median, 3),
                "serving_us_per_token": round((1 / median - 1 / inprocess_median) * 1e6),
            }
    report["inprocess_tokens_per_s"] = round(statistics.median(inprocess_rates), 1)
    report["inprocess_rounds"] = [round(r, 1) for r in inprocess_rates]
    print(json.dumps(report, indent=2))
    for call, r in report["served"].items():
        print(f"served ({call}): {r['tokens_per_s']:.0f} tok/s, ratio {r['ratio']:.2f}x vs the in-process ORT greedy loop "
              f"(goal >= 0.8x); serving adds {r['serving_us_per_token']} us/token")
    print(f"in-process: {report['inprocess_tokens_per_s']:.0f} tok/s (median)")


if __name__ == "__main__":
    main()
