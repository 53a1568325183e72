"""Verification of an exported ONNX model against PyTorch, output by output, on shapes other than the export
example: batch > 1, a decode step with past > 0, and left-padded input."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .core.errors import StageFailed
from .sources import ModelKind
from .wrappers import CacheLayout, ShapeCase, make_inputs

DECODER_CASES = (
    ShapeCase("prefill-b3-s7", batch=3, seq=7, past=0),
    ShapeCase("decode-b2-s1-past9", batch=2, seq=1, past=9),
    ShapeCase("padded-b2-s6", batch=2, seq=6, past=0, left_pad=3),
    ShapeCase("chunk-b1-s4-past5", batch=1, seq=4, past=5),
)
ENCODER_CASES = (
    ShapeCase("b1-s5", batch=1, seq=5),
    ShapeCase("b4-s11", batch=4, seq=11),
    ShapeCase("padded-b3-s9", batch=3, seq=9, left_pad=4),
)


@dataclass
class OutputCheck:
    output: str
    max_abs_diff: float
    cosine: float
    top1_agreement: float | None
    tolerance: float
    passed: bool


@dataclass
class CaseCheck:
    case: str
    shapes: dict[str, list[int]]
    outputs: list[OutputCheck] = field(default_factory=list)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den else 1.0


def _select_valid(name: str, arr: np.ndarray, mask: np.ndarray, seq: int) -> np.ndarray:
    """Keep the positions that are defined: rows whose query attends to something (left padding)."""
    if name in ("logits", "last_hidden_state"):
        return arr[mask[:, -seq:].astype(bool)]
    if name.startswith("present."):
        # [b, h, total, d]: positions of padded tokens hold values computed from undefined rows
        return arr.transpose(0, 2, 1, 3)[mask.astype(bool)]
    return arr


def default_tolerance(name: str) -> float:
    return 1e-4


@dataclass
class Reference:
    case: ShapeCase
    feeds: dict[str, np.ndarray]
    outputs: list[np.ndarray]


def torch_references(
    torch_module: torch.nn.Module,
    kind: ModelKind,
    input_names: list[str],
    vocab: int,
    layout: CacheLayout | None,
    cases: tuple[ShapeCase, ...] | None = None,
) -> list[Reference]:
    """PyTorch outputs for each case — computed first, so the PyTorch model can be freed before ONNX Runtime
    loads its own copy of the weights."""
    cases = cases or (DECODER_CASES if kind is ModelKind.DECODER else ENCODER_CASES)
    refs = []
    for i, case in enumerate(cases):
        feeds = make_inputs(kind, case, vocab, layout, input_names, seed=100 + i)
        with torch.no_grad():
            out = torch_module(*[feeds[n] for n in input_names])
        refs.append(Reference(case, {k: v.numpy() for k, v in feeds.items()}, [t.numpy() for t in out]))
    return refs


def _session(onnx_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def _check_output(check: CaseCheck, failures: list[str], name: str, ref: np.ndarray, got: np.ndarray,
                  tolerance: float) -> None:
    """One output's valid values against PyTorch's: recorded in `check`, a miss added to `failures`."""
    diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1))) if name == "logits" and ref.size else None
    ok = bool(np.isfinite(diff) and diff <= tolerance)
    check.outputs.append(OutputCheck(name, diff, _cos(ref, got), top1, tolerance, ok))
    if not ok:
        failures.append(f"output {name!r} on {check.case}: max abs diff {diff:.3g} > tolerance {tolerance:g}")


def _raise_on(failures: list[str], what: str) -> None:
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise StageFailed(f"{what} does not match PyTorch: {failures[0]}{more}")


def compare_onnx(
    onnx_path, refs: list[Reference], output_names: list[str], tolerances: dict[str, float] | None = None
) -> list[CaseCheck]:
    """Run ONNX Runtime on each reference case; raise `StageFailed` naming the first output out of tolerance."""
    tolerances = tolerances or {}
    session = _session(onnx_path)
    results: list[CaseCheck] = []
    failures: list[str] = []
    for ref in refs:
        case = ref.case
        got = session.run(output_names, ref.feeds)
        mask = ref.feeds["attention_mask"]
        check = CaseCheck(case.name, {k: list(v.shape) for k, v in ref.feeds.items() if not k.startswith("past_key_values")})
        for name, r, g in zip(output_names, ref.outputs, got, strict=True):
            if r.shape != g.shape:
                failures.append(f"output {name!r} on {case.name}: shape {list(g.shape)} != PyTorch {list(r.shape)}")
                continue
            rv, gv = _select_valid(name, r, mask, case.seq), _select_valid(name, g, mask, case.seq)
            _check_output(check, failures, name, rv, gv, tolerances.get(name, default_tolerance(name)))
        results.append(check)
    _raise_on(failures, "ONNX Runtime")
    return results


# The fused graph (exporter.fused_graph) takes rows of different lengths in one call: each case lists
# (cached positions, new positions) per row; padded rows are the shorter ones (right padding, the graph's form).
@dataclass(frozen=True)
class FusedCase:
    name: str
    rows: tuple[tuple[int, int], ...]  # (past, new) per row

    @property
    def seq(self) -> int:
        return max(q for _, q in self.rows)


FUSED_CASES = (
    FusedCase("prefill-b3-s7", ((0, 7), (0, 7), (0, 7))),
    FusedCase("padded-b3-s6-rows-6-3-1", ((0, 6), (0, 3), (0, 1))),
    FusedCase("decode-b3-s1-past-9-4-1", ((9, 1), (4, 1), (1, 1))),
    FusedCase("chunk-b2-s4-past-5-2", ((5, 4), (2, 2))),
)


def fused_feeds(case: FusedCase, layout: CacheLayout, capacity: int, past: list[list[np.ndarray]],
                ids: list[np.ndarray], all_positions: bool = True) -> dict[str, np.ndarray]:
    """Feeds of the fused graph for `case`: row b's past (one array per cache slot) at the start of its buffer
    row, its new tokens right-padded to the case's width."""
    b, s = len(case.rows), case.seq
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.zeros((b, s), np.int64),
        "seqlens_k": np.array([p + q - 1 for p, q in case.rows], np.int32),
        "query_seqlens": np.array([q for _, q in case.rows], np.int32),
        "total_sequence_length": np.array(capacity, np.int32),
        "logits_index": np.tile(np.arange(s, dtype=np.int64), (b, 1)) if all_positions
        else np.array([[max(q - 1, 0)] for _, q in case.rows], np.int64),
    }
    for j, name in enumerate(layout.names("past_key_values")):
        heads, dim = layout.key_shape if name.endswith(".key") else layout.value_shape
        buf = np.zeros((b, heads, capacity, dim), np.float32)
        for r, (p, _) in enumerate(case.rows):
            buf[r, :, :p] = past[r][j][0]
        feeds[name] = buf
    for r, (_, q) in enumerate(case.rows):
        feeds["input_ids"][r, :q] = ids[r]
    return feeds


