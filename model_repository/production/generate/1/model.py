"""Triton python-backend model `generate`: prompt text in, generated text out — whole or streamed — served by an
in-flight batching scheduler (llm_scheduler.py) that decodes every running request in one engine call per step.

Decoupled (`model_transaction_policy { decoupled: true }`), `max_batch_size 1`: every input carries a leading
batch dimension of 1 (scalars [1, 1]), the shape Triton's OpenAI frontend, genai-perf and TensorRT-LLM clients
send. Threads, and only these: `execute()` parses each request and hands it to the scheduler at once (or answers
it with an error); one loop thread runs the scheduler; one sender thread sends every response, so a decode step
never waits for a send and no two threads send at the same time; a watcher thread polls cancellation.

Inputs: text_input; optional max_tokens, temperature (0 = greedy, the default), top_p, top_k, seed, stop_words (Triton's
name) or stop, stream, ignore_eos, exclude_input_in_output (default true), skip_special_tokens (default true),
return_num_input_tokens, return_num_output_tokens (accepted: the counts are always sent), presence_penalty,
frequency_penalty, repetition_penalty, min_tokens, logit_bias (JSON: token id → bias), num_return_sequences (n),
return_log_probs, top_logprobs, guided_decoding_guide_type / guided_decoding_guide (structured output:
json_object, json_schema, regex, ebnf; guided.py) — TensorRT-LLM's and vLLM's names; health_check (r1deploy's probe,
exporter/health.py: answered at once from the scheduler's heartbeat, nothing generated). Outputs: text_output (the
new text of this response when streaming, else the whole completion), token_ids (this response's tokens),
finish_reason ("length" | "stop" | "eos"; empty on non-final chunks), num_input_tokens, num_output_tokens (tokens
in this response), sequence_index (which of the n choices), and with return_log_probs output_log_probs /
top_logprob_ids / top_logprobs (per token of this response). A stream's tokens leave per scheduler step — the
step's new tokens of every stream in one response each, or every `stream_interval_steps` steps — then a last
response per choice carries its finish_reason; the request's very last response carries the FINAL flag. Errors
are one line to the client ("server busy: …" when the queue is full) and the traceback, if any, goes to Triton's
log.

The engine is reached in-process — ONNX Runtime (CPU, or the CUDA execution provider), a TensorRT plan or a
TensorRT-RTX plan (engine_runtimes.py) — or through BLS, by name (`engine_call: bls`, any Triton engine model).

Written by `r1deploy repository`; the source is exporter/repository/python_models/generate.py, with the modules
it imports copied beside it.
"""

import json
import queue
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from guided import GuideError, GuideFactory
from kv_padded import CacheSlot, PaddedKVEngine
from llm_scheduler import Limits, RequestError, SamplingParams, Scheduler, Sequence, ServerBusy, TextStream

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests)
    pb_utils = None

MAX_PROMPT_BYTES_PER_TOKEN = 64  # a prompt longer than max_input_len × this is refused before tokenizing


def _param(config: dict, key: str, default: str | None = None) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None:
        if default is None:
            raise KeyError(f"parameter {key!r} missing from config.pbtxt")
        return default
    return value


