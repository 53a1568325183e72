"""The KV cache's memory layer (exporter/repository/python_models/kv_memory.py) and the engines over it, on the CPU.

The engines move the cache only through the layer's 2-D block copies and bind its buffers by address; the host
backend runs the same offsets and pitches as the CUDA backend, only the copy primitive differs. `Opaque` memory
hands out buffers that are only a pointer, a shape and a dtype (what CUDA buffers are): an engine that touched a
buffer with numpy would fail on it. The CUDA backend itself is UNVERIFIED (no GPU here): only its failure is tested.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

MODELS_DIR = Path(__file__).resolve().parents[1] / "exporter" / "repository" / "python_models"
sys.path.insert(0, str(MODELS_DIR))

import engine_runtimes as er  # noqa: E402
import kv_memory as km  # noqa: E402
import kv_shared  # noqa: E402
from kv_padded import CacheSlot, PaddedKVEngine  # noqa: E402


class Opaque(km.HostMemory):
    """Host memory whose buffers are `DeviceArray`s, as the CUDA backend's are, and that says it is not the host
    (so SharedKVEngine takes its GPU path: small inputs bound again at every run)."""

    is_host = False

    def alloc(self, shape, dtype, zero=True):
        arr = super().alloc(shape, dtype, zero)
        return km.DeviceArray(arr.ptr, arr.shape, arr.dtype, owner=arr)


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- the 2-D copy primitive against numpy ------------------------------------------------------------------------
def test_block_copies_are_the_numpy_slices_they_stand_for():
    m = km.HostMemory()
    a = m.alloc((4, 3, 6, 5), np.float32)
    a[...] = _rand(a.shape)
    ref = np.array(a)

    # fork: row 1's first 4 positions into row 3
    m.copy2d(km.positions(a, (3, 4), (0, 4)), km.positions(a, (1, 2), (0, 4)), "d2d")
    ref[3, :, :4] = ref[1, :, :4]
    assert np.array_equal(a, ref)

    # a cached block written into row 2 at positions 2..5, and read back
    block = _rand((3, 3, 5), seed=1)
    m.copy2d(km.positions(a, (2, 3), (2, 5)), km.positions(block[None], (0, 1), (0, 3)), "h2d")
    ref[2, :, 2:5] = block
    assert np.array_equal(a, ref)
    back = np.empty((1, 3, 3, 5), np.float32)
    m.copy2d(km.positions(back, (0, 1), (0, 3)), km.positions(a, (2, 3), (2, 5)), "d2h")
    assert np.array_equal(back[0], block)

    # pad-left merge of a batch of width 6 and one of width 4 into width 6
    b = m.alloc((2, 3, 4, 5), np.float32)
    b[...] = _rand(b.shape, seed=2)
    out = m.alloc((6, 3, 6, 5), np.float32)
    m.copy2d(km.positions(out, (0, 4), (0, 6)), km.positions(a, (0, 4), (0, 6)), "d2d")
    m.copy2d(km.positions(out, (4, 6), (2, 6)), km.positions(b, (0, 2), (0, 4)), "d2d")
    padded = np.concatenate([np.zeros((2, 3, 2, 5), np.float32), b], axis=2)
    assert np.array_equal(out, np.concatenate([ref, padded], axis=0))

    # release rows 1 and 2 of the merged batch and trim its first column: each run of consecutive kept rows is one copy
    keep = [0, 3, 4, 5]
    trimmed = m.alloc((4, 3, 5, 5), np.float32, zero=False)
    m.copy2d(km.positions(trimmed, (0, 1), (0, 5)), km.positions(out, (0, 1), (1, 6)), "d2d")
    m.copy2d(km.positions(trimmed, (1, 4), (0, 5)), km.positions(out, (3, 6), (1, 6)), "d2d")
    assert np.array_equal(trimmed, np.ascontiguousarray(np.asarray(out)[keep, :, 1:]))

    # zero a row's padding
    m.zero(km.positions(out, (4, 5), (0, 3)))
    expect = np.array(out)
    expect[4, :, :3] = 0
    assert np.array_equal(out, expect)
    assert m.copies == {"d2d": 5, "h2d": 1, "d2h": 1, "zero": 1}


def test_copies_say_which_side_is_the_device():
    """What the CUDA backend would need the right cudaMemcpyKind for is checked on the host: a device side must be
    memory of this backend, a host side must not."""
    m = km.HostMemory()
    dev = m.alloc((1, 2, 4, 3), np.float32)
    host = np.zeros((1, 2, 4, 3), np.float32)
    d, h = km.positions(dev, (0, 1), (0, 4)), km.positions(host, (0, 1), (0, 4))
    for dst, src, kind in ((d, h, "d2d"), (h, d, "d2d"), (d, d, "h2d"), (h, h, "d2h"), (h, d, "h2d")):
        with pytest.raises(ValueError, match="device memory"):
            m.copy2d(dst, src, kind)
    with pytest.raises(ValueError, match="lines of"):
        m.copy2d(km.positions(dev, (0, 1), (0, 3)), d, "d2d")
    m.copy2d(d, h, "h2d")
    m.copy2d(h, d, "d2h")
    assert m.copies == {"h2d": 1, "d2h": 1}


def test_the_cuda_backend_fails_with_one_line_without_a_gpu_or_cuda_python(monkeypatch, exported_fused):
    """UNVERIFIED path: no GPU here. It fails at construction, with one line naming what is missing."""
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        km.memory_for("gpu:0")
    try:
        km.memory_for("cuda:0")
    except km.MissingRuntime as e:
        assert "\n" not in str(e) and ("no CUDA device" in str(e) or "cuda-python" in str(e)), e
    else:  # pragma: no cover — a GPU machine
        pytest.skip("a CUDA device is visible")
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(km.MissingRuntime, match=r"^cuda-python is not installed .*pip install cuda-python\)$"):
        km.memory_for("cuda")
    assert er.MissingRuntime is km.MissingRuntime
    with pytest.raises(km.MissingRuntime, match="CUDAExecutionProvider"):
        kv_shared.SharedKVEngine.from_path(exported_fused("r1-distill-tiny").onnx_path, 1, 8, device="cuda:0")


# ---- the fused engine --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fused_session(exported_fused):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(exported_fused("r1-distill-tiny").onnx_path), options,
                                providers=["CPUExecutionProvider"])


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 772, n).tolist() for n in lengths]


def _fused_script(engine) -> list[np.ndarray]:
    """Rows joining, a fork, a cached prefix from kv_blocks, a row sitting out, a release: every logits returned."""
    tok = lambda logits: [int(t) for t in logits.argmax(-1)]  # noqa: E731
    prompts = _prompts(1, [6, 9])
    out = [engine.prefill([0, 2], prompts)]
    t = dict(zip([0, 2], tok(out[-1]), strict=True))
    for _ in range(3):
        out.append(engine.decode([0, 2], [t[0], t[2]]))
        t.update(zip([0, 2], tok(out[-1]), strict=True))
    engine.fork(2, [1, 4])
    t[1] = t[4] = t[2]
    blocks = [engine.kv_blocks(2, 0, 4), engine.kv_blocks(2, 4, 8)]
    out.append(engine.prefill([3], [prompts[1][:8] + [5, 6, 7]], cached=[blocks]))
    t[3] = tok(out[-1])[0]
    for step in range(4):
        rows = [0, 1, 2, 3, 4] if step != 2 else [0, 1, 3, 4]  # row 2 sits out a step
        out.append(engine.decode(rows, [t[r] for r in rows]))
        t.update(zip(rows, tok(out[-1]), strict=True))
    engine.release([1, 3])
    out.append(engine.decode([0, 2, 4], [t[0], t[2], t[4]]))
    return out


def test_fused_engine_on_opaque_buffers_gives_the_same_logits_and_decode_copies_nothing(fused_session, monkeypatch):
    """The GPU code path of SharedKVEngine (buffers known only by pointer, small inputs bound at every run) gives
    bit for bit the logits of the host path; its fork, cached prefill and kv_blocks are the memory layer's copies,
    one per cache slot and row or block, and a decode step copies nothing at all."""
    want = _fused_script(kv_shared.SharedKVEngine(fused_session, 5, 32))
    monkeypatch.setattr(kv_shared, "memory_for", lambda device: Opaque())
    engine = kv_shared.SharedKVEngine(fused_session, 5, 32, device="cuda:0")
    assert all(isinstance(b, km.DeviceArray) for b in engine.buffers.values())
    got = _fused_script(engine)
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    slots = len(engine.buffers)
    assert engine.memory.copies == {"d2d": 2 * slots, "d2h": 2 * slots, "h2d": 2 * slots}  # fork 2 rows, 2 blocks
    before = dict(engine.memory.copies)
    addresses = {n: b.ptr for n, b in engine.buffers.items()}
    for _ in range(3):
        engine.decode([0, 2, 4], [5, 6, 7])
    assert engine.memory.copies == before and {n: b.ptr for n, b in engine.buffers.items()} == addresses


# ---- the padded engine -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generic_path(exported):
    return exported("r1-distill-tiny").onnx_path


def _slots(session) -> list[CacheSlot]:
    return [CacheSlot(i.name, i.name.replace("past_key_values.", "present."), i.shape[1], i.shape[3])
            for i in session.get_inputs() if i.name.startswith("past_key_values.")]


class Spy:
    """A device-binding runner around another, recording what each call bound."""

    binds_device = True

    def __init__(self, runner, memory=None):
        self.runner, self.memory, self.calls = runner, memory or runner.memory, []
        runner.memory = self.memory

    def run_bound(self, host_feeds, device_feeds, device_outputs, host_outputs):
        self.calls.append((dict(host_feeds), dict(device_feeds), dict(device_outputs), list(host_outputs)))
        return self.runner.run_bound(host_feeds, device_feeds, device_outputs, host_outputs)


def _padded_script(engine) -> list[np.ndarray]:
    """Prefill in chunks, decode, a fork, a cached prefix, releases that trim columns: every logits returned."""
    tok = lambda logits: [int(t) for t in logits.argmax(-1)]  # noqa: E731
    prompts = _prompts(2, [5, 12, 3])
    out = [engine.prefill([0, 1, 2], prompts)]
    t = dict(zip([0, 1, 2], tok(out[-1]), strict=True))
    for _ in range(3):
        rows = sorted(t)
        out.append(engine.decode(rows, [t[r] for r in rows]))
        t.update(zip(rows, tok(out[-1]), strict=True))
    engine.fork(2, [3])
    t[3] = t[2]
    blocks = [engine.kv_blocks(1, 0, 4), engine.kv_blocks(1, 4, 8)]
    out.append(engine.prefill([4, 5], [prompts[1][:8] + [9, 10], _prompts(3, [4])[0]], cached=[blocks, None]))
    t.update(zip([4, 5], tok(out[-1]), strict=True))
    engine.release([1])  # the longest row leaves: all-padding columns are trimmed
    del t[1]
    for _ in range(3):
        rows = sorted(t)
        out.append(engine.decode(rows, [t[r] for r in rows]))
        t.update(zip(rows, tok(out[-1]), strict=True))
    engine.release([0, 5])
    out.append(engine.decode([2, 3, 4], [t[2], t[3], t[4]]))
    return out


@pytest.mark.parametrize("max_batch", [None, 2])
def test_padded_engine_bound_to_its_buffers_gives_the_logits_of_numpy_feeds(generic_path, max_batch):
    """The ONNX Runtime runner binding the memory layer's buffers (opaque, as on a GPU) gives bit for bit the
    logits and cache of the same session fed numpy arrays, over joins, forks, a cached prefix, releases, and
    engine calls split by max_batch."""
    runner, _ = er.load_runner("onnxruntime", generic_path, {})
    slots = _slots(runner.session)
    plain = PaddedKVEngine(lambda feeds, outs: runner.session.run(outs, feeds), slots, "float32", 8, max_batch=max_batch)
    want = _padded_script(plain)
    spy = Spy(runner, Opaque())
    bound = PaddedKVEngine(spy, slots, "float32", 8, max_batch=max_batch)
    got = _padded_script(bound)
    assert spy.calls and len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert [bound.memory.download(c).tobytes() for c in bound.cache] == [np.asarray(c).tobytes() for c in plain.cache]
    assert bound.order == plain.order and bound.lengths == plain.lengths


def test_padded_decode_binds_the_cache_and_copies_only_ids_in_and_logits_out(generic_path):
    """A decode step's past is the engine's cache buffer itself, its present a buffer the engine allocated that is
    the next step's past as it is; the memory layer copies nothing; only ids, mask and positions go in from the
    host and only the logits come back. Split by max_batch, each call binds row ranges of the same buffers."""
    runner, _ = er.load_runner("onnxruntime", generic_path, {})
    spy = Spy(runner, Opaque())
    engine = PaddedKVEngine(spy, _slots(runner.session), "float32", 8)
    tokens = [int(t) for t in engine.prefill([0, 1, 2], _prompts(4, [7, 3, 10])).argmax(-1)]
    before = dict(engine.memory.copies)
    for _ in range(4):
        cache, width = list(engine.cache), engine.width
        spy.calls.clear()
        tokens = [int(t) for t in engine.decode([0, 1, 2], tokens).argmax(-1)]
        ((host, past, present, host_outputs),) = spy.calls
        assert {n: a.shape for n, a in host.items()} == {"input_ids": (3, 1), "attention_mask": (3, width + 1),
                                                        "position_ids": (3, 1)}
        assert host_outputs == ["logits"]
        assert all(past[s.past] is c for s, c in zip(engine.slots, cache, strict=True))
        assert all(present[s.present] is c for s, c in zip(engine.slots, engine.cache, strict=True))
        assert all(c.shape[2] == width + 1 for c in engine.cache)
    assert engine.memory.copies == before
    engine.max_batch = 2
    spy.calls.clear()
    engine.decode([0, 1, 2], tokens)
    assert [c[1][engine.slots[0].past].shape[0] for c in spy.calls] == [2, 1]
    assert spy.calls[1][2][engine.slots[0].present].ptr > engine.cache[0].ptr  # rows 2.. of the one new buffer
    assert engine.memory.copies == before


class _Variant:
    """The generic graph as another engine may present it: FP16 KV and/or the last position's logits only (the
    session runs FP32; the cache is converted at the boundary). Binds the memory's buffers, or takes numpy."""

    def __init__(self, session, bind: bool):
        self.session, self.binds_device, self.memory = session, bind, km.HostMemory()

    def _run(self, feeds, outputs):
        feeds = {n: (a.astype(np.float32) if n.startswith("past_key_values.") else a) for n, a in feeds.items()}
        out = dict(zip(outputs, self.session.run(outputs, feeds), strict=True))
        out["logits"] = out["logits"][:, -1:]
        return [out[n] if n == "logits" else out[n].astype(np.float16) for n in outputs]

    def __call__(self, feeds, outputs):
        return self._run(feeds, outputs)

    def run_bound(self, host_feeds, device_feeds, device_outputs, host_outputs):
        feeds = dict(host_feeds, **{n: np.asarray(b) for n, b in device_feeds.items()})
        names = list(host_outputs) + list(device_outputs)
        values = self._run(feeds, names)
        for n, v in zip(names[len(host_outputs):], values[len(host_outputs):], strict=True):
            device_outputs[n][...] = v
        return values[: len(host_outputs)]


def test_padded_engine_takes_fp16_kv_and_last_position_logits_bound_or_not(generic_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(generic_path), providers=["CPUExecutionProvider"])
    runs = [_padded_script(PaddedKVEngine(_Variant(session, bind), _slots(session), "float16", 8, max_batch=2))
            for bind in (False, True)]
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))
    engine = PaddedKVEngine(_Variant(session, True), _slots(session), "float16", 8)
    engine.prefill([0], _prompts(5, [6]))
    assert {c.dtype for c in engine.cache} == {np.dtype(np.float16)}
