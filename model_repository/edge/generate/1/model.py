"""Triton python-backend model `generate`: prompt text in, generated text out — whole or streamed per token.

Decoupled (`model_transaction_policy { decoupled: true }`): `execute()` hands every request to its own thread
and returns at once, so many streams run side by side; each thread answers its request with exactly one FINAL
response in every case, errors included (an exception that escaped a thread would leave the client hanging).

Per request: tokenize (the tokenizer in `tokenizer/` beside this file), prefill the prompt, then decode one
token at a time against the KV cache the engine model returns (`present.*` fed back as `past_key_values.*`).
The engine model is reached either through BLS, by name (`engine_call: bls` — any variant: tensorrt_plan,
onnxruntime_onnx, python_ort), or, for the python_ort variant, by running the same ONNX file in this process
(`engine_call: inprocess` — a BLS hop costs ~0.3 ms here against ~5 µs for a direct ONNX Runtime call).

Inputs: text_input; optional max_tokens, temperature (0 = greedy, the default), top_p, seed, stop (strings),
stream. Outputs: text_output (the new piece when streaming, else the whole completion), token_ids,
finish_reason ("length" | "stop" | "eos"; empty on non-final chunks). With stream=true the tokens go out as they
are decoded — the first alone, later ones grouped when decoding outpaces sending (see `_Pump`) — and a last
response with empty text and the finish_reason carries the FINAL flag.

Written by `r1deploy repository`; the source is exporter/repository/python_models/generate.py. Nothing below
needs Triton to be imported, so the sampling and text logic is tested directly.
"""

import json
import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests)
    pb_utils = None


class RequestError(Exception):
    """The request is unusable; its message goes back to the client and the server keeps serving."""


@dataclass
class Settings:
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False