def _values(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _scalar(request, name: str, kind, default):
    values = _values(request, name)
    if values is None:
        return default
    if values.size != 1:
        raise RequestError(f"{name} must hold one value, got {values.size}")
    value = values[0]
    return value.decode("utf-8") if isinstance(value, bytes) else kind(value)


def _strings(request, name: str) -> list[str]:
    values = _values(request, name)
    if values is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _logit_bias(request) -> dict[int, float]:
    """`logit_bias`: a JSON object, token id (as a string, JSON's only key type) → bias."""
    raw = _scalar(request, "logit_bias", str, "")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise RequestError("logit_bias must be a JSON object of token id → bias") from None
    if not isinstance(value, dict):
        raise RequestError("logit_bias must be a JSON object of token id → bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"logit_bias: {key!r} is not a token id") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise RequestError(f"logit_bias: the bias of token {key} must be a number")
        out[token] = float(bias)
    return out


class _Handle:
    """What the sender needs to answer one request (all n of its choices)."""

    __slots__ = ("request", "sender", "prompt_text", "echo", "last_sent_step", "prompt_tokens", "lock", "closed",
                 "started", "remaining", "echoed", "logprobs")

    def __init__(self, request, prompt_text: str, echo: bool, prompt_tokens: int, choices: int = 1,
                 logprobs: bool = False):
        self.request, self.sender = request, request.get_response_sender()
        self.prompt_text, self.echo, self.prompt_tokens = prompt_text, echo, prompt_tokens
        self.last_sent_step = -1
        self.remaining = choices  # choices whose last response is not sent yet: the last of them is FINAL
        self.echoed: set[int] = set()  # choices whose stream has had the prompt put before it
        self.logprobs = logprobs
        # Triton frees a request's response factory with its FINAL response, and asking `is_cancelled` after
        # that crashes the server (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled, seen here under load):
        # the final send and the cancellation check of one request exclude each other, and `closed` ends checks
        self.lock = threading.Lock()
        self.closed = False
        # choices whose first response is out (or on its way): only the sender thread reads and sets it
        self.started: set[int] = set()

    def send_final(self, response=None) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        with self.lock:
            if self.closed:  # another choice's error or cancellation already ended the request
                return
            self.closed = True
            if response is None:
                self.sender.send(flags=final)
            else:
                self.sender.send(response, flags=final)

    def is_cancelled(self) -> bool:
        with self.lock:
            if self.closed:
                return False
            check = getattr(self.request, "is_cancelled", None)
            return bool(check()) if check is not None else False


class _Metrics:
    """The scheduler's figures as Triton custom metrics (`pb_utils.MetricFamily`), on the server's metrics port:
    Triton's own queue time no longer sees the wait, which happens inside this model. Updated from the loop at
    most every `period` seconds (each update is a round trip to the server process)."""

    PREFIX = "r1deploy_generate_"

    def __init__(self, labels: dict, period: float = 0.25):
        self.period, self.last = period, 0.0
        fam = pb_utils.MetricFamily
        gauge, counter = fam.GAUGE, fam.COUNTER

        self.families: dict = {}  # a family must outlive its metrics: keep them all

        def metric(name, doc, kind, extra=None):
            family = self.families.get(name)
            if family is None:
                family = self.families[name] = fam(name=self.PREFIX + name, description=doc, kind=kind)
            return family.Metric(labels={**labels, **(extra or {})})

        self.waiting = metric("requests_waiting", "Requests waiting for a row of the running batch", gauge)
        self.running = metric("requests_running", "Requests in the running batch", gauge)
        self.kv_used = metric("kv_cache_utilization", "KV-cache budget reserved by running requests (0..1)", gauge)
        self.kv_tokens = metric("kv_cache_tokens", "KV-cache positions held by running requests", gauge)
        self.queue_us = metric("queue_duration_us", "Cumulative time admitted requests waited, in microseconds", counter)
        self.admitted = metric("requests_admitted", "Requests admitted to the running batch", counter)
        self.ttft_us = metric("time_to_first_token_us", "Cumulative time from arrival to first token, in microseconds", counter)
        self.first_tokens = metric("first_tokens", "Requests that produced a first token", counter)
        self.tokens = metric("generated_tokens", "Generated tokens", counter)
        self.rejected = metric("requests_rejected", "Requests refused because the queue was full", counter)
        self.prefix_query_tokens = metric("prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache",
                                          counter)
        self.prefix_hit_tokens = metric("prefix_cache_hit_tokens",
                                        "Prompt tokens whose KV came from the prefix cache (not computed)", counter)
        self.prefix_hit_rate = metric("prefix_cache_hit_rate", "Prefix cache hit tokens / query tokens since start",
                                      gauge)
        self.finished = {
            reason: metric("requests_finished", "Requests that left the batch, by reason", counter, {"reason": reason})
            for reason in ("length", "stop", "eos", "cancelled", "shutdown", "error")
        }
        self.acc = {"queue_us": 0.0, "admitted": 0, "ttft_us": 0.0, "first_tokens": 0, "tokens": 0, "rejected": 0,
                    "prefix_query_tokens": 0, "prefix_hit_tokens": 0}
        self.acc_finished = dict.fromkeys(self.finished, 0)
        self.lock = threading.Lock()

    def add(self, key: str, value=1) -> None:
        with self.lock:
            self.acc[key] += value

    def record(self, stats) -> None:
        with self.lock:
            acc = self.acc
            acc["admitted"] += stats.admitted
            acc["queue_us"] += stats.queue_s * 1e6
            acc["first_tokens"] += stats.first_tokens
            acc["ttft_us"] += stats.ttft_s * 1e6
            acc["tokens"] += stats.tokens
            acc["prefix_query_tokens"] += stats.prefix_query_tokens
            acc["prefix_hit_tokens"] += stats.prefix_hit_tokens

    def finish(self, reason: str) -> None:
        with self.lock:
            self.acc_finished[reason] = self.acc_finished.get(reason, 0) + 1

    def flush(self, scheduler: Scheduler, now: float, force: bool = False) -> None:
        if not force and now - self.last < self.period:
            return
        self.last = now
        try:
            self._flush(scheduler)
        except Exception:  # noqa: BLE001 — metrics must never stop the loop
            pb_utils.Logger.log_warn(f"generate: metrics update failed: {traceback.format_exc()}")

    def _flush(self, scheduler: Scheduler) -> None:
        waiting, running = scheduler.counts
        self.waiting.set(waiting)
        self.running.set(running)
        self.kv_used.set(scheduler.reserved / scheduler.limits.kv_budget_tokens)
        self.kv_tokens.set(scheduler.kv_used_tokens)
        if scheduler.prefix is not None:
            self.prefix_hit_rate.set(scheduler.prefix.hit_rate)
        with self.lock:
            acc, self.acc = self.acc, dict.fromkeys(self.acc, 0)
            fin, self.acc_finished = self.acc_finished, dict.fromkeys(self.acc_finished, 0)
        for key, value in acc.items():
            if value:
                getattr(self, key).increment(value)
        for reason, n in fin.items():
            if n and reason in self.finished:
                self.finished[reason].increment(n)


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"])
        version_dir = model_dir / args["model_version"]
        self.logger = pb_utils.Logger
        tokenizer_dir = version_dir / _param(config, "tokenizer", "tokenizer")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        self.eos = set(json.loads(_param(config, "eos_token_ids")))
        self.max_input_len = int(_param(config, "max_input_len"))
        self.max_output_len = int(_param(config, "max_output_len"))
        self.default_max_tokens = int(_param(config, "default_max_tokens", "64"))
        sched = json.loads(_param(config, "scheduler"))
        limits = Limits(
            max_rows=int(sched["max_rows"]), kv_budget_tokens=int(sched["kv_budget_tokens"]),
            max_queue=int(sched["max_queue"]), max_sequence_len=int(_param(config, "max_sequence_len")),
            max_prefill_tokens=int(sched.get("max_prefill_tokens", 8192)),
            prefix_cache_tokens=int(sched.get("prefix_cache_tokens", 0)),
        )
        self.stream_interval = max(1, int(sched.get("stream_interval_steps", 1)))
        # a loop that has not iterated for this long is reported unhealthy (a step is bounded by
        # max_prefill_tokens; this is far above any step's time)
        self.heartbeat_timeout_s = float(sched.get("heartbeat_timeout_s", 30))
        self.beat = time.monotonic()
        engine_call = _param(config, "engine_call", "bls")
        layout = _param(config, "kv_layout", "padded")
        if layout == "shared":
            # the fused graph (GroupQueryAttention over one in-place buffer per cache slot): ONNX Runtime only
            from kv_shared import SharedKVEngine

            # the KV buffers live where the session runs: a GPU when the CUDA execution provider is asked for
            providers = json.loads(_param(config, "ort_providers", '["CPUExecutionProvider"]'))
            device_id = int(args.get("model_instance_device_id", 0) or 0)
            device = f"cuda:{device_id}" if "CUDAExecutionProvider" in providers else "cpu"
            engine = SharedKVEngine.from_path(model_dir.parent / _param(config, "engine_file"), limits.max_rows,
                                              limits.max_sequence_len, int(_param(config, "intra_op_num_threads", "1")),
                                              device=device, int4_activations=_param(config, "ort_int4_activations", "fp32"))
        elif layout != "padded":
            raise ValueError(f"kv_layout must be padded or shared, not {layout!r}")
        elif engine_call == "inprocess":
            from engine_runtimes import load_runner

            runtime = _param(config, "engine_runtime", "onnxruntime")
            engine_file = model_dir.parent / _param(config, "engine_file")
            run, max_batch = load_runner(runtime, engine_file, config, int(args.get("model_instance_device_id", 0) or 0))
        elif engine_call == "bls":
            self.engine_model = _param(config, "engine_model")
            run, max_batch = self._bls, int(sched.get("engine_max_batch", limits.max_rows))
        else:
            raise ValueError(f"engine_call must be bls or inprocess, not {engine_call!r}")
        if layout == "padded":
            cache = json.loads(_param(config, "kv_cache"))
            slots = [CacheSlot(**s) for s in cache["slots"]]
            engine = PaddedKVEngine(run, slots, cache["dtype"], limits.max_rows, cache.get("logits", "logits"),
                                    pad_id=int(cache.get("pad_id", 0)), max_batch=max_batch)
        self.scheduler = Scheduler(engine, limits, self.eos)
        # structured output: the grammar engine is loaded on the first guided request
        self.guides = GuideFactory(str(tokenizer_dir / "tokenizer.json"), sorted(self.eos),
                                   self.tokenizer.token_to_id("<think>"), self.tokenizer.token_to_id("</think>"))
        # one set per instance: a pod runs one loop per GPU, each its own gauges (the dashboards and alerts sum by pod)
        self.metrics = _Metrics({"model": args["model_name"], "version": args["model_version"],
                                 "instance": args.get("model_instance_name", "")})
        self.shutdown = threading.Event()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.step_count = 0
        self.threads = [
            threading.Thread(target=self._loop, name="generate-loop", daemon=True),
            threading.Thread(target=self._send_loop, name="generate-sender", daemon=True),
            threading.Thread(target=self._watch_cancellation, name="generate-cancel", daemon=True),
        ]
        for t in self.threads:
            t.start()

    # -- engine call through BLS -----------------------------------------------------------------------------
    def _bls(self, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=[pb_utils.Tensor(name, value) for name, value in feeds.items()],
            requested_output_names=outputs,
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"engine model {self.engine_model}: {response.error().message()}")
        # copies: the response's memory is released with it
        return [np.array(pb_utils.get_output_tensor_by_name(response, name).as_numpy()) for name in outputs]

    # -- requests in -------------------------------------------------------------------------------------------
    def _sequence(self, request) -> Sequence:
        try:
            prompt = _scalar(request, "text_input", str, "")
            stop = _strings(request, "stop_words") + _strings(request, "stop")
        except UnicodeDecodeError:
            raise RequestError("text inputs must be UTF-8") from None
        if not prompt.strip():
            raise RequestError("text_input is empty")
        if len(prompt.encode("utf-8")) > self.max_input_len * MAX_PROMPT_BYTES_PER_TOKEN:
            raise RequestError(f"prompt is longer than this deployment accepts ({self.max_input_len} tokens)")
        guide_type = _scalar(request, "guided_decoding_guide_type", str, "")
        guide_text = _scalar(request, "guided_decoding_guide", str, "")
        top_logprobs = _scalar(request, "top_logprobs", int, 0)
        params = SamplingParams(
            max_tokens=_scalar(request, "max_tokens", int, self.default_max_tokens),
            temperature=_scalar(request, "temperature", float, 0.0),
            top_p=_scalar(request, "top_p", float, 1.0),
            top_k=_scalar(request, "top_k", int, 0),
            seed=_scalar(request, "seed", int, None),
            stop=stop,
            ignore_eos=bool(_scalar(request, "ignore_eos", bool, False)),
            stream=bool(_scalar(request, "stream", bool, False)),
            skip_special_tokens=bool(_scalar(request, "skip_special_tokens", bool, True)),
            presence_penalty=_scalar(request, "presence_penalty", float, 0.0),
            frequency_penalty=_scalar(request, "frequency_penalty", float, 0.0),
            repetition_penalty=_scalar(request, "repetition_penalty", float, 1.0),
            min_tokens=_scalar(request, "min_tokens", int, 0),
            logit_bias=_logit_bias(request),
            n=_scalar(request, "num_return_sequences", int, 1),
            # top_logprobs > 0 asks for log-probabilities too
            logprobs=bool(_scalar(request, "return_log_probs", bool, False)) or top_logprobs > 0,
            top_logprobs=top_logprobs,
        )
        params.validate(self.max_output_len, vocab=self.tokenizer.get_vocab_size(with_added_tokens=True))
        prompt_ids = self.tokenizer.encode(prompt).ids
        if not prompt_ids:
            raise RequestError("text_input has no tokens")
        if len(prompt_ids) > self.max_input_len:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; this deployment accepts at most {self.max_input_len}")
        skip = params.skip_special_tokens

        def text():
            return TextStream(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=skip), params.stop,
                              incremental=params.stream)

        echo = not bool(_scalar(request, "exclude_input_in_output", bool, True))
        handle = _Handle(request, prompt, echo, len(prompt_ids), params.n, params.logprobs)
        first = Sequence(prompt_ids, params, text(), handle=handle)
        first.siblings = [Sequence(prompt_ids, params, text(), handle=handle, index=i) for i in range(1, params.n)]
        if guide_type:
            for s in first.group:
                s.guide = self._guide(guide_type, guide_text, prompt_ids)
        return first

    def _guide(self, kind: str, text: str, prompt_ids: list[int]):
        try:
            return self.guides.guide(kind, text, prompt_ids)
        except GuideError as exc:
            raise RequestError(str(exc)) from None
        except ImportError as exc:
            raise RequestError(f"structured output needs xgrammar, which this server lacks ({_line(exc)})") from None

    def _health(self) -> tuple[bool, str]:
        """(ok, answer) for a `health_check` request: the loop thread alive and iterating (see exporter/health.py)."""
        age = time.monotonic() - self.beat
        loop = self.threads[0]
        if not loop.is_alive():
            return False, "generate unhealthy: the scheduler loop has stopped"
        if age > self.heartbeat_timeout_s:
            return False, f"generate unhealthy: the scheduler loop has not iterated for {age:.1f} s"
        waiting, running = self.scheduler.counts
        return True, json.dumps({"status": "ok", "loop_age_s": round(age, 3), "waiting": waiting, "running": running})

    def execute(self, requests):
        for request in requests:
            try:
                if _scalar(request, "health_check", bool, False):
                    # answered now, not queued behind generation; sent by the sender thread like everything else
                    self.outbox.put(("health", request.get_response_sender(), *self._health()))
                    continue
                self.scheduler.submit(self._sequence(request))
            except ServerBusy as exc:
                self.metrics.add("rejected")
                self.outbox.put(("error", request.get_response_sender(), str(exc)))
            except RequestError as exc:
                self.outbox.put(("error", request.get_response_sender(), str(exc)))
            except Exception as exc:  # noqa: BLE001 — answer the client, log the traceback
                self.logger.log_error(f"generate: request failed: {traceback.format_exc()}")
                self.outbox.put(("error", request.get_response_sender(), f"generate failed: {_line(exc)}"))
        return None

    # -- the loop --------------------------------------------------------------------------------------------
    def _loop(self):
        scheduler = self.scheduler
        while True:
            self.beat = time.monotonic()
            stopping = self.shutdown.is_set()
            if not scheduler.wait_for_work(0.05):
                self.metrics.flush(scheduler, time.monotonic())
                if stopping:
                    break
                continue
            try:
                ready, done, stats = scheduler.step(shutting_down=stopping)
            except Exception as exc:  # noqa: BLE001 — the engine failed: fail the batch, keep serving
                self.logger.log_error(f"generate: engine step failed: {traceback.format_exc()}")
                for seq in scheduler.abort_running():
                    self.metrics.finish("error")
                    self.outbox.put(("error", seq.handle, f"generate failed: {_line(exc)}"))
                continue
            self.step_count += 1
            self.metrics.record(stats)
            for seq in ready:
                h = seq.handle
                if seq.params.stream and (h.last_sent_step < 0 or self.step_count - h.last_sent_step >= self.stream_interval):
                    self._emit(seq, final=False)
            for seq in done:
                self.metrics.finish(seq.finish_reason)
                if seq.finish_reason == "shutdown":
                    self.outbox.put(("error", seq.handle, "the server is shutting down"))
                elif seq.finish_reason == "cancelled":
                    self.outbox.put(("cancelled", seq.handle))
                else:
                    self._emit(seq, final=True)
            self.metrics.flush(scheduler, time.monotonic())
        self.metrics.flush(scheduler, time.monotonic(), force=True)
        self.outbox.put(None)

    def _emit(self, seq: Sequence, final: bool) -> None:
        h: _Handle = seq.handle
        if seq.params.stream:
            text, tokens = seq.pending_text, seq.pending_tokens
            if h.echo and seq.index not in h.echoed:
                h.echoed.add(seq.index)
                text = h.prompt_text + text
        else:
            text, tokens = seq.text.text, seq.tokens
            if h.echo:
                text = h.prompt_text + text
        piece = _Piece(seq.index, text, list(tokens), seq.finish_reason if final else "", final,
                       seq.pending_logprobs, seq.pending_top)
        seq.pending_text, seq.pending_tokens, seq.pending_logprobs, seq.pending_top = "", [], [], []
        h.last_sent_step = self.step_count
        self.outbox.put(("chunk", h, piece))

    def _watch_cancellation(self):
        """Cancelled (or disconnected) requests are flagged here; the loop frees their rows at its next step.
        `is_cancelled` is a round trip to the server: the interval grows with the number of requests so that
        polling costs at most ~10 % of a core."""
        while not self.shutdown.is_set():
            with self.scheduler.lock:
                seqs = list(self.scheduler.waiting) + list(self.scheduler.running.values())
            for seq in seqs:
                try:
                    if seq.handle.is_cancelled():
                        seq.cancelled = True
                except Exception:  # noqa: BLE001 — the request is gone: treat as cancelled
                    seq.cancelled = True
            self.shutdown.wait(max(0.02, len(seqs) * 0.001))

    # -- responses out -----------------------------------------------------------------------------------------
    @staticmethod
    def _response(piece: "_Piece", h: _Handle):
        tokens = piece.tokens
        outputs = [
            pb_utils.Tensor("text_output", np.array([[piece.text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.asarray([tokens], dtype=np.int64).reshape(1, -1)),
            pb_utils.Tensor("finish_reason", np.array([[piece.finish.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([[h.prompt_tokens]], dtype=np.uint32)),
            pb_utils.Tensor("num_output_tokens", np.array([[len(tokens)]], dtype=np.uint32)),
            pb_utils.Tensor("sequence_index", np.array([[piece.index]], dtype=np.int32)),
        ]
        if h.logprobs:
            k = max((len(ids) for ids, _ in piece.top), default=0)
            ids = np.zeros((1, len(piece.top), k), np.int64)
            values = np.full((1, len(piece.top), k), -np.inf, np.float32)
            for i, (row_ids, row_values) in enumerate(piece.top):
                ids[0, i, : len(row_ids)] = row_ids
                values[0, i, : len(row_values)] = row_values
            outputs += [
                pb_utils.Tensor("output_log_probs", np.asarray([piece.logprobs], np.float32).reshape(1, -1)),
                pb_utils.Tensor("top_logprob_ids", ids),
                pb_utils.Tensor("top_logprobs", values),
            ]
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def _send_loop(self):
        """The only thread that sends. Chunks of one stream that queued up while earlier sends were under way
        leave together (in order), so sending never falls behind decoding by more than one response per stream."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while True:
            items = [self.outbox.get()]
            while True:
                try:
                    items.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            last = None in items
            if last:
                items = items[: items.index(None)]
            for item in _coalesce(items):
                try:
                    if item[0] == "chunk":
                        _, h, piece = item
                        if h.closed:
                            continue  # an error or cancellation of another choice ended the request
                        response = self._response(piece, h)
                        if piece.final:
                            h.remaining -= 1
                        if piece.final and h.remaining <= 0:
                            h.send_final(response)
                        else:
                            h.sender.send(response)
                    elif item[0] == "health":
                        _, sender, ok, answer = item
                        if ok:
                            text = pb_utils.Tensor("text_output", np.array([[answer.encode("utf-8")]], dtype=np.object_))
                            sender.send(pb_utils.InferenceResponse(output_tensors=[text]), flags=final)
                        else:
                            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(answer)), flags=final)
                    elif item[0] == "error":
                        error = pb_utils.InferenceResponse(error=pb_utils.TritonError(item[2]))
                        if isinstance(item[1], _Handle):
                            item[1].send_final(error)
                        else:  # a request refused before it reached the scheduler
                            item[1].send(error, flags=final)
                    else:  # cancelled: close the stream without a response
                        item[1].send_final()
                except Exception:  # noqa: BLE001 — the client is gone; nothing to answer
                    self.logger.log_verbose(f"generate: send failed: {traceback.format_exc()}")
            if last:
                return

    def finalize(self):
        self.shutdown.set()
        self.scheduler.close()
        for t in self.threads:
            t.join(timeout=10)


class _Piece:
    """One response's worth of one choice: its new text and tokens (with their log-probabilities when asked)."""

    __slots__ = ("index", "text", "tokens", "finish", "final", "logprobs", "top")

    def __init__(self, index, text, tokens, finish, final, logprobs, top):
        self.index, self.text, self.tokens, self.finish, self.final = index, text, tokens, finish, final
        self.logprobs, self.top = logprobs, top

    def merged(self, later: "_Piece") -> "_Piece":
        return _Piece(self.index, self.text + later.text, self.tokens + later.tokens, later.finish, later.final,
                      self.logprobs + later.logprobs, self.top + later.top)


def _coalesce(items: list) -> list:
    """Merge each stream's consecutive chunks (text, tokens and logprobs joined, the last one's finish and flag
    kept), per choice; other items keep their place. A choice's first response is never merged into: it leaves
    with the first step's tokens alone, so time to first token never waits for later steps and a stream of several
    steps always gets more than one response."""
    out: list = []
    open_chunk: dict[tuple, int] = {}  # (id(handle), choice) → index in `out` of its chunk that is not final yet
    for item in items:
        if item[0] != "chunk":
            out.append(item)
            continue
        h, piece = item[1], item[2]
        key = (id(h), piece.index)
        if piece.index not in h.started:
            h.started.add(piece.index)
            out.append(item)
            continue
        at = open_chunk.get(key)
        if at is None:
            out.append(item)
        else:
            out[at] = ("chunk", h, out[at][2].merged(piece))
        if piece.final:
            open_chunk.pop(key, None)
        else:
            open_chunk[key] = len(out) - 1 if at is None else at
    return out


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
