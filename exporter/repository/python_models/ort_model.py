"""Triton python-backend model `python_ort`: runs the ONNX file beside it with ONNX Runtime (CPU).

For servers without Triton's onnxruntime backend (the CPU Triton bundled in nvidia-pytriton has only the python
backend). Requests the dynamic batcher delivers together are concatenated along the batch axis when their
shapes agree (decode steps at different cache lengths cannot be batched) and run in one call.

Errors: the client gets one clean line; the traceback goes to Triton's log.

Written by `r1deploy repository`; the source is exporter/repository/python_models/ort_model.py.
"""

import json
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _param(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_param(config, "intra_op_num_threads", "1"))
        # INT4 qdq weights: activations FP32 (what the quantize stage measured) unless the repository says int8
        # (ONNX Runtime's MatMulNBits default; docs/serving.md "INT4 on ONNX Runtime")
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                         {"fp32": "0", "int8": "4"}[_param(config, "ort_int4_activations", "fp32")])
        self.session = ort.InferenceSession(
            str(version_dir / _param(config, "onnx_file", "model.onnx")), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]

    def _run(self, group):
        feeds = {}
        for name in self.input_names:
            arrays = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in group]
            feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        outputs = self.session.run(self.output_names, feeds)
        responses, start = [], 0
        for r in group:
            n = pb_utils.get_input_tensor_by_name(r, self.input_names[0]).as_numpy().shape[0]
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + n])) for name, out in zip(self.output_names, outputs, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def execute(self, requests):
        groups: dict = {}
        for i, r in enumerate(requests):
            shapes = tuple(tuple(pb_utils.get_input_tensor_by_name(r, n).as_numpy().shape[1:]) for n in self.input_names)
            groups.setdefault(shapes, []).append(i)
        responses = [None] * len(requests)
        for indices in groups.values():
            group = [requests[i] for i in indices]
            try:
                answers = self._run(group)
            except Exception as exc:  # one bad group must not fail the others
                pb_utils.Logger.log_error(f"python_ort: {len(group)} request(s) failed:\n{traceback.format_exc()}")
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                answers = [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {message}")) for _ in group]
            for i, answer in zip(indices, answers, strict=True):
                responses[i] = answer
        return responses
