"""Triton python-backend model `tokenizer`: text → the encoder's token tensors (first step of `embed`).

The tokenizer files lie in `tokenizer/` beside this file. Sequences are truncated to `max_length` (the
deployment profile's max_input_len, capped at the model's max_position_embeddings) and padded to the longest
sequence of the request.

Written by `r1deploy repository`; the source is exporter/repository/python_models/tokenizer.py.
"""

import json
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
        self.tokenizer.enable_truncation(int(_param(config, "max_length", "512")))
        self.pad_id = int(_param(config, "pad_token_id", "0"))
        self.outputs = [o["name"] for o in config["output"]]

    def _encode(self, request):
        raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
        try:
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
        except UnicodeDecodeError:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("text is not valid UTF-8"))
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
        return [self._encode(r) for r in requests]
