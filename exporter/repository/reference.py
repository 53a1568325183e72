"""The in-process baseline the served `generate` model is checked and benchmarked against: a plain greedy loop
over the exported KV-cache ONNX graph with ONNX Runtime, written independently of python_models/generate.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class GreedyLoop:
    def __init__(self, onnx_path: Path, intra_op_num_threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=dtype[i.type]) for i in self.past}

    def __call__(self, prompt_ids: list[int], max_tokens: int, eos_ids: set[int] = frozenset()) -> list[int]:
        """Generated token ids (eos excluded), at most `max_tokens`."""
        n = len(prompt_ids)
        feeds = {
            "input_ids": np.asarray([prompt_ids], dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None, :],
            **self.empty,
        }
        tokens: list[int] = []
        while True:
            out = dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))
            token = int(np.argmax(out["logits"][0, -1]))
            if token in eos_ids:
                return tokens
            tokens.append(token)
            if len(tokens) == max_tokens:
                return tokens
            total = n + len(tokens)
            feeds = {
                "input_ids": np.asarray([[token]], dtype=np.int64),
                "attention_mask": np.ones((1, total), dtype=np.int64),
                "position_ids": np.asarray([[total - 1]], dtype=np.int64),
            }
            for i in self.past:
                feeds[i.name] = out[i.name.replace("past_key_values.", "present.")]
