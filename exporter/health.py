"""Is a served LLM able to answer — not just "does Triton's HTTP port answer".

Triton's own readiness stays green when a python-backend model's stub process dies (the OOM killer's favourite:
it is the largest process) or is stopped: model ready, server ready, and every later request refused. So the
signal comes from the `generate` model itself: a request with `health_check: true` is answered at once by the
model's `execute()` — not queued behind generation — from the scheduler's heartbeat (the loop thread marks every
iteration; it iterates at least every 50 ms when idle), through the one sender thread. That one round trip proves
Triton, the stub process, the loop and the sender alive; a dead stub answers "Stub process … is not healthy", a
stopped one (SIGSTOP, a hang) does not answer within the timeout.

Everything that judges health uses this module: the gateway's `/health` and its request gate, `r1deploy serve`'s
supervisor (which restarts the server), and `r1deploy health` (the Kubernetes liveness/readiness exec probe).
Models without a `health_check` input (an older repository, an encoder) fall back to Triton's model readiness.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from typing import Optional

HEALTH_INPUT = "health_check"
# Triton takes 1–2 s to answer "Stub process … is not healthy" for a dead or stopped stub: the probe waits longer
PROBE_TIMEOUT_S = 3.0
# after a server restart a channel must find the new server quickly (gRPC's default reconnect backoff grows to 2 min)
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
# A refused connection is not a verdict on its own: right after a server restart a channel (and gRPC shares
# subchannels between channels) can still be in its reconnect backoff and fail at once. It counts like a probe that
# was not answered in time, after `patience` in a row; a dead server is found by its process anyway.
_NOT_DEFINITE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@dataclass
class Health:
    ok: bool
    why: str = ""  # "" when ok
    latency_s: float = 0.0
    detail: dict = field(default_factory=dict)  # the model's own report: loop age, waiting, running
    definite: bool = True  # False: no answer in time (a slow or a stopped process: ask again before acting)


def failed_rpc(model: str, code: Optional[str], details: str, timeout_s: float, started: float) -> Health:
    """A probe whose RPC failed (grpc status `code`'s name) → Health: no answer in time, or Triton unreachable —
    definite unless the code only says "not now" (_NOT_DEFINITE). The one mapping of the sync probes here and the
    gateway's async one (exporter/gateway/triton.py)."""
    took = time.monotonic() - started
    if code == "DEADLINE_EXCEEDED":
        return Health(False, f"model {model} did not answer a health check within {timeout_s:g} s", took,
                      definite=False)
    return Health(False, f"Triton unreachable ({code or 'error'}: {details})", took,
                  definite=(code or "") not in _NOT_DEFINITE)


def _bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def health_request(model: str, batched: bool = True):
    """The probe: `health_check: true` (+ the required `text_input`, which the model does not read for a probe)."""
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model, id="health")
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    shape = [1, 1] if batched else [1]
    req.inputs.add(name="text_input", datatype="BYTES", shape=shape)
    req.raw_input_contents.append(_bytes([b"health"]))
    req.inputs.add(name=HEALTH_INPUT, datatype="BOOL", shape=shape)
    req.raw_input_contents.append(b"\x01")
    return req


