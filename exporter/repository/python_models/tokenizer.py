"""Triton python-backend model `tokenizer`: text → the encoder's token tensors (first step of `embed`).

The tokenizer files lie in `tokenizer/` beside this file. Sequences are truncated to `max_length` (the
deployment profile's max_input_len, capped at the model's max_position_embeddings) and padded to the longest
sequence of the request. A text longer than `max_text_bytes` (default 32 bytes per token of max_length) is
refused before it is tokenized: tokenizing a megabyte costs the server seconds only to drop most of it.

Errors: the client gets one clean line; an unexpected one also goes, with its traceback, to Triton's log.

Written by `r1deploy repository`; the source is exporter/repository/python_models/tokenizer.py.
"""

import json
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


def _param(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = Tokenizer.from_file(str(version_dir / _param(config, "tokenizer", "tokenizer") / "tokenizer.json"))
        self.tokenizer.no_padding()
        max_length = int(_param(config, "max_length", "512"))
        self.tokenizer.enable_truncation(max_length)
        self.max_text_bytes = int(_param(config, "max_text_bytes", str(32 * max_length)))
        self.pad_id = int(_param(config, "pad_token_id", "0"))
        self.outputs = [o["name"] for o in config["output"]]

    def _encode(self, request):
        raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
        longest = max((len(t) if isinstance(t, bytes) else len(str(t).encode()) for t in raw), default=0)
        if longest > self.max_text_bytes:
            return _error(f"text of {longest} bytes is longer than the {self.max_text_bytes} bytes accepted", bad_input=True)
        try:
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
        except UnicodeDecodeError:
            return _error("text is not valid UTF-8", bad_input=True)
        if not texts:
            return _error("no text in the request", bad_input=True)
        encodings = self.tokenizer.encode_batch(texts)
        length = max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.int64)
        types = np.zeros((len(texts), length), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = 1
            types[row, :n] = e.type_ids
        values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, values[n]) for n in self.outputs])

    def execute(self, requests):
        responses = []
        for r in requests:
            try:
                responses.append(self._encode(r))
            except Exception as exc:  # one bad request must not fail the batch, nor leak a traceback to a client
                pb_utils.Logger.log_error(f"tokenizer: request failed:\n{traceback.format_exc()}")
                responses.append(_error(f"tokenizer: {type(exc).__name__}: {_first_line(exc)}"))
        return responses


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _error(message: str, bad_input: bool = False):
    """The client's fault: INVALID_ARG (HTTP 400); anything else the server's (HTTP 500)."""
    code = pb_utils.TritonError.INVALID_ARG if bad_input else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
