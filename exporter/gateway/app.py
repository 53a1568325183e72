"""The OpenAI-compatible gateway: an aiohttp application in front of Triton's gRPC streaming API.

Routes: GET /v1/models[/{id}], POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings (encoder
models), POST /tokenize and /detokenize (vLLM's), GET /health, GET /metrics.
The gateway holds no model: it renders prompts (chat template), counts tokens and checks limits with the
tokenizer files of the model repository, forwards a request it has validated field by field (never the client's
body), and turns `generate`'s responses back into OpenAI objects or server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aiohttp import web

from ..health import PROBE_TIMEOUT_S, Verdict
from .embeddings import EmbeddingModel, embed, parse_embedding_request, read_embedding_models
from .fields import CHAT, COMPLETIONS, check_fields
from .http_errors import JsonErrorRunner, error_headers
from .metrics import Metrics
from .models import THINK_END, THINK_START, ServedModel, read_repositories
from .protocol import (
    ApiError,
    Parsed,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    new_id,
    now,
    parse_body,
    parse_request,
    reasoning_fields,
    usage,
)
from .reasoning import ReasoningSplitter
from .special import SpecialTokenFilter
from .tokens import detokenize, tokenize
from .tools import answer_parser, split_answer, tool_call_delta
from .triton import Chunk, TritonClient, TritonError, aclose_quietly, build_request

log = logging.getLogger("r1deploy.gateway")
# the model id a request named, for the metrics (a typed key where aiohttp has them)
MODEL_ID = web.RequestKey("model_id", str) if hasattr(web, "RequestKey") else "model_id"
_KEYED = {"/tokenize", "/detokenize"}  # outside /v1 (vLLM's paths) but the API's, so behind the keys too
ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize", "/detokenize",
             "/health", "/health/live", "/metrics"}


@dataclass
class GatewayConfig:
    triton: str  # HOST:PORT of Triton's gRPC endpoint
    repositories: list[Path]
    host: str = "127.0.0.1"
    port: int = 9000  # 0: a free port
    api_keys: list[str] = field(default_factory=list, repr=False)  # empty: no authentication
    served_model_names: list[str] = field(default_factory=list)
    sampling: dict[str, float] = field(default_factory=dict)  # the profile's default temperature / top_p
    max_body_bytes: int = 1 << 20
    max_json_depth: int = 32
    request_timeout_s: float = 600.0
    # the model-health monitor (exporter/health.py): a probe of each model this often, this long to answer, and
    # this many unanswered probes in a row before the model counts as unhealthy (an error answer counts at once)
    health_interval_s: float = 1.0
    health_timeout_s: float = PROBE_TIMEOUT_S
    health_patience: int = 2


class Gateway:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self.embedders: dict[str, EmbeddingModel] = read_embedding_models(cfg.repositories)
        self.models: dict[str, ServedModel] = read_repositories(cfg.repositories, cfg.served_model_names,
                                                                require=not self.embedders)
        for model in [*self.models.values(), *self.embedders.values()]:
            _ = model.tokenizer  # loaded now: a missing tokenizer is bad input at start, not a first slow request
        self._keys = [k.encode() for k in cfg.api_keys]
        self.metrics = Metrics()
        self.client: Optional[TritonClient] = None
        # one verdict per Triton LLM model (several OpenAI ids may reach one)
        self.engines: dict[str, ServedModel] = {m.name: m for m in self.models.values()}
        self.verdicts = {name: Verdict(cfg.health_patience) for name in self.engines}
        self._monitor: Optional[asyncio.Task] = None

    # ---- application ----------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[self._middleware])
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/live", self.live)
        app.router.add_get("/metrics", self.prometheus)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app) -> None:
        self.client = TritonClient(self.cfg.triton)
        self._monitor = asyncio.get_running_loop().create_task(self._watch_models())

    async def _cleanup(self, app) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
        if self.client is not None:
            await self.client.close()

    # ---- model health -----------------------------------------------------------------------------------------
    async def _probe(self, name: str) -> None:
        verdict = self.verdicts[name]
        health = await self.client.health(self.engines[name], self.cfg.health_timeout_s)
        if not verdict.update(health):
            return
        if verdict.healthy:
            log.warning("model %s is healthy again", name)
        else:
            # every open stream of the model ends now with an error event and [DONE]; new requests get 503
            ended = self.client.abort(name, f"model {name} is unhealthy: {verdict.why}")
            log.warning("model %s is unhealthy (%s); %d request(s) in flight ended", name, verdict.why, ended)

    async def _watch_models(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.gather(*(self._probe(name) for name in self.verdicts), return_exceptions=True)
            await asyncio.sleep(max(0.05, self.cfg.health_interval_s - (time.monotonic() - started)))

    def _gate(self, model: ServedModel) -> None:
        verdict = self.verdicts.get(model.name)
        if verdict is not None and verdict.healthy is False:
            raise ApiError(503, f"model {model.name} is unhealthy: {verdict.why}; retry shortly", code="model_unhealthy")

    def _authorized(self, header: str) -> bool:
        if not self._keys:
            return True
        given = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        ok = False
        for key in self._keys:  # every key compared, each in constant time: no early exit to time
            ok |= hmac.compare_digest(given, key)
        return ok

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        endpoint = request.path if request.path in ENDPOINTS else (
            "/v1/models" if request.path.startswith("/v1/models/") else "other")
        status = 500
        try:
            if (request.path.startswith("/v1/") or request.path in _KEYED) and not self._authorized(request.headers.get("Authorization", "")):
                raise ApiError(401, "Invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
            response = await handler(request)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            return web.json_response(exc.body(), status=exc.status, headers=error_headers(exc))
        except web.HTTPException as exc:
            status = exc.status
            if exc.status == 413:
                message = f"request body larger than {self.cfg.max_body_bytes} bytes"
            elif exc.status == 404:
                message = f"no route {request.method} {request.path}"
            else:
                message = exc.reason
            return web.json_response(ApiError(exc.status, message).body(), status=exc.status)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's convention); nothing is sent
            raise
        finally:
            if endpoint not in ("/metrics", "/health", "/health/live"):
                self.metrics.request(endpoint, request.get(MODEL_ID, ""), status)

    # ---- small endpoints --------------------------------------------------------------------------------------
    def _model_object(self, model_id: str, model: ServedModel) -> dict:
        return {"id": model_id, "object": "model", "created": model.created, "owned_by": "r1deploy",
                "root": model.name, "max_model_len": model.limits.max_sequence_len}

    def _embedder_object(self, model_id: str, model: EmbeddingModel) -> dict:
        return {"id": model_id, "object": "model", "created": model.created, "owned_by": "r1deploy",
                "root": model.name, "max_model_len": model.max_length}

    def _all_models(self) -> dict[str, dict]:
        objects = {i: self._model_object(i, m) for i, m in self.models.items()}
        objects.update({i: self._embedder_object(i, m) for i, m in self.embedders.items()})
        return objects

    async def list_models(self, request):
        data = [obj for _, obj in sorted(self._all_models().items())]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request):
        model_id = request.match_info["model"]
        objects = self._all_models()
        if model_id not in objects:
            raise ApiError(404, f"The model `{model_id}` does not exist", "model", "model_not_found")
        return web.json_response(objects[model_id])

    async def embeddings(self, request):
        body = parse_body(await request.read(), self.cfg.max_json_depth)
        r = parse_embedding_request(body, self.embedders, self.models)
        request[MODEL_ID] = r.model_id
        try:
            doc = await embed(self.client, r, self.cfg.request_timeout_s)
        except TritonError as exc:
            raise ApiError(exc.status, str(exc)) from None
        self.metrics.tokens(r.model_id, sum(r.counts), 0)
        return web.json_response(doc)

    async def tokenize(self, request):
        body = parse_body(await request.read(), self.cfg.max_json_depth)
        return web.json_response(tokenize(body, self.models, self.embedders))

    async def detokenize(self, request):
        body = parse_body(await request.read(), self.cfg.max_json_depth)
        return web.json_response(detokenize(body, self.models, self.embedders))

    async def health(self, request):
        """Ready: Triton and every model ready, and every LLM model answering its health probe (exporter/health.py) —
        Triton's own readiness stays green when a model's process is dead."""
        ready, why = await self.client.ready(sorted({*self.engines, *(m.name for m in self.embedders.values())}))
        if not ready:
            raise ApiError(503, why)
        for name, verdict in sorted(self.verdicts.items()):
            if verdict.healthy is None:  # not probed yet: ask now
                await self._probe(name)
            if verdict.healthy is False:
                raise ApiError(503, f"model {name} is unhealthy: {verdict.why}", code="model_unhealthy")
        return web.json_response({"status": "ready", "triton": self.cfg.triton, "models": sorted(self.models)})

    async def live(self, request):
        """Liveness: the gateway answers, whatever Triton's state (a restart would not make Triton ready)."""
        return web.json_response({"status": "live"})

    async def prometheus(self, request):
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    # ---- generation -------------------------------------------------------------------------------------------
    async def chat(self, request):
        return await self._generate(request, chat=True)

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool):
        received = time.perf_counter()
        raw = await request.read()  # past client_max_size: HTTPRequestEntityTooLarge → 413
        body = parse_body(raw, self.cfg.max_json_depth)
        check_fields(body, CHAT if chat else COMPLETIONS)
        p = parse_request(body, self.models, chat, self.cfg.sampling)
        request[MODEL_ID] = p.model_id
        self._gate(p.model)
        rid = new_id("chatcmpl" if chat else "cmpl")
        chunks = self.client.generate(build_request(p.model, p.generation, rid), self.cfg.request_timeout_s)
        state = _Output(self, p, chat, received)
        self.metrics.in_flight += 1
        try:
            if p.stream:
                return await self._stream(request, p, chat, rid, chunks, state)
            return await self._whole(p, chat, rid, chunks, state)
        except asyncio.CancelledError:
            self.metrics.cancelled += 1
            raise
        except ConnectionError:
            # the client went away while an event was being written (before aiohttp cancelled the handler):
            # the same as a cancellation — nothing more can be sent, and the Triton request is cancelled below
            self.metrics.cancelled += 1
            raise asyncio.CancelledError() from None
        finally:
            self.metrics.in_flight -= 1
            await aclose_quietly(chunks)  # a request not read to its end is cancelled in Triton

    async def _whole(self, p: Parsed, chat: bool, rid: str, chunks: AsyncIterator[Chunk], state: _Output):
        runs: dict[int, _Run] = {}
        try:
            async for c in chunks:
                state.count(c)
                runs.setdefault(c.index, _Run()).add(c)
        except TritonError as exc:
            raise ApiError(exc.status, str(exc)) from None
        ordered = [runs[i] for i in sorted(runs)]
        if len(ordered) > p.n:  # best_of: the n with the highest cumulative logprob
            ordered = sorted(ordered, key=lambda r: -sum(r.logprobs))[: p.n]
        decode = state.token_text
        choices = []
        for index, run in enumerate(ordered):
            text = run.text
            specials = state.special_filter()
            if specials is not None:
                text = specials.feed(text) + specials.finish()
            choice: dict = {"index": index, "logprobs": None, "finish_reason": finish_reason(run.finish or state.finish)}
            if chat:
                message: dict = {"role": "assistant", "content": text}
                reasoning, content = "", text
                if p.separate_reasoning:
                    splitter = state.splitter()
                    r1, c1 = splitter.feed(text, run.ids)
                    r2, c2 = splitter.finish()
                    reasoning, content = r1 + r2, c1 + c2
                    message["content"] = content if content or not reasoning else None
                    message.update(reasoning_fields(reasoning or None))
                if p.tools is not None:
                    content, calls = split_answer(content, p.tools)
                    if calls:
                        message["content"] = content if content.strip() else None
                        message["tool_calls"] = calls
                        choice["finish_reason"] = "tool_calls"
                choice["message"] = message
                if p.logprobs:
                    choice["logprobs"] = {"content": chat_logprobs(decode, run.ids, run.logprobs, run.top_ids,
                                                                   run.top_values, p.top_logprobs), "refusal": None}
            else:
                choice["text"] = (p.generation.prompt + text) if p.echo else text
                if p.logprobs:
                    choice["logprobs"] = completion_logprobs(decode, run.ids, run.logprobs, run.top_ids,
                                                             run.top_values, p.top_logprobs, 0)
            choices.append(choice)
        state.done()
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
            "model": p.model_id, "choices": choices, "usage": state.usage(),
        })

    async def _stream(self, request: web.Request, p: Parsed, chat: bool, rid: str, chunks: AsyncIterator[Chunk],
                      state: _Output):
        it = chunks.__aiter__()
        try:
            # the first response before the headers: a refused request (busy, too long) gets its own status
            first: Optional[Chunk] = await it.__anext__()
        except TritonError as exc:
            raise ApiError(exc.status, str(exc)) from None
        except StopAsyncIteration:
            raise ApiError(502, "Triton sent no response") from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = now()
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(choice: Optional[dict], extra: Optional[dict] = None) -> None:
            obj = {"id": rid, "object": kind, "created": created, "model": p.model_id,
                   "choices": [choice] if choice is not None else []}
            if extra:
                obj.update(extra)
            await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

        decode = state.token_text
        offsets = dict.fromkeys(range(p.n), 0)  # completions: text offset of each choice's next token
        echoed: set[int] = set()

        def piece(index: int, reasoning: str, content: str, c: Chunk) -> Optional[dict]:
            logprobs = None
            if p.logprobs and c.token_ids:
                if chat:
                    logprobs = {"content": chat_logprobs(decode, c.token_ids, c.logprobs, c.top_ids, c.top_logprobs,
                                                         p.top_logprobs), "refusal": None}
                else:
                    logprobs = completion_logprobs(decode, c.token_ids, c.logprobs, c.top_ids, c.top_logprobs,
                                                   p.top_logprobs, offsets[index])
                    offsets[index] += sum(len(t) for t in logprobs["tokens"])
            if chat:
                delta: dict = {}
                if reasoning:
                    delta.update(reasoning_fields(reasoning))
                if content:
                    delta["content"] = content
                if not delta and logprobs is None:
                    return None
                return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            if p.echo and index not in echoed:
                echoed.add(index)
                content = p.generation.prompt + content
            if not content and logprobs is None:
                return None
            return {"index": index, "text": content, "logprobs": logprobs, "finish_reason": None}

        splitters = {i: state.splitter() for i in range(p.n)} if p.separate_reasoning else {}
        finished: dict[int, str] = {}

        async def end(index: int, reason: str) -> None:
            called = index in parsers and parsers[index].calls
            out = {"index": index, "logprobs": None, "finish_reason": "tool_calls" if called else finish_reason(reason)}
            out.update({"delta": {}} if chat else {"text": ""})
            await send(out)

        specials = {i: state.special_filter() for i in range(p.n)}
        parsers = {i: answer_parser(p.tools) for i in range(p.n)} if chat and p.tools is not None else {}
        if chat:
            for i in range(p.n):
                await send({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})
        try:
            chunk = first
            while chunk is not None:
                state.count(chunk)
                i = chunk.index
                splitter = splitters.get(i)
                last = chunk.final or bool(chunk.finish_reason)
                text = chunk.text
                special = specials.get(i)
                if special is not None:
                    text = special.feed(text) + (special.finish() if last else "")
                r, c = splitter.feed(text, chunk.token_ids) if splitter else ("", text)
                if last and splitter:
                    r2, c2 = splitter.finish()
                    r, c = r + r2, c + c2
                calls: list[dict] = []
                parser = parsers.get(i)
                if parser is not None:
                    c, calls = parser.feed(c)
                    if last:
                        c2, calls2 = parser.finish()
                        c, calls = c + c2, calls + calls2
                out = piece(i, r, c, chunk)
                if out is not None:
                    await send(out)
                for call in calls:
                    await send(tool_call_delta(call, parser.calls.index(call), i))
                if chunk.finish_reason and i not in finished:
                    finished[i] = chunk.finish_reason
                    await end(i, chunk.finish_reason)
                if chunk.final:
                    break
                chunk = await it.__anext__()
        except TritonError as exc:
            # the status line is gone: OpenAI's clients raise on an `error` event; [DONE] still ends the stream
            await resp.write(b"data: " + json.dumps(ApiError(exc.status, str(exc)).body()).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        except StopAsyncIteration:
            pass
        for i in range(p.n):
            if i not in finished:
                await end(i, state.finish)
        state.done()
        if p.include_usage:
            await send(None, {"usage": state.usage()})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class _Run:
    """One choice's responses gathered (a whole, non-streamed answer)."""

    def __init__(self):
        self.texts: list[str] = []
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_ids: list[list[int]] = []
        self.top_values: list[list[float]] = []
        self.finish = ""

    def add(self, c: Chunk) -> None:
        self.texts.append(c.text)
        self.ids.extend(c.token_ids)
        self.logprobs.extend(c.logprobs)
        self.top_ids.extend(c.top_ids)
        self.top_values.extend(c.top_logprobs)
        if c.finish_reason:
            self.finish = c.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.texts)


