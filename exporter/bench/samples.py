"""Small real models for checking the benchmark itself: python-backend models written into a Triton model
repository, served by the real (CPU) tritonserver. They are not mocks — each does its work on the server:

* `echo`     — sub-millisecond (FP32 [16] + 1); client overhead dominates, as on a fast GPU model.
* `work`     — a few milliseconds of numpy (BYTES text + INT64 ids → FP32 [64]), dynamic batching.
* `stream`   — decoupled, the `generate` contract: text_input (+ max_tokens, stream, …) → one response per
               token after a first-token delay, then an empty FINAL response; one thread per request.
* `minilm`   — all-MiniLM-L6-v2 in ONNX Runtime (text → FP32 [384]), like the served `embed` model.

Configs are `ModelConfig` protos written with `text_format`, never text templates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

_ECHO = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))]))
        return out
'''

_WORK = '''
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.rounds = int(params.get("rounds", {}).get("string_value", "4"))
        rng = np.random.default_rng(0)
        self.w = rng.standard_normal((256, 256)).astype(np.float32) / 16
        self.out = rng.standard_normal((256, 64)).astype(np.float32) / 16

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            ids = pb_utils.get_input_tensor_by_name(request, "ids").as_numpy()
            n = text.shape[0]
            h = np.ones((n * 64, 256), np.float32) * (float(ids.sum() % 7) + len(text.reshape(-1)[0]))
            for _ in range(self.rounds):
                h = np.tanh(h @ self.w)
            emb = h.reshape(n, 64, 256).mean(axis=1) @ self.out
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("embedding", emb.astype(np.float32))]))
        return responses
'''

_STREAM = '''
import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _opt(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return default if t is None else t.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        get = lambda k, d: float(params.get(k, {}).get("string_value", d))
        self.first_s = get("first_token_ms", "20") / 1000
        self.token_s = get("token_ms", "4") / 1000
        self.default_tokens = int(get("default_max_tokens", "16"))

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            prompt = _opt(request, "text_input", b"")
            n = int(_opt(request, "max_tokens", self.default_tokens))
            stream = bool(_opt(request, "stream", True))
            if n < 0:
                raise ValueError("max_tokens must be >= 0")
            time.sleep(self.first_s)
            ids = []
            for i in range(n):
                if i:
                    time.sleep(self.token_s)
                tok = (len(prompt) + i) % 1000
                ids.append(tok)
                if stream:
                    sender.send(self._response(f"t{tok} ", [tok], "length" if i == n - 1 else ""))
            if stream:
                sender.send(flags=FINAL)
            else:
                text = "".join(f"t{t} " for t in ids)
                sender.send(self._response(text, ids, "length"), flags=FINAL)
        except Exception as exc:  # an exception in this thread would never reach the client
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=FINAL)

    @staticmethod
    def _response(text, ids, reason):
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.array(ids, dtype=np.int64)),
            pb_utils.Tensor("finish_reason", np.array([reason.encode()], dtype=np.object_)),
        ])
'''

_MINILM = '''
import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(params["onnx"]["string_value"], opts, providers=["CPUExecutionProvider"])
        self.names = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(params["tokenizer"]["string_value"])
        self.tokenizer.enable_truncation(128)
        self.tokenizer.enable_padding()

    def execute(self, requests):
        texts, counts = [], []
        for request in requests:
            t = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            texts += [x.decode("utf-8", "replace") for x in t]
            counts.append(len(t))
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.names})[0]
        m = mask[..., None].astype(np.float32)
        emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        out, at = [], 0
        for n in counts:
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("embeddings", emb[at:at + n].astype(np.float32))]))
            at += n
        return out
'''


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> dict:
    return {"name": name, "data_type": getattr(mc, dtype), "dims": dims, "optional": optional}


def _write(repo: Path, name: str, source: str, cfg: mc.ModelConfig) -> Path:
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.py").write_text(source.lstrip())
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    return model_dir


def _config(name: str, inputs: list[dict], outputs: list[dict], max_batch_size: int = 0, instances: int = 1,
            params: Optional[dict[str, str]] = None) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    for t in inputs:
        cfg.input.add(name=t["name"], data_type=t["data_type"], dims=t["dims"], optional=t["optional"])
    for t in outputs:
        cfg.output.add(name=t["name"], data_type=t["data_type"], dims=t["dims"])
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    if max_batch_size:
        cfg.dynamic_batching.max_queue_delay_microseconds = 100
    for k, v in (params or {}).items():
        cfg.parameters[k].string_value = v
    return cfg


def write_echo(repo: Path, name: str = "echo", max_batch_size: int = 8) -> Path:
    cfg = _config(name, [_tensor("INPUT0", "TYPE_FP32", [16])], [_tensor("OUTPUT0", "TYPE_FP32", [16])],
                  max_batch_size=max_batch_size)
    return _write(repo, name, _ECHO, cfg)


def write_work(repo: Path, name: str = "work", rounds: int = 4) -> Path:
    cfg = _config(
        name,
        [_tensor("text", "TYPE_STRING", [1]), _tensor("ids", "TYPE_INT64", [8])],
        [_tensor("embedding", "TYPE_FP32", [64])],
        max_batch_size=4, params={"rounds": str(rounds)},
    )
    return _write(repo, name, _WORK, cfg)


def write_stream(repo: Path, name: str = "stream", first_token_ms: float = 20, token_ms: float = 4) -> Path:
    cfg = _config(
        name,
        [
            _tensor("text_input", "TYPE_STRING", [1]),
            _tensor("max_tokens", "TYPE_INT32", [1], optional=True),
            _tensor("temperature", "TYPE_FP32", [1], optional=True),
            _tensor("stream", "TYPE_BOOL", [1], optional=True),
        ],
        [
            _tensor("text_output", "TYPE_STRING", [1]),
            _tensor("token_ids", "TYPE_INT64", [-1]),
            _tensor("finish_reason", "TYPE_STRING", [1]),
        ],
        params={"first_token_ms": str(first_token_ms), "token_ms": str(token_ms)},
    )
    cfg.model_transaction_policy.decoupled = True
    return _write(repo, name, _STREAM, cfg)


def write_minilm(repo: Path, onnx_path: Path, tokenizer_json: Path, name: str = "minilm",
                 max_batch_size: int = 8, instances: int = 1) -> Path:
    cfg = _config(
        name, [_tensor("text", "TYPE_STRING", [1])], [_tensor("embeddings", "TYPE_FP32", [384])],
        max_batch_size=max_batch_size, instances=instances,
        params={"onnx": str(Path(onnx_path).resolve()), "tokenizer": str(Path(tokenizer_json).resolve())},
    )
    return _write(repo, name, _MINILM, cfg)