class Sampler:
    """Greedy at temperature 0; otherwise softmax(logits / temperature), cut to the top-p nucleus."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temperature
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
            nucleus = np.zeros_like(p)
            nucleus[keep] = p[keep]
            p = nucleus / nucleus.sum()
        return int(self.rng.choice(p.shape[0], p=p))


class TextStream:
    """Detokenizes incrementally and applies stop strings; `push` returns only text that can no longer change:
    an incomplete UTF-8 character (a trailing U+FFFD) and a tail that may begin a stop string are held back.

    Each token decodes only a short window — the tokens since the last emitted piece, after the piece before it
    as context (a tokenizer may drop a leading space at the start of a decode; the difference of two decodes
    of the same start cancels it) — and stop strings are searched only where new text could complete one, so a
    token costs the same at position 10 and 10 000 (decoding the whole text at every token is quadratic).
    With `incremental=False` (no streaming, no stop strings) nothing is decoded until `finish`."""

    def __init__(self, decode, stop: list[str], incremental: bool = True):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.incremental = incremental or bool(self.stop)
        self.tokens: list[int] = []
        self.prefix = 0  # first token of the decode window
        self.read = 0  # tokens before this one are in `text`
        self.partial = 0  # characters of the open window already in `text`
        self.text = ""  # the final text so far (stop string removed); complete after `finish`
        self.emitted = 0
        self.stopped = False
        self.longest_stop = max((len(s) for s in self.stop), default=0)

    def _held(self, text: str) -> int:
        for k in range(min(len(text), self.longest_stop - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0

    def _extend(self, final: bool) -> None:
        """Move the text that the tokens past `read` complete (all of it when `final`) into `text`."""
        window = self.decode(self.tokens[self.prefix :])
        before = self.decode(self.tokens[self.prefix : self.read]) if self.read > self.prefix else ""
        new = window[len(before) :] if len(window) > len(before) else ""
        start = len(self.text)
        if new.endswith("\ufffd") and not final:
            # an incomplete character: what precedes it is final, the window stays open
            stable = new.rstrip("\ufffd")
            self.text += stable[self.partial :]
            self.partial = max(self.partial, len(stable))
        else:
            self.text += new[self.partial :]
            self.partial = 0
            self.prefix, self.read = self.read, len(self.tokens)
        search_from = max(0, start - self.longest_stop + 1)
        found = [at for at in (self.text.find(s, search_from) for s in self.stop) if at >= 0]
        if found:
            self.stopped = True
            self.text = self.text[: min(found)]

    def push(self, token: int) -> str:
        self.tokens.append(token)
        if not self.incremental:
            return ""
        self._extend(final=False)
        if self.stopped:
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held(self.text))

    def finish(self) -> str:
        """The rest of the text (incomplete characters as U+FFFD); `text` is then the whole completion."""
        if not self.stopped and self.read < len(self.tokens):
            self._extend(final=True)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


@dataclass(frozen=True)
class CacheSlot:
    past: str  # input name, past_key_values.<i>.key|value
    present: str  # output name, present.<i>.key|value
    heads: int
    dim: int


class Decoder:
    """prefill / decode steps of a KV-cache ONNX graph; `run(feeds, output_names) -> list of arrays`."""

    def __init__(self, run, slots: list[CacheSlot], kv_dtype: str, logits: str = "logits"):
        self.run, self.slots, self.kv_dtype, self.logits = run, slots, np.dtype(kv_dtype), logits
        self.outputs = [logits] + [s.present for s in slots]

    def step(self, ids: list[int], past: list[np.ndarray] | None, start: int):
        """Logits of the last position, and the new cache, for `ids` placed after `start` cached positions."""
        n = len(ids)
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, start + n), dtype=np.int64),
            "position_ids": np.arange(start, start + n, dtype=np.int64)[None, :],
        }
        for i, s in enumerate(self.slots):
            feeds[s.past] = past[i] if past is not None else np.zeros((1, s.heads, 0, s.dim), dtype=self.kv_dtype)
        out = self.run(feeds, self.outputs)
        return out[0][0, -1], out[1:]


def generate(decoder: Decoder, prompt_ids: list[int], settings: Settings, text: TextStream, eos: set[int],
             max_sequence_len: int, cancelled=lambda: False):
    """Yields (token, text piece) per generated token; returns the finish reason."""
    sampler = Sampler(settings.temperature, settings.top_p, settings.seed)
    logits, past = decoder.step(prompt_ids, None, 0)
    position = len(prompt_ids)
    budget = min(settings.max_tokens, max_sequence_len - position)
    for i in range(budget):
        token = sampler(logits)
        if token in eos:
            return "eos"
        piece = text.push(token)
        yield token, piece
        if text.stopped:
            return "stop"
        # a cancellation check is a round trip to the server process (~70 µs here): not on every token
        if i == budget - 1 or (i % 16 == 15 and cancelled()):
            break
        logits, past = decoder.step([token], past, position)
        position += 1
    return "length"


class _Pump:
    """Sends a stream's chunks from a second thread, so a decode step never waits for `send()` (a round trip to
    the server, ~0.3 ms here). Tokens decoded while a send is under way leave together in the next response:
    the first token always goes alone (time to first token is unchanged), and when decoding outpaces sending,
    responses carry several tokens instead of queueing up one per token."""

    def __init__(self, sender, make_response):
        self.sender, self.make_response = sender, make_response
        self.queue, self.error = queue.SimpleQueue(), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        done = False
        while not done:
            item = self.queue.get()
            if item is None:
                return
            pieces, tokens = [item[0]], [item[1]]
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                pieces.append(item[0])
                tokens.append(item[1])
            if self.error is None:
                try:
                    self.sender.send(self.make_response("".join(pieces), tokens, ""))
                except Exception as exc:  # noqa: BLE001 — reported by close()
                    self.error = exc

    def put(self, piece: str, token: int) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((piece, token))

    def close(self) -> None:
        """Wait until every chunk is sent, so the FINAL response goes last."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _param(config: dict, key: str, default: str | None = None) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None:
        if default is None:
            raise KeyError(f"parameter {key!r} missing from config.pbtxt")
        return default
    return value