class _Output:
    """Counts of one request's output as the chunks pass: TTFT, finish reason, usage (the model's own counts
    where it returns them, else the prompt tokenized here and the token ids counted)."""

    def __init__(self, gw: Gateway, p: Parsed, chat: bool, received: float):
        self.gw, self.p, self.received = gw, p, received
        self.first_at: Optional[float] = None
        self.finish = ""
        self.prompt_tokens = p.prompt_tokens  # the model's own count replaces it; counted here at the end if none
        self.completion_tokens = 0

    def count(self, c: Chunk) -> None:
        if self.first_at is None and (c.text or c.token_ids):
            self.first_at = time.perf_counter()
            self.gw.metrics.first_token(self.p.model_id, self.first_at - self.received)
        if c.num_input_tokens is not None:
            self.prompt_tokens = c.num_input_tokens
        self.completion_tokens += c.num_output_tokens if c.num_output_tokens is not None else len(c.token_ids)
        if c.finish_reason:
            self.finish = c.finish_reason

    def token_text(self, ids: list[int]) -> str:
        """A token's own text, special tokens kept (logprobs name every token, `</think>` too)."""
        return self.p.model.tokenizer.decode(ids, skip_special_tokens=False)

    def splitter(self) -> ReasoningSplitter:
        model = self.p.model
        if "skip_special_tokens" in model.inputs:
            return ReasoningSplitter()  # text mode: the tags are in the text
        tok = model.tokenizer
        return ReasoningSplitter(model.think_end_id, lambda ids: tok.decode(ids, skip_special_tokens=True))

    def special_filter(self) -> Optional[SpecialTokenFilter]:
        if not self.p.strip_special:
            return None
        return SpecialTokenFilter(self.p.model.special_texts(keep=(THINK_START, THINK_END)))

    def _prompt_tokens(self) -> int:
        if self.prompt_tokens is None:
            self.prompt_tokens = self.p.model.count_tokens(self.p.generation.prompt)
        return self.prompt_tokens

    def usage(self) -> dict:
        return usage(self._prompt_tokens(), self.completion_tokens)

    def done(self) -> None:
        self.gw.metrics.tokens(self.p.model_id, self._prompt_tokens(), self.completion_tokens)


# ---- running it ---------------------------------------------------------------------------------------------------
class GatewayServer:
    """The gateway on its own event loop in a background thread: `start()` returns once it listens;
    `url` is then http://HOST:PORT (the real port when cfg.port is 0); `stop()` closes it."""

    def __init__(self, cfg: GatewayConfig):
        self.gateway = Gateway(cfg)  # reads the repository now: bad input fails before anything starts
        self.cfg = cfg
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.thread: Optional[threading.Thread] = None
        self.port: Optional[int] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._stop: Optional[asyncio.Event] = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        # handler_cancellation: a client that disconnects cancels its handler, and with it the Triton request
        # JsonErrorRunner: what aiohttp refuses before any handler runs (a request line or header over 8 KB)
        # is answered in OpenAI's shape too, with one log line and no traceback
        runner = JsonErrorRunner(self.gateway.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.cfg.host, self.cfg.port)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 — reported by start()
            self._error = exc
            self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                self.loop.close()

    def start(self, timeout_s: float = 30.0) -> GatewayServer:
        self.thread = threading.Thread(target=self._run, name="r1deploy-gateway", daemon=True)
        self.thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("gateway did not start")
        if self._error is not None:
            raise self._error
        return self

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(timeout=15)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