def read_health_response(resp, started: float) -> Health:
    """A ModelStreamInferResponse of the probe → Health."""
    latency = time.monotonic() - started
    if resp.error_message:
        return Health(False, resp.error_message.strip(), latency)
    detail: dict = {}
    for i, out in enumerate(resp.infer_response.outputs):
        if out.name == "text_output" and i < len(resp.infer_response.raw_output_contents):
            raw = resp.infer_response.raw_output_contents[i]
            try:
                detail = json.loads(raw[4:].decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                detail = {}
    if detail.get("status") != "ok":
        return Health(False, f"unexpected health answer: {detail or 'no text_output'}", latency, detail)
    return Health(True, "", latency, detail)


def probe(channel, model: str, timeout_s: float = PROBE_TIMEOUT_S, batched: bool = True) -> Health:
    """One synchronous probe over an open grpc channel (`grpc.insecure_channel(HOST:PORT)`)."""
    import grpc
    from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

    stub = GRPCInferenceServiceStub(channel)
    started = time.monotonic()
    try:
        answer = None
        # read the stream to its end: a stream left open (the client closing it after the answer) kept Triton from
        # unloading the model at shutdown (seen: the server's whole exit timeout, the stub orphaned)
        for resp in stub.ModelStreamInfer(iter([health_request(model, batched)]), timeout=timeout_s):
            if answer is None:
                answer = read_health_response(resp, started)
        if answer is None:
            return Health(False, "Triton closed the stream without an answer", time.monotonic() - started)
        return answer
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        return failed_rpc(model, code.name if code is not None else None,
                          exc.details() if hasattr(exc, "details") else str(exc), timeout_s, started)


def model_ready(channel, model: str, timeout_s: float = PROBE_TIMEOUT_S) -> Health:
    """The fallback for models without the health input: Triton's model readiness."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

    started = time.monotonic()
    try:
        ready = GRPCInferenceServiceStub(channel).ModelReady(pb.ModelReadyRequest(name=model), timeout=timeout_s).ready
    except grpc.RpcError as exc:
        return failed_rpc(model, exc.code().name, exc.details() or "", timeout_s, started)
    return Health(ready, "" if ready else f"model {model} is not ready", time.monotonic() - started)


@dataclass
class Verdict:
    """Consecutive probes → healthy or not. A definite failure (an error answer) counts at once; no answer in
    time counts after `patience` probes in a row, so one slow answer on a loaded machine never aborts streams."""

    patience: int = 2
    healthy: Optional[bool] = None  # None until the first probe
    why: str = ""
    since: float = field(default_factory=time.monotonic)
    _misses: int = 0

    def update(self, h: Health) -> bool:
        """Record a probe; True when the verdict changed."""
        if h.ok:
            self._misses = 0
            new, why = True, ""
        elif h.definite:
            new, why = False, h.why
        else:
            self._misses += 1
            if self._misses < self.patience and self.healthy is not False:
                return False
            new, why = False, h.why
        changed = new != self.healthy
        if changed:
            self.since = time.monotonic()
        self.healthy, self.why = new, why
        return changed


def has_health_input(config) -> bool:
    """Whether a model config (tritonclient.grpc.model_config_pb2.ModelConfig) declares the probe input."""
    return any(i.name == HEALTH_INPUT for i in config.input)


def probed_models(repositories) -> list[tuple[str, bool]]:
    """(name, batched) of every model in these repositories that declares the probe input (the LLM entry models)."""
    from pathlib import Path

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    found = []
    for repo in repositories:
        for config_file in sorted(Path(repo).glob("*/config.pbtxt")):
            config = mc.ModelConfig()
            try:
                text_format.Parse(config_file.read_text(), config)
            except (text_format.ParseError, OSError, UnicodeDecodeError):
                continue  # Triton itself reports a config it cannot read
            if has_health_input(config):
                found.append((config.name or config_file.parent.name, config.max_batch_size > 0))
    return found


class ModelWatch:
    """A thread probing models every `interval_s`: `failing()` names the first model judged unhealthy. `reset()`
    (after a restart) forgets every verdict, and a probe that was under way across it is discarded."""

    def __init__(self, grpc_url: str, models: list[tuple[str, bool]], interval_s: float = 1.0,
                 timeout_s: float = PROBE_TIMEOUT_S, patience: int = 2):
        import threading

        self.url, self.models = grpc_url, models
        self.interval_s, self.timeout_s, self.patience = interval_s, timeout_s, patience
        self.verdicts = {name: Verdict(patience) for name, _ in models}
        self._lock = threading.Lock()
        self._generation = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="r1deploy-model-watch", daemon=True)

    def start(self) -> ModelWatch:
        if self.models:
            self._thread.start()
        return self

    def _run(self) -> None:
        import grpc

        channel, channel_generation = None, -1
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                for name, batched in self.models:
                    with self._lock:
                        generation = self._generation
                    if channel_generation != generation:  # a new server: a new channel, no reconnect backoff
                        if channel is not None:
                            channel.close()
                        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
                        channel, channel_generation = grpc.insecure_channel(self.url, options=options), generation
                    health = probe(channel, name, self.timeout_s, batched)
                    with self._lock:
                        if generation == self._generation:
                            self.verdicts[name].update(health)
                self._stop.wait(max(0.05, self.interval_s - (time.monotonic() - started)))
        finally:
            if channel is not None:
                channel.close()

    def failing(self) -> Optional[tuple[str, str]]:
        with self._lock:
            for name, verdict in self.verdicts.items():
                if verdict.healthy is False:
                    return name, verdict.why
        return None

    def reset(self) -> None:
        with self._lock:
            self._generation += 1
            self.verdicts = {name: Verdict(self.patience) for name, _ in self.models}

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.timeout_s + 5)


def check(grpc_url: str, model: str, timeout_s: float = PROBE_TIMEOUT_S) -> Health:
    """One probe from a fresh channel (`r1deploy health`, the Kubernetes exec probe); a model that does not declare
    the probe input falls back to Triton's model readiness."""
    import grpc

    channel = grpc.insecure_channel(grpc_url)
    try:
        h = probe(channel, model, timeout_s)
        if not h.ok and "unexpected inference input" in h.why and HEALTH_INPUT in h.why:
            return model_ready(channel, model, timeout_s)
        return h
    finally:
        channel.close()