def _scalar(request, name: str, kind, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold one value, got {values.size}")
    value = values[0]
    return value.decode("utf-8") if isinstance(value, bytes) else kind(value)


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"])
        version_dir = model_dir / args["model_version"]
        self.tokenizer = Tokenizer.from_file(str(version_dir / _param(config, "tokenizer", "tokenizer") / "tokenizer.json"))
        self.eos = set(json.loads(_param(config, "eos_token_ids", "[]")))
        self.max_input_len = int(_param(config, "max_input_len"))
        self.max_output_len = int(_param(config, "max_output_len"))
        self.max_sequence_len = int(_param(config, "max_sequence_len"))
        self.default_max_tokens = int(_param(config, "default_max_tokens", "64"))
        cache = json.loads(_param(config, "kv_cache"))
        slots = [CacheSlot(**s) for s in cache["slots"]]
        self.engine_model = _param(config, "engine_model")
        self.engine_call = _param(config, "engine_call", "bls")
        if self.engine_call == "inprocess":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = int(_param(config, "intra_op_num_threads", "1"))
            onnx_path = model_dir.parent / _param(config, "engine_onnx")
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            run = lambda feeds, outputs: session.run(outputs, feeds)  # noqa: E731
        elif self.engine_call == "bls":
            run = self._bls
        else:
            raise ValueError(f"engine_call must be bls or inprocess, not {self.engine_call!r}")
        self.decoder = Decoder(run, slots, cache["dtype"], cache.get("logits", "logits"))
        self.shutdown = threading.Event()
        self.threads: set[threading.Thread] = set()
        self.lock = threading.Lock()

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

    def execute(self, requests):
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            with self.lock:
                self.threads.add(thread)
            thread.start()
        return None

    def finalize(self):
        self.shutdown.set()
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(timeout=10)

    def _settings(self, request) -> Settings:
        prompt = _scalar(request, "text_input", str, "")
        if not prompt.strip():
            raise RequestError("text_input is empty")
        max_tokens = _scalar(request, "max_tokens", int, self.default_max_tokens)
        if not 1 <= max_tokens <= self.max_output_len:
            raise RequestError(f"max_tokens must lie in 1..{self.max_output_len}, got {max_tokens}")
        temperature = _scalar(request, "temperature", float, 0.0)
        if not math.isfinite(temperature) or temperature < 0:
            raise RequestError(f"temperature must be ≥ 0, got {temperature}")
        top_p = _scalar(request, "top_p", float, 1.0)
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p must lie in (0, 1], got {top_p}")
        seed = _scalar(request, "seed", int, None)
        stop_tensor = pb_utils.get_input_tensor_by_name(request, "stop")
        stop = []
        if stop_tensor is not None:
            stop = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in stop_tensor.as_numpy().reshape(-1)]
        stream = bool(_scalar(request, "stream", bool, False))
        return Settings(prompt, max_tokens, temperature, top_p, seed, stop, stream)

    @staticmethod
    def _response(text: str, tokens: list[int], finish: str):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.asarray(tokens, dtype=np.int64)),
            pb_utils.Tensor("finish_reason", np.array([finish.encode("utf-8")], dtype=np.object_)),
        ])

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            try:
                settings = self._settings(request)
            except UnicodeDecodeError:
                raise RequestError("text inputs must be UTF-8") from None
            prompt_ids = self.tokenizer.encode(settings.prompt).ids
            if not prompt_ids:
                raise RequestError("text_input has no tokens")
            if len(prompt_ids) > self.max_input_len:
                raise RequestError(f"prompt has {len(prompt_ids)} tokens; this deployment accepts at most {self.max_input_len}")
            text = TextStream(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), settings.stop,
                              incremental=settings.stream)
            cancelled = getattr(request, "is_cancelled", lambda: False)
            stopping = lambda: self.shutdown.is_set() or cancelled()  # noqa: E731
            tokens: list[int] = []
            steps = generate(self.decoder, prompt_ids, settings, text, self.eos, self.max_sequence_len, stopping)
            chunks = _Pump(sender, self._response) if settings.stream else None
            try:
                while True:
                    try:
                        token, piece = next(steps)
                    except StopIteration as done:
                        finish = done.value
                        break
                    tokens.append(token)
                    if chunks is not None:
                        chunks.put(piece, token)
            finally:
                if chunks is not None:
                    chunks.close()
            if self.shutdown.is_set():
                raise RequestError("the server is shutting down")
            rest = text.finish()
            if settings.stream:
                sender.send(self._response(rest, [], finish), flags=final)
            else:
                sender.send(self._response(text.text, tokens, finish), flags=final)
        except RequestError as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=final)
        except Exception as exc:  # noqa: BLE001 — a thread's exception never reaches the client: answer it
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generate failed: {type(exc).__name__}: {detail}")), flags=final)
        finally:
            with self.lock:
                self.threads.discard(threading.current_thread())