@dataclass
class FusedReference:
    case: FusedCase
    feeds: dict[str, np.ndarray]
    logits: list[np.ndarray]  # per row [q, vocab]
    presents: list[list[np.ndarray]]  # per row, per cache slot [heads, past + q, dim]


def fused_references(torch_module: torch.nn.Module, layout: CacheLayout, vocab: int,
                     cases: tuple[FusedCase, ...] = FUSED_CASES, capacity: int = 16) -> list[FusedReference]:
    """PyTorch (the generic wrapper, one row at a time) for each row of each case."""
    refs = []
    for i, case in enumerate(cases):
        g = torch.Generator().manual_seed(200 + i)
        past, ids, logits, presents = [], [], [], []
        for p, q in case.rows:
            row_past = [torch.randn(t.shape, generator=g) for t in layout.empty(1, p)]
            row_ids = torch.randint(3, vocab, (1, q), generator=g)
            with torch.no_grad():
                out = torch_module(row_ids, torch.ones(1, p + q, dtype=torch.long),
                                   torch.arange(p, p + q).unsqueeze(0), *row_past)
            past.append([t.numpy() for t in row_past])
            ids.append(row_ids.numpy()[0])
            logits.append(out[0].numpy()[0])
            presents.append([t.numpy()[0] for t in out[1:]])
        refs.append(FusedReference(case, fused_feeds(case, layout, capacity, past, ids), logits, presents))
    return refs


def compare_fused(onnx_path, refs: list[FusedReference], output_names: list[str], tolerance: float) -> list[CaseCheck]:
    """Run the fused graph on each case (all rows in one call) and compare each row's valid positions — its
    new tokens' logits and its cache up to its own length — with PyTorch; raise `StageFailed` on a miss."""
    session = _session(onnx_path)
    results, failures = [], []
    for ref in refs:
        got = dict(zip(output_names, session.run(output_names, ref.feeds), strict=True))
        check = CaseCheck(ref.case.name, {k: list(v.shape) for k, v in ref.feeds.items() if not k.startswith("past_key_values")})
        for name in output_names:
            if name == "logits":
                r = np.concatenate(ref.logits)
                gv = np.concatenate([got[name][b, :q] for b, (_, q) in enumerate(ref.case.rows)])
            else:
                j = output_names.index(name) - 1
                r = np.concatenate([pres[j].transpose(1, 0, 2) for pres in ref.presents])
                gv = np.concatenate([got[name][b, :, : p + q].transpose(1, 0, 2) for b, (p, q) in enumerate(ref.case.rows)])
            _check_output(check, failures, name, r, gv, tolerance)
        results.append(check)
    _raise_on(failures, "ONNX Runtime (fused graph)")
    return results
