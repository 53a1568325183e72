"""SharedKVEngine (exporter/repository/python_models/kv_shared.py) on the real fused graph of r1-distill-tiny in
ONNX Runtime: rows of different lengths joining and leaving one buffer give each row the greedy tokens it gets
alone, from the generic graph, and from PyTorch."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest

MODELS_DIR = Path(__file__).resolve().parents[1] / "exporter" / "repository" / "python_models"
sys.path.insert(0, str(MODELS_DIR))

from kv_shared import SharedKVEngine  # noqa: E402

VOCAB_LOW = 3


@pytest.fixture(scope="module")
def fused_path(exported_fused):
    return exported_fused("r1-distill-tiny").onnx_path


@pytest.fixture(scope="module")
def generic_path(exported):
    return exported("r1-distill-tiny").onnx_path


def _prompts(seed: int, lengths: list[int], vocab: int = 772) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(VOCAB_LOW, vocab, n).tolist() for n in lengths]


def _alone(path: Path, prompt: list[int], n: int) -> list[int]:
    engine = SharedKVEngine.from_path(path, max_rows=1, max_seq=64, threads=1)
    tokens = [int(engine.prefill([0], [prompt])[0].argmax())]
    while len(tokens) < n:
        tokens.append(int(engine.decode([0], [tokens[-1]])[0].argmax()))
    return tokens


def _torch_greedy(checkpoint: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_rows_joining_and_leaving_get_the_tokens_they_get_alone(fused_path, generic_path, session_workdir):
    from exporter.repository.reference import GreedyLoop

    engine = SharedKVEngine.from_path(fused_path, max_rows=5, max_seq=64, threads=1)
    prompts = dict(zip([0, 1, 2], _prompts(1, [5, 11, 3]), strict=True))
    out: dict[int, list[int]] = {r: [] for r in prompts}
    logits = engine.prefill([2, 0, 1], [prompts[2], prompts[0], prompts[1]])  # any order
    for i, r in enumerate([2, 0, 1]):
        out[r].append(int(logits[i].argmax()))
    finished: list[tuple[list[int], list[int]]] = []
    for step in range(9):
        if step == 2:  # row 1 leaves; row 4 joins with a row between it and the others that is free
            engine.release([1])
            finished.append((prompts.pop(1), out.pop(1)))
            prompts[4] = _prompts(2, [7])[0]
            out[4] = [int(engine.prefill([4], [prompts[4]])[0].argmax())]
        if step == 4:  # row 1 is reused at once for a shorter prompt
            prompts[1] = _prompts(3, [2])[0]
            out[1] = [int(engine.prefill([1], [prompts[1]])[0].argmax())]
        # row 2 sits out step 5: it stays inside the call's span, its cache must not move
        rows = [r for r in sorted(out) if not (step == 5 and r == 2)]
        logits = engine.decode(rows, [out[r][-1] for r in rows])
        for i, r in enumerate(rows):
            out[r].append(int(logits[i].argmax()))
    finished += [(prompts[r], out[r]) for r in out]
    for r in out:
        assert engine.cached(r) == len(prompts[r]) + len(out[r]) - 1
    loop = GreedyLoop(generic_path)
    checkpoint = session_workdir / "models" / "r1-distill-tiny"
    for prompt, tokens in finished:
        assert tokens == _alone(fused_path, prompt, len(tokens))
        assert tokens == loop(prompt, len(tokens))
        assert tokens == _torch_greedy(checkpoint, prompt, len(tokens))


def test_the_cache_is_updated_in_place_and_idle_rows_are_untouched(fused_path):
    engine = SharedKVEngine.from_path(fused_path, max_rows=3, max_seq=32, threads=1)
    addresses = {n: b.ctypes.data for n, b in engine.buffers.items()}
    engine.prefill([0, 1, 2], _prompts(4, [4, 6, 2]))
    before = {n: b[1].copy() for n, b in engine.buffers.items()}
    engine.decode([0, 2], [10, 11])  # row 1 lies inside the span [0, 3) but takes no part
    for name, buf in engine.buffers.items():
        assert buf.ctypes.data == addresses[name]  # ONNX Runtime wrote into the engine's own memory
        assert np.array_equal(buf[1], before[name])
        assert np.any(buf[0, :, 4]) and not np.any(buf[0, :, 5])  # row 0's new token went to position 4
        assert np.any(buf[2, :, 2]) and not np.any(buf[2, :, 3])
    assert [engine.cached(r) for r in range(3)] == [5, 6, 3]


def test_bad_calls_are_refused(fused_path, generic_path):
    engine = SharedKVEngine.from_path(fused_path, max_rows=2, max_seq=8, threads=1)
    with pytest.raises(ValueError, match="does not fit"):
        engine.prefill([0], [list(range(3, 12))])
    engine.prefill([0], [[5, 6, 7, 8, 9, 10, 11]])
    with pytest.raises(ValueError, match="in use"):
        engine.prefill([0], [[5]])
    with pytest.raises(ValueError, match="has no prompt"):
        engine.decode([1], [5])
    with pytest.raises(ValueError, match="twice"):
        engine.decode([0, 0], [5, 5])
    with pytest.raises(ValueError, match="outside"):
        engine.decode([2], [5])
    engine.decode([0], [5])  # the 8th position
    with pytest.raises(ValueError, match="full"):
        engine.decode([0], [5])
    engine.release([0])
    assert engine.cached(0) == 0
    with pytest.raises(ValueError, match="--graph fused"):
        SharedKVEngine.from_path(generic_path, max_rows=1, max_seq=8)


def _imports(module: str) -> set[str]:
    tree = ast.parse((MODELS_DIR / f"{module}.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return modules | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_kv_shared_imports_only_numpy_onnxruntime_and_its_memory_layer():
    """They are copied into the Triton model directory (the image has no torch): kv_shared needs only numpy,
    onnxruntime and kv_memory, and kv_memory only numpy and the standard library (cuda-python, lazily)."""
    assert _imports("kv_shared") == {"numpy", "onnxruntime", "kv_memory"}
    assert _imports("kv_memory") == {"__future__", "collections", "ctypes", "numpy", "typing", "weakref", "cuda"}


def test_fork_copies_a_row_and_the_copies_decode_as_the_source(fused_path):
    """n choices over the fused graph: a prefilled row forked into two free rows (one inside, one past the span
    of running rows); all three then decode the same greedy tokens as the prompt alone, and a row in use or a
    row without a prompt is refused."""
    prompt = _prompts(3, [13])[0]
    want = _alone(fused_path, prompt, 8)
    engine = SharedKVEngine.from_path(fused_path, max_rows=5, max_seq=64, threads=1)
    other = _prompts(4, [9])[0]
    first = engine.prefill([0, 2], [prompt, other])
    engine.fork(0, [1, 4])
    assert [engine.cached(r) for r in range(5)] == [13, 13, 9, 0, 13]
    tokens = {r: [int(first[0].argmax())] for r in (0, 1, 4)}
    others = [int(first[1].argmax())]
    while len(tokens[0]) < 8:
        logits = engine.decode([0, 1, 2, 4], [tokens[0][-1], tokens[1][-1], others[-1], tokens[4][-1]])
        for i, r in enumerate((0, 1, 4)):
            tokens[r].append(int(logits[[0, 1, 3][i]].argmax()))
        others.append(int(logits[2].argmax()))
    assert tokens[0] == tokens[1] == tokens[4] == want
    assert others == _alone(fused_path, other, 8)
    with pytest.raises(ValueError, match="in use"):
        engine.fork(0, [2])
    with pytest.raises(ValueError, match="no prompt"):
        engine.fork(3, [3])


def test_int4_activations_fp32_serve_what_the_quantize_stage_measured(session_workdir, exported_fused):
    """ONNX Runtime fuses INT4 DequantizeLinear → MatMul into MatMulNBits, which by default also quantizes the
    activations to int8. The served engine keeps them FP32 unless told otherwise: its logits are then those of the
    quantize stage's evaluation session (the figures the gate read) to float rounding, and int8 moves them."""
    from quantize import QuantizeConfig, quantize_model
    from quantize.evaluate import fused_feeds, session

    exported = exported_fused("r1-distill-tiny")
    # not the edge profile's variant: repositories written from the session's workdir would pick that one up
    q = quantize_model(QuantizeConfig(model="r1-distill-tiny", workdir=session_workdir, graph="fused", precision="int4",
                                      method="rtn", block_size=32, format="qdq"))
    report = json.loads(exported.report_path.read_text())
    prompt = _prompts(7, [23])[0]
    mask = np.ones((1, len(prompt)), np.int64)
    feeds = {"input_ids": np.asarray([prompt], np.int64), **fused_feeds(mask, report["cache"])}
    measured = session(q.onnx_path).run(["logits"], feeds)[0][0, -1]
    served = {a: SharedKVEngine.from_path(q.onnx_path, max_rows=1, max_seq=64, threads=1, int4_activations=a)
              .prefill([0], [prompt])[0] for a in ("fp32", "int8")}
    scale = float(np.max(np.abs(measured)))
    assert np.max(np.abs(served["fp32"] - measured)) <= 1e-5 * scale
    assert np.max(np.abs(served["int8"] - measured)) > 1e-4 * scale
