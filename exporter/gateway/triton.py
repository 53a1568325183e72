"""The gateway's only way to Triton: one gRPC `ModelStreamInfer` call per request (grpc.aio, the raw stub — no
tritonclient object per call), read until the FINAL response, cancelled when the client goes away (Triton then
cancels the request and `generate` stops decoding it)."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Optional

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub
from tritonclient.utils import serialize_byte_tensor, triton_to_np_dtype

from ..health import CHANNEL_OPTIONS, HEALTH_INPUT, Health, failed_rpc, health_request, read_health_response
from .models import ServedModel

_GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                 *CHANNEL_OPTIONS]


@dataclass
class Generation:
    """What one OpenAI request asks of `generate`, validated; None = the model's own default."""

    prompt: str
    max_tokens: int
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stream: bool = True
    skip_special_tokens: bool = True
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    top_k: Optional[int] = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1  # sequences generated (num_return_sequences): best_of when the gateway picks the best n
    logprobs: bool = False  # return_log_probs
    top_logprobs: int = 0
    guide_type: str = ""  # guided_decoding_guide_type: json_object | json_schema | regex | ebnf
    guide: str = ""


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str  # "" until the last response
    num_input_tokens: Optional[int] = None
    num_output_tokens: Optional[int] = None
    final: bool = False
    index: int = 0  # sequence_index: which choice
    logprobs: list[float] = field(default_factory=list)  # output_log_probs, per token
    top_ids: list[list[int]] = field(default_factory=list)  # top_logprob_ids, per token
    top_logprobs: list[list[float]] = field(default_factory=list)


