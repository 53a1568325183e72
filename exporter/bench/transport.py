"""The wire: asyncio gRPC and HTTP clients for Triton's KServe v2 API, built for a low, even cost per request.

gRPC calls the raw `GRPCInferenceServiceStub` on a `grpc.aio` channel with a `ModelInferRequest` built once per
payload and reused — no tritonclient object per call (its `InferInput`/`InferResult` wrapping cost ~2× the CPU per
request here). HTTP posts a body built once (JSON header + binary tensors) through one aiohttp session.
Control calls (metadata, config, statistics, liveness) use the same protocol as the load.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Optional

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub
from tritonclient.utils import serialize_byte_tensor

from .inputs import Payload

_GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_CONTROL_TIMEOUT_S = 10.0


class FailedRequest(Exception):
    """A failed request; the message is the server's (or the transport's) one line."""


def _raw(array) -> bytes:
    if array.dtype == object:
        return serialize_byte_tensor(array).item()  # a 0-d object array holding the length-prefixed bytes
    return array.tobytes()


# (t_first_token, t_last_token, tokens) for a streamed request; t_* = 0.0 when no token came.
StreamOutcome = tuple[float, float, int]


class Transport:
    protocol = ""

    async def live(self) -> bool: ...
    async def metadata(self, model: str, version: str) -> pb.ModelMetadataResponse: ...
    async def config(self, model: str, version: str) -> mc.ModelConfig: ...
    async def statistics(self, model: str, version: str) -> pb.ModelStatisticsResponse: ...
    def infer_fn(self, model: str, version: str, payload: Payload, timeout_s: float) -> Callable[[], Awaitable[None]]: ...
    def stream_session(self, model: str, version: str, timeout_s: float) -> StreamSession: ...
    async def close(self) -> None: ...


class StreamSession:
    async def generate(self, payload: Payload) -> StreamOutcome: ...
    async def close(self) -> None: ...


def _grpc_message(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


class GrpcTransport(Transport):
    protocol = "grpc"

    def __init__(self, url: str):
        self.url = url
        self.channel = grpc.aio.insecure_channel(url, options=_GRPC_OPTIONS)
        self.stub = GRPCInferenceServiceStub(self.channel)

    async def live(self) -> bool:
        try:
            return (await self.stub.ServerLive(pb.ServerLiveRequest(), timeout=2.0)).live
        except grpc.aio.AioRpcError:
            return False

    async def _control(self, rpc, request):
        try:
            return await rpc(request, timeout=_CONTROL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise FailedRequest(_grpc_message(exc)) from None

    async def metadata(self, model, version):
        return await self._control(self.stub.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version))

    async def config(self, model, version):
        r = await self._control(self.stub.ModelConfig, pb.ModelConfigRequest(name=model, version=version))
        return r.config

    async def statistics(self, model, version):
        return await self._control(self.stub.ModelStatistics, pb.ModelStatisticsRequest(name=model, version=version))

    @staticmethod
    def request(model: str, version: str, payload: Payload) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=model, model_version=version)
        for t in payload.tensors:
            req.inputs.add(name=t.name, datatype=t.datatype, shape=list(t.array.shape))
            req.raw_input_contents.append(_raw(t.array))
        return req

    def infer_fn(self, model, version, payload, timeout_s):
        req = self.request(model, version, payload)
        call = self.stub.ModelInfer

        async def infer() -> None:
            try:
                await call(req, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise FailedRequest(_grpc_message(exc)) from None

        return infer

    def stream_session(self, model, version, timeout_s):
        return _GrpcStream(self, model, version, timeout_s)

    async def close(self):
        await self.channel.close(grace=None)


class _GrpcStream(StreamSession):
    """One bidirectional ModelStreamInfer stream per worker, one request at a time on it (like perf_analyzer)."""

    def __init__(self, transport: GrpcTransport, model: str, version: str, timeout_s: float):
        self.transport, self.timeout_s = transport, timeout_s
        self.model, self.version = model, version
        self.call = None
        self.requests: dict[int, pb.ModelInferRequest] = {}

    def _request(self, payload: Payload) -> pb.ModelInferRequest:
        req = self.requests.get(id(payload))
        if req is None:
            req = GrpcTransport.request(self.model, self.version, payload)
            # without it, the FINAL flag of a decoupled model's last (empty) response never reaches the client
            req.parameters["triton_enable_empty_final_response"].bool_param = True
            self.requests[id(payload)] = req
        return req

    async def _one(self, req) -> StreamOutcome:
        if self.call is None:
            self.call = self.transport.stub.ModelStreamInfer()
        call = self.call
        await call.write(req)
        first = last = 0.0
        tokens = 0
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise FailedRequest("stream closed by the server before the final response")
            if resp.error_message:
                raise FailedRequest(resp.error_message)
            ir = resp.infer_response
            n = 0
            for i, out in enumerate(ir.outputs):
                if out.name == "token_ids":
                    n = len(ir.raw_output_contents[i]) // 8 if i < len(ir.raw_output_contents) else 0
                    break
            else:
                if ir.outputs:
                    n = 1
            if n:
                last = time.perf_counter()
                if not tokens:
                    first = last
                tokens += n
            final = ir.parameters.get("triton_final_response")
            if final is None or final.bool_param:
                return first, last, tokens

    async def generate(self, payload: Payload) -> StreamOutcome:
        try:
            return await asyncio.wait_for(self._one(self._request(payload)), self.timeout_s)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, FailedRequest) as exc:
            await self.close()  # late responses of this request must not land on the next one
            if isinstance(exc, asyncio.TimeoutError):
                raise FailedRequest(f"timeout after {self.timeout_s:g} s") from None
            if isinstance(exc, grpc.aio.AioRpcError):
                raise FailedRequest(_grpc_message(exc)) from None
            raise

    async def close(self):
        if self.call is not None:
            self.call.cancel()
            self.call = None


class HttpTransport(Transport):
    protocol = "http"

    def __init__(self, url: str, connections: int = 0):
        import aiohttp

        self.aiohttp = aiohttp
        self.base = f"http://{url}"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections))
        # control calls get their own connection: on a pool as large as the concurrency they would wait for a
        # free connection that the busy workers keep taking back first
        self.control = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2))

    def _model_path(self, model: str, version: str) -> str:
        return f"{self.base}/v2/models/{model}" + (f"/versions/{version}" if version else "")

    async def _get_json(self, url: str, timeout_s: float = _CONTROL_TIMEOUT_S):
        try:
            async with self.control.get(url, timeout=self.aiohttp.ClientTimeout(total=timeout_s)) as r:
                body = await r.read()
                if r.status != 200:
                    raise FailedRequest(_http_error(r.status, body))
                return json.loads(body) if body else {}
        except (self.aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise FailedRequest(f"{type(exc).__name__}: {exc}") from None

    async def live(self) -> bool:
        try:
            await self._get_json(f"{self.base}/v2/health/live", timeout_s=2.0)
            return True
        except FailedRequest:
            return False

    async def metadata(self, model, version):
        data = await self._get_json(self._model_path(model, version))
        return json_format.ParseDict(data, pb.ModelMetadataResponse(), ignore_unknown_fields=True)

    async def config(self, model, version):
        data = await self._get_json(self._model_path(model, version) + "/config")
        return json_format.ParseDict(data, mc.ModelConfig(), ignore_unknown_fields=True)

    async def statistics(self, model, version):
        data = await self._get_json(self._model_path(model, version) + "/stats")
        return json_format.ParseDict(data, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    def infer_fn(self, model, version, payload, timeout_s):
        header = {
            "inputs": [
                {"name": t.name, "shape": list(t.array.shape), "datatype": t.datatype,
                 "parameters": {"binary_data_size": len(_raw(t.array))}}
                for t in payload.tensors
            ],
            "parameters": {"binary_data_output": True},
        }
        head = json.dumps(header).encode()
        body = head + b"".join(_raw(t.array) for t in payload.tensors)
        headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
        url = self._model_path(model, version) + "/infer"
        post, timeout = self.session.post, self.aiohttp.ClientTimeout(total=timeout_s)
        errors = (self.aiohttp.ClientError, asyncio.TimeoutError, OSError)

        async def infer() -> None:
            try:
                async with post(url, data=body, headers=headers, timeout=timeout) as r:
                    data = await r.read()
                    if r.status != 200:
                        raise FailedRequest(_http_error(r.status, data))
            except errors as exc:
                raise FailedRequest(_transport_error(exc, timeout_s)) from None

        return infer

    def stream_session(self, model, version, timeout_s):
        return _HttpStream(self, self._model_path(model, version) + "/generate_stream", timeout_s)

    async def close(self):
        await self.session.close()
        await self.control.close()


def _http_error(status: int, body: bytes) -> str:
    try:
        return f"HTTP {status}: {json.loads(body)['error']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


def _transport_error(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"timeout after {timeout_s:g} s"
    return f"{type(exc).__name__}: {exc}".strip()


class _HttpStream(StreamSession):
    """POST /generate_stream: one server-sent event per response; the connection closes after the last."""

    def __init__(self, transport: HttpTransport, url: str, timeout_s: float):
        self.transport, self.url, self.timeout_s = transport, url, timeout_s
        self.bodies: dict[int, bytes] = {}

    def _body(self, payload: Payload) -> bytes:
        body = self.bodies.get(id(payload))
        if body is None:
            doc = {}
            for t in payload.tensors:
                v = t.array.reshape(-1)[0]
                doc[t.name] = v.decode() if isinstance(v, bytes) else v.item()
            body = self.bodies[id(payload)] = json.dumps(doc).encode()
        return body

    async def generate(self, payload: Payload) -> StreamOutcome:
        aiohttp = self.transport.aiohttp
        first = last = 0.0
        tokens = 0
        try:
            async with self.transport.session.post(
                self.url, data=self._body(payload), headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as r:
                if r.status != 200:
                    raise FailedRequest(_http_error(r.status, await r.read()))
                async for line in r.content:
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise FailedRequest(f"HTTP stream: {event['error']}")
                    ids = event.get("token_ids")
                    n = len(ids) if isinstance(ids, list) else (1 if ids is not None or event.get("text_output") else 0)
                    if n:
                        last = time.perf_counter()
                        if not tokens:
                            first = last
                        tokens += n
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise FailedRequest(_transport_error(exc, self.timeout_s)) from None
        return first, last, tokens

    async def close(self):
        return None


class OpenAITransport(Transport):
    """An OpenAI-compatible endpoint (`r1deploy gateway`, vLLM, …): LLM load only, as streamed (or whole)
    /v1/completions; the model's "metadata" is what /v1/models lists, and there are no server statistics."""

    protocol = "openai"

    def __init__(self, url: str, connections: int = 0, api_key: Optional[str] = None):
        import aiohttp

        self.aiohttp = aiohttp
        self.base = (url if url.startswith(("http://", "https://")) else f"http://{url}").rstrip("/").removesuffix("/v1")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections))
        self.control = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2))

    async def _models(self, timeout_s: float = _CONTROL_TIMEOUT_S) -> list[str]:
        try:
            async with self.control.get(self.base + "/v1/models", headers=self.headers,
                                        timeout=self.aiohttp.ClientTimeout(total=timeout_s)) as r:
                body = await r.read()
                if r.status != 200:
                    raise FailedRequest(_http_error(r.status, body))
                return [m.get("id") for m in json.loads(body).get("data", [])]
        except (self.aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise FailedRequest(f"{type(exc).__name__}: {exc}") from None

    async def live(self) -> bool:
        try:
            await self._models(timeout_s=2.0)
            return True
        except FailedRequest:
            return False

    async def metadata(self, model, version):
        served = await self._models()
        if model not in served:
            raise FailedRequest(f"not served (models: {', '.join(served)})")
        meta = pb.ModelMetadataResponse(name=model, versions=["1"])
        for name, datatype in (("text_input", "BYTES"), ("max_tokens", "INT32"), ("stream", "BOOL")):
            meta.inputs.add(name=name, datatype=datatype, shape=[1])
        meta.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        return meta

    async def config(self, model, version):
        config = mc.ModelConfig(name=model, max_batch_size=0)
        config.model_transaction_policy.decoupled = True
        for name in ("max_tokens", "stream"):
            config.input.add(name=name, optional=True)
        return config

    async def statistics(self, model, version):
        return None

    def infer_fn(self, model, version, payload, timeout_s):
        raise FailedRequest("--protocol openai benchmarks LLMs only (generate-style models)")

    def stream_session(self, model, version, timeout_s):
        return _OpenAIStream(self, model, timeout_s)

    async def close(self):
        await self.session.close()
        await self.control.close()


class _OpenAIStream(StreamSession):
    """POST /v1/completions; tokens counted from the final usage (stream_options.include_usage), times from the
    events that carry text."""

    def __init__(self, transport: OpenAITransport, model: str, timeout_s: float):
        self.transport, self.model, self.timeout_s = transport, model, timeout_s
        self.bodies: dict[int, tuple[bytes, bool]] = {}

    def _body(self, payload: Payload) -> tuple[bytes, bool]:
        cached = self.bodies.get(id(payload))
        if cached is None:
            values = {t.name: t.array.reshape(-1)[0] for t in payload.tensors}
            text = values["text_input"]
            stream = bool(values.get("stream", True))
            doc = {"model": self.model, "prompt": text.decode() if isinstance(text, bytes) else str(text),
                   "max_tokens": int(payload.max_tokens or values.get("max_tokens", 16)), "stream": stream}
            if stream:
                doc["stream_options"] = {"include_usage": True}
            cached = self.bodies[id(payload)] = (json.dumps(doc).encode(), stream)
        return cached

    async def generate(self, payload: Payload) -> StreamOutcome:
        aiohttp = self.transport.aiohttp
        body, stream = self._body(payload)
        first = last = 0.0
        tokens = 0
        try:
            async with self.transport.session.post(
                self.transport.base + "/v1/completions", data=body, headers=self.transport.headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as r:
                if r.status != 200:
                    raise FailedRequest(_http_error(r.status, await r.read()))
                if not stream:
                    doc = json.loads(await r.read())
                    first = last = time.perf_counter()
                    return first, last, int(doc["usage"]["completion_tokens"])
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    if line.startswith(b"data: [DONE]"):
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise FailedRequest(f"stream: {event['error'].get('message')}")
                    if event.get("usage"):
                        tokens = int(event["usage"]["completion_tokens"])
                    if any(c.get("text") for c in event.get("choices", ())):
                        last = time.perf_counter()
                        if not first:
                            first = last
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError) as exc:
            raise FailedRequest(_transport_error(exc, self.timeout_s)) from None
        return first, last, tokens

    async def close(self):
        return None


def make_transport(protocol: str, url: str, connections: int = 0, api_key: Optional[str] = None) -> Transport:
    if protocol == "openai":
        return OpenAITransport(url, connections, api_key)
    return GrpcTransport(url) if protocol == "grpc" else HttpTransport(url, connections)


def open_stats(resp: Optional[pb.ModelStatisticsResponse]) -> Optional[tuple[int, ...]]:
    """(success count, queue ns, compute input/infer/output ns, inferences, executions), summed over versions."""
    if resp is None:
        return None
    totals = [0] * 7
    for s in resp.model_stats:
        i = s.inference_stats
        for k, v in enumerate((i.success.count, i.queue.ns, i.compute_input.ns, i.compute_infer.ns,
                               i.compute_output.ns, s.inference_count, s.execution_count)):
            totals[k] += v
    return tuple(totals)
