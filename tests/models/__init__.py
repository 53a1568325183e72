"""A catalogue of deliberately broken inputs — checkpoints, workdirs and ONNX graphs — each built from a good
one by a small function, and each tied to the test that asserts its error (message and exit code).

    from models import BROKEN
    bad = BROKEN["prefixed-weights"].build(good_checkpoint, tmp_path / "bad")

`test_every_broken_input_has_its_test` (tests/test_bad_input.py) checks that each entry names a test that
exists, so an entry cannot outlive its test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Broken:
    name: str
    what: str  # what is wrong with it
    build: Callable[[Path, Path], Path]  # (good input, destination) → the broken input
    test: str  # "tests/test_x.py::test_name" — where its error is asserted


def _copy(good: Path, dest: Path) -> Path:
    shutil.copytree(good, dest)
    return dest


def _edit_config(dest: Path, edit: Callable[[dict], object]) -> Path:
    cfg = json.loads((dest / "config.json").read_text())
    new = edit(cfg)
    (dest / "config.json").write_text(json.dumps(cfg if new is None else new))
    return dest


def _rename_tensors(good: Path, dest: Path, rename: Callable[[str], str]) -> Path:
    from safetensors.torch import load_file, save_file

    _copy(good, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


# -- checkpoints (good = a tiny Qwen2 checkpoint from exporter.tiny_models) ----------------------------------------

def prefixed_weights(good: Path, dest: Path) -> Path:
    """Every tensor name prefixed with `x.`: nothing matches, transformers would initialise the model at random."""
    return _rename_tensors(good, dest, lambda k: f"x.{k}")


def other_architecture(good: Path, dest: Path) -> Path:
    """config.json claims Llama; the weights are Qwen2's (q/k/v biases Llama has no place for)."""
    _copy(good, dest)
    return _edit_config(dest, lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]))


def zero_hidden_size(good: Path, dest: Path) -> Path:
    return _edit_config(_copy(good, dest), lambda c: c.update(hidden_size=0))


def string_vocab_size(good: Path, dest: Path) -> Path:
    return _edit_config(_copy(good, dest), lambda c: c.update(vocab_size="128"))


def config_is_a_list(good: Path, dest: Path) -> Path:
    return _edit_config(_copy(good, dest), lambda c: [c])


def index_is_a_list(good: Path, dest: Path) -> Path:
    _copy(good, dest)
    (dest / "model.safetensors.index.json").write_text(json.dumps([{"weight_map": {}}]))
    return dest


def index_outside_checkpoint(good: Path, dest: Path) -> Path:
    """A sharded checkpoint whose index names a shard beside the checkpoint, not in it."""
    from safetensors.torch import load_file

    _copy(good, dest)
    outside = dest.parent / f"{dest.name}-outside.safetensors"
    (dest / "model.safetensors").rename(outside)
    names = load_file(str(outside))
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f"../{outside.name}" for k in names}})
    )
    return dest


def no_tokenizer(good: Path, dest: Path) -> Path:
    """Weights and config only: it exports, but a Triton repository of it could not tokenize."""
    _copy(good, dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "chat_template.jinja"):
        (dest / name).unlink(missing_ok=True)
    return dest


def corrupt_generation_config(good: Path, dest: Path) -> Path:
    """generation_config.json cut in half: the generate model would lose its end-of-sequence token."""
    _copy(good, dest)
    text = (dest / "generation_config.json").read_text()
    (dest / "generation_config.json").write_text(text[: len(text) // 2])
    return dest


# -- workdirs (good = an export's workdir) ------------------------------------------------------------------

def corrupt_export_report(good: Path, dest: Path) -> Path:
    """A workdir whose export_report.json is cut in half (a full disk, a hand edit)."""
    shutil.copytree(good, dest, symlinks=True)
    for report in dest.glob("*/onnx/fp32/export_report.json"):
        report.write_text(report.read_text()[:40])
    return dest


# -- ONNX graphs ---------------------------------------------------------------------------------------------

def unknown_op_graph(_good: Path | None, dest: Path) -> Path:
    """An ONNX graph with one node of a custom domain no parser knows (`my_fancy_node`, op FancyOp)."""
    import onnx
    from onnx import TensorProto, helper

    dest.parent.mkdir(parents=True, exist_ok=True)
    node = helper.make_node("FancyOp", ["input_ids"], ["y"], name="my_fancy_node", domain="com.example")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(dest))
    return dest


# -- model repositories --------------------------------------------------------------------------------------

def failing_model_repository(_good: Path | None, dest: Path) -> Path:
    """A Triton repository whose one python model raises in initialize(): the server aborts its start-up."""
    (dest / "bad" / "1").mkdir(parents=True)
    (dest / "bad" / "config.pbtxt").write_text(
        'name: "bad"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "x", data_type: TYPE_FP32, dims: [1] }]\n'
        'output [{ name: "y", data_type: TYPE_FP32, dims: [1] }]\n'
        "instance_group [{ kind: KIND_CPU }]\n"
    )
    (dest / "bad" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n"
        "        raise RuntimeError('weights file model.onnx is missing')\n"
    )
    return dest


_T = "tests/test_bad_input.py::"
BROKEN = {b.name: b for b in (
    Broken("prefixed-weights", "tensor names do not match the architecture", prefixed_weights, _T + "test_weights_that_do_not_match_the_architecture"),
    Broken("other-architecture", "config.json names another architecture", other_architecture, _T + "test_weights_that_do_not_match_the_architecture"),
    Broken("zero-hidden-size", "hidden_size 0", zero_hidden_size, _T + "test_impossible_config_sizes"),
    Broken("string-vocab-size", 'vocab_size "128"', string_vocab_size, _T + "test_impossible_config_sizes"),
    Broken("config-list", "config.json is a JSON list", config_is_a_list, _T + "test_json_that_is_not_an_object"),
    Broken("index-list", "the safetensors index is a JSON list", index_is_a_list, _T + "test_json_that_is_not_an_object"),
    Broken("index-outside", "the index names a shard outside the checkpoint", index_outside_checkpoint, _T + "test_index_pointing_outside_the_checkpoint"),
    Broken("no-tokenizer", "no tokenizer files", no_tokenizer, _T + "test_checkpoint_without_tokenizer_gives_no_repository"),
    Broken("corrupt-generation-config", "generation_config.json cut in half", corrupt_generation_config, _T + "test_corrupt_generation_config"),
    Broken("corrupt-export-report", "export_report.json cut in half", corrupt_export_report, _T + "test_corrupt_export_report"),
    Broken("failing-model-repository", "a python model that raises in initialize()", failing_model_repository, "tests/test_serve.py::test_startup_failure_quotes_the_abort_line"),
    Broken("unknown-op-graph", "an ONNX node of an unknown custom op", unknown_op_graph, "tests/test_engine.py::test_parser_error_is_one_line_with_node_and_op"),
)}
