"""A test-only Triton python model speaking the `generate` contract (issue 10: max_batch_size 1, [1, 1] inputs,
skip_special_tokens, num_input_tokens / num_output_tokens, "server busy:" errors) whose output is scripted by
the prompt instead of sampled from weights — so the gateway's tests can craft what no tiny random model would
say (R1 reasoning with and without an opening tag, tags split across chunks), a busy server, and a slow stream
whose cancellation it records. Not part of r1deploy: tests/test_gateway.py writes it into a repository.

Directives found in the prompt:
  [busy]           an error response "server busy: …" (the gateway answers 429)
  [slow]           one token every 50 ms up to max_tokens; writes <marker_dir>/started-<seed> first, then
                   cancelled-<seed> when cancelled or finished-<seed> when it ran to its end
  [fail-mid]       two chunks, then an error response (a failure after the stream started)
  [script:NAME]    the chunks of SCRIPTS[NAME], one response each when streaming
"""

import json
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

SCRIPTS = {
    # the template's prompt ends with "<think>\n"; the model writes the closing tag only
    "noopen": ["Two plus", " two is four", ".</think>", "\n\nThe answer is 4."],
    # an opening tag generated anyway, and the closing tag split across two chunks
    "open": ["<think>", "Let me th", "ink.</th", "ink>\n\nThe ans", "wer is 4."],
    # the thought never closes (cut by max_tokens)
    "unclosed": ["Still thinking", " about it"],
    # R1's tool-call format after the thought: some content, then two calls, tags and arguments split across chunks
    "tool": ["I should look it up.</think>", "\n\nLet me check.", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function",
             "<｜tool▁sep｜>get_weather\n```json\n{\"city\": ", "\"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>",
             "function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"],
    # a call whose arguments are not JSON: left in the content as written
    "tool-bad": ["Hm.</think>", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n",
                 "{city: Paris}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"],
    # what guided decoding lets through for a forced call: JSON after the thought (required; a named function)
    "forced": ["Time first.</think>", "[{\"name\": \"get_time\", ", "\"parameters\": {}}, {\"name\": \"get_weather\", "
               "\"parameters\": {\"city\": \"Oslo\"}}]"],
    "forced-named": ["Oslo.</think>", "{\"city\": ", "\"Oslo\"}"],
}
TAGS = ("<think>", "</think>")


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer" / "tokenizer.json"))
        self.marker_dir = Path(params["marker_dir"])

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    @staticmethod
    def _value(request, name, default):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            return default
        v = t.as_numpy().reshape(-1)[0]
        return v.decode() if isinstance(v, bytes) else v.item()

    def _response(self, text, ids, finish, n_in):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.asarray([ids], dtype=np.int64).reshape(1, -1)),
            pb_utils.Tensor("finish_reason", np.array([[finish.encode()]], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([[n_in]], dtype=np.uint32)),
            pb_utils.Tensor("num_output_tokens", np.array([[len(ids)]], dtype=np.uint32)),
        ])

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt = self._value(request, "text_input", "")
            stream = bool(self._value(request, "stream", False))
            skip = bool(self._value(request, "skip_special_tokens", True))
            max_tokens = int(self._value(request, "max_tokens", 16))
            seed = int(self._value(request, "seed", 0))
            n_in = len(self.tokenizer.encode(prompt).ids)
            if "[busy]" in prompt:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("server busy: 4 requests queued (max_queue 4)")), flags=final)
                return
            if "[fail-mid]" in prompt:
                for i in range(2):
                    sender.send(self._response(" tick", [100 + i], "", n_in))
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("generate failed: RuntimeError: engine lost")), flags=final)
                return
            if "[slow]" in prompt:
                (self.marker_dir / f"started-{seed}").write_text("")
                for i in range(max_tokens):
                    if request.is_cancelled():
                        (self.marker_dir / f"cancelled-{seed}").write_text(str(i))
                        sender.send(flags=final)
                        return
                    sender.send(self._response(" tick", [100 + i % 50], "", n_in))
                    time.sleep(0.05)
                (self.marker_dir / f"finished-{seed}").write_text(str(max_tokens))
                sender.send(self._response("", [], "length", n_in), flags=final)
                return
            name = prompt.split("[script:", 1)[1].split("]", 1)[0] if "[script:" in prompt else "noopen"
            pieces = []
            for text in SCRIPTS[name]:
                ids = self.tokenizer.encode(text, add_special_tokens=False).ids
                if skip:
                    for tag in TAGS:
                        text = text.replace(tag, "")
                pieces.append((text, ids))
            finish = "length" if name == "unclosed" else "eos"
            if stream:
                for text, ids in pieces:
                    sender.send(self._response(text, ids, "", n_in))
                sender.send(self._response("", [], finish, n_in), flags=final)
            else:
                text = "".join(p[0] for p in pieces)
                ids = [i for p in pieces for i in p[1]]
                sender.send(self._response(text, ids, finish, n_in), flags=final)
        except Exception as exc:  # noqa: BLE001 — answer the client in every case
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generate failed: {exc}")), flags=final)