class TritonError(Exception):
    """An error response from Triton or the model; `status` is the HTTP status the gateway answers with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def error_status(message: str) -> int:
    """The contract's error messages → HTTP status (busy 429; shutting down 503; a model's own failure 500;
    anything else names a bad parameter or a too long prompt: 400)."""
    text = message.strip().lower()
    if text.startswith("server busy"):
        return 429
    if ("shutting down" in text or "is not ready" in text or text.startswith("request for unknown model")
            or "is not healthy" in text or text.startswith("generate unhealthy")):
        # a dead or stopped model process is the server's fault, never the client's (Triton says "Stub process
        # 'cpu_0' is not healthy." with what its HTTP frontend answers as 400)
        return 503
    if text.startswith("generate failed"):
        return 500
    return 400


def build_request(model: ServedModel, g: Generation, request_id: str = "") -> pb.ModelInferRequest:
    """The one place a Triton request is shaped. Dtypes and shapes come from the model's config.pbtxt: a scalar is
    [1, 1] when max_batch_size > 0 (the contract's generate: max_batch_size 1) and [1] otherwise (the older
    max_batch_size 0 model); a string list [1, N] or [N]. Inputs the model does not declare are not sent (Triton
    rejects undeclared inputs), so one gateway serves both kinds of generate."""
    batched = model.max_batch_size > 0
    req = pb.ModelInferRequest(model_name=model.name, id=request_id)
    # without it, the FINAL flag of a decoupled model's last (empty) response never reaches the client
    req.parameters["triton_enable_empty_final_response"].bool_param = True

    def add(name: str, values: list) -> None:
        spec = model.inputs.get(name)
        if spec is None:
            return
        shape = [1, len(values)] if batched else [len(values)]
        if spec.datatype == "BYTES":
            array = np.array([v.encode("utf-8") for v in values], dtype=np.object_)
            raw = serialize_byte_tensor(array).item()
        else:
            raw = np.array(values, dtype=triton_to_np_dtype(spec.datatype)).tobytes()
        req.inputs.add(name=name, datatype=spec.datatype, shape=shape)
        req.raw_input_contents.append(raw)

    add("text_input", [g.prompt])
    add("max_tokens", [g.max_tokens])
    if g.temperature is not None:
        add("temperature", [g.temperature])
    if g.top_p is not None:
        add("top_p", [g.top_p])
    if g.seed is not None:
        add("seed", [g.seed])
    if g.stop:
        add("stop_words" if "stop_words" in model.inputs else "stop", g.stop)
    add("stream", [g.stream])
    if g.ignore_eos:
        add("ignore_eos", [True])
    add("skip_special_tokens", [g.skip_special_tokens])
    # sampling fields are sent only when set: parse_request refused them already where the model lacks the input
    for name, value in (("presence_penalty", g.presence_penalty), ("frequency_penalty", g.frequency_penalty),
                        ("repetition_penalty", g.repetition_penalty), ("min_tokens", g.min_tokens),
                        ("top_k", g.top_k)):
        if value is not None:
            add(name, [value])
    if g.logit_bias:
        add("logit_bias", [json.dumps({str(k): v for k, v in sorted(g.logit_bias.items())})])
    if g.n != 1:
        add("num_return_sequences", [g.n])
    if g.logprobs:
        add("return_log_probs", [True])
    if g.top_logprobs:
        add("top_logprobs", [g.top_logprobs])
    if g.guide_type:
        add("guided_decoding_guide_type", [g.guide_type])
        add("guided_decoding_guide", [g.guide])
    add("exclude_input_in_output", [True])
    add("return_num_input_tokens", [True])
    add("return_num_output_tokens", [True])
    return req


def _bytes_elements(raw: bytes) -> list[bytes]:
    out, at = [], 0
    while at + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return out


def parse_response(resp: pb.ModelInferResponse) -> Chunk:
    chunk = Chunk("", [], "")
    for i, out in enumerate(resp.outputs):
        raw = resp.raw_output_contents[i] if i < len(resp.raw_output_contents) else b""
        if out.name == "text_output":
            chunk.text = b"".join(_bytes_elements(raw)).decode("utf-8", errors="replace")
        elif out.name == "finish_reason":
            chunk.finish_reason = b"".join(_bytes_elements(raw)).decode("utf-8", errors="replace")
        elif out.name == "token_ids":
            chunk.token_ids = np.frombuffer(raw, dtype=triton_to_np_dtype(out.datatype)).astype(int).tolist()
        elif out.name in ("num_input_tokens", "num_output_tokens") and raw:
            value = int(np.frombuffer(raw, dtype=triton_to_np_dtype(out.datatype)).reshape(-1)[0])
            setattr(chunk, out.name, value)
        elif out.name == "sequence_index" and raw:
            chunk.index = int(np.frombuffer(raw, dtype=triton_to_np_dtype(out.datatype)).reshape(-1)[0])
        elif out.name == "output_log_probs":
            chunk.logprobs = np.frombuffer(raw, dtype=triton_to_np_dtype(out.datatype)).astype(float).tolist()
        elif out.name in ("top_logprob_ids", "top_logprobs"):
            shape = list(out.shape)[-2:]  # [1, N, K]
            values = np.frombuffer(raw, dtype=triton_to_np_dtype(out.datatype)).reshape(shape)
            if out.name == "top_logprob_ids":
                chunk.top_ids = values.astype(int).tolist()
            else:
                chunk.top_logprobs = values.astype(float).tolist()
    final = resp.parameters.get("triton_final_response")
    chunk.final = final is None or final.bool_param
    return chunk


class TritonClient:
    def __init__(self, url: str):
        self.url = url
        self.channel = grpc.aio.insecure_channel(url, options=_GRPC_OPTIONS)
        self.stub = GRPCInferenceServiceStub(self.channel)
        self.open_calls: dict[str, set] = {}  # model → its calls in flight (to end them when the model is unhealthy)
        self._aborted: dict[int, str] = {}  # id(call) → why it was ended

    async def health(self, model: ServedModel, timeout_s: float) -> Health:
        """One probe of `model` (exporter/health.py); Triton's model readiness where it has no probe input."""
        started = time.monotonic()
        try:
            if HEALTH_INPUT not in model.inputs:
                ready = (await self.stub.ModelReady(pb.ModelReadyRequest(name=model.name), timeout=timeout_s)).ready
                return Health(ready, "" if ready else f"model {model.name} is not ready", time.monotonic() - started)
            call = self.stub.ModelStreamInfer(timeout=timeout_s)
            await call.write(health_request(model.name, model.max_batch_size > 0))
            await call.done_writing()
            resp = await call.read()
            if resp is grpc.aio.EOF:
                return Health(False, "Triton closed the stream without an answer", time.monotonic() - started)
            answer = read_health_response(resp, started)
            # read the stream to its end (exporter/health.py.probe: a stream left open kept Triton from unloading)
            while await call.read() is not grpc.aio.EOF:
                pass
            return answer
        except grpc.aio.AioRpcError as exc:
            return failed_rpc(model.name, exc.code().name, f"{self.url}: {exc.details() or ''}", timeout_s, started)

    def abort(self, model: str, why: str) -> int:
        """End every call in flight to `model`: each raises TritonError(why, 503) to its reader. Returns how many."""
        calls = list(self.open_calls.get(model, ()))
        for call in calls:
            self._aborted[id(call)] = why
            call.cancel()
        return len(calls)

    async def ready(self, models: list[str], timeout_s: float = 2.0) -> tuple[bool, str]:
        """(ready, why not): the server and every model ready."""
        try:
            if not (await self.stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout_s)).ready:
                return False, "Triton is not ready"
            for name in models:
                if not (await self.stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=timeout_s)).ready:
                    return False, f"model {name} is not ready"
        except grpc.aio.AioRpcError as exc:
            return False, f"Triton at {self.url} unreachable: {exc.code().name}"
        return True, ""

    async def generate(self, request: pb.ModelInferRequest, timeout_s: Optional[float] = None) -> AsyncIterator[Chunk]:
        """The responses of one request, the FINAL one last. Leaving the loop early (the client went away, a
        task was cancelled) cancels the gRPC call, which cancels the request in Triton."""
        call = self.stub.ModelStreamInfer(timeout=timeout_s)
        finished = False
        calls = self.open_calls.setdefault(request.model_name, set())
        calls.add(call)
        try:
            await call.write(request)
            await call.done_writing()
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise TritonError("Triton closed the stream before the final response", 502)
                if resp.error_message:
                    finished = True
                    raise TritonError(resp.error_message, error_status(resp.error_message))
                chunk = parse_response(resp.infer_response)
                if chunk.final:
                    finished = True
                yield chunk
                if finished:
                    return
        except grpc.aio.AioRpcError as exc:
            finished = True
            why = self._aborted.pop(id(call), None)
            if why is not None:
                raise TritonError(why, 503) from None
            code = exc.code()
            status = 503 if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED) else (
                504 if code is grpc.StatusCode.DEADLINE_EXCEEDED else 502)
            raise TritonError(f"Triton at {self.url}: {code.name}: {exc.details()}", status) from None
        except asyncio.CancelledError:
            why = self._aborted.pop(id(call), None)
            if why is None:
                raise
            finished = True
            raise TritonError(why, 503) from None
        finally:
            calls.discard(call)
            self._aborted.pop(id(call), None)
            if not finished:
                call.cancel()

    async def infer(self, request: pb.ModelInferRequest, timeout_s: Optional[float] = None) -> pb.ModelInferResponse:
        """One unary request (a model that is not decoupled: the embedding ensemble, an encoder)."""
        try:
            return await self.stub.ModelInfer(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code is grpc.StatusCode.INVALID_ARGUMENT:
                status = error_status(details)
            elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                status = 503
            else:
                status = 504 if code is grpc.StatusCode.DEADLINE_EXCEEDED else 500
            raise TritonError(f"Triton at {self.url}: {code.name}: {details}", status) from None

    async def close(self) -> None:
        await self.channel.close(grace=None)


async def aclose_quietly(agen) -> None:
    """Close an async generator (cancelling its Triton call) without raising."""
    try:
        await agen.aclose()
    except (Exception, asyncio.CancelledError):  # noqa: BLE001 — closing after an error already reported
        pass
