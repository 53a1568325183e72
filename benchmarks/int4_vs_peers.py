"""INT4 weight-only quantization of the real all-MiniLM-L6-v2, r1deploy against its peers, in one run:

* r1deploy `quantize` — RTN and AWQ (symmetric, the deployment profiles' default; AWQ also asymmetric),
* ONNX Runtime's `MatMulNBitsQuantizer` — its default RTN, symmetric and asymmetric (QDQ output),
* NVIDIA ModelOpt `modelopt.onnx.quantization.quantize(quantize_mode="int4")` — `awq_clip` and `rtn_dq`,

at block sizes 32 and 128. Every output is scored the same way (`quantize.evaluate`): sentence-embedding cosine
against FP32 on the 64 held-out sentences, Spearman correlation of the pairwise similarities, file size, bytes
of the quantized MatMul weights against the bits-per-weight limit of each method's own storage, and time. AWQ
methods calibrate on the same 48 calibration sentences. Embedding tables stay FP32 everywhere (neither peer
quantizes Gather), so only MatMul weights differ. ModelOpt runs with `high_precision_dtype="fp32"` so that it,
too, changes nothing but the weights.

    .venv/bin/python benchmarks/int4_vs_peers.py [--workdir build/bench-int4] [--blocks 32 128]

A peer whose package is not installed is skipped with a message (ModelOpt: see docs/benchmarks.md for the
CPU-only install).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from exporter.core import artifacts
from exporter.export import ExportConfig, export_model
from quantize import QuantizeConfig, quantize_model
from quantize import evaluate as ev
from quantize.sentences import CALIBRATION, EVALUATION

SCALE_BITS = {TensorProto.FLOAT: 32, TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16}


@dataclass
class Row:
    method: str
    block: int
    cosine: float
    cosine_min: float
    spearman: float
    model_mb: float
    matmul_weight_bytes: int
    quantized_weights: int
    bits_per_weight: float
    bits_limit: float
    seconds: float


def quantized_matmul_bytes(path: Path) -> tuple[int, int, float]:
    """(bytes, weights, theoretical bits/weight) of the 4-bit MatMul weights in any of the three encodings:
    DequantizeLinear(int4/uint4, scale[, zp]) → MatMul, or com.microsoft.MatMulNBits."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)

    def nbytes(name: str) -> int:
        t = inits[name]
        return len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes

    total = weights = 0
    limit_bits = 0.0
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4):
            if not any(r.op_type == "MatMul" for r in readers.get(n.output[0], [])):
                continue
            count = int(np.prod(inits[n.input[0]].dims))
            block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
            zp = len(n.input) > 2 and n.input[2] in inits
            scale_bits = SCALE_BITS[inits[n.input[1]].data_type]
            total += sum(nbytes(x) for x in n.input[:3] if x in inits)
        elif n.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in n.attribute}
            count, block = attrs["K"] * attrs["N"], attrs["block_size"]
            zp = len(n.input) > 3 and n.input[3] in inits
            scale_bits = SCALE_BITS[inits[n.input[2]].data_type]
            total += sum(nbytes(x) for x in n.input[1:4] if x in inits)
        else:
            continue
        weights += count
        limit_bits += count * (4 + scale_bits / block + (4 / block if zp else 0))
    return total, weights, limit_bits / max(weights, 1)


def ort_rtn(src: Path, dst: Path, block: int, symmetric: bool, _calib) -> None:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, quant_format=QuantFormat.QDQ)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(dst), False)


def modelopt_int4(src: Path, dst: Path, block: int, method: str, calib: dict) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(
        str(src), quantize_mode="int4", calibration_method=method, calibration_data=calib,
        calibration_eps=["cpu"], block_size=block, output_path=str(dst), high_precision_dtype="fp32",
        log_level="ERROR",
    )


def peer_available(module: str) -> Optional[str]:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("build/bench-int4"))
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    # The peers log every skipped node and draw progress bars; the table is the output.
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.INFO)

    exported = export_model(ExportConfig(model="minilm", workdir=args.workdir))
    layout = artifacts.ModelLayout(args.workdir, "minilm")
    report = artifacts.read_export_report(layout)
    ref = ev.reference(exported.onnx_path, ev.tokenize(layout.tokenizer_dir, EVALUATION, report), "encoder")
    calib = ev.tokenize(layout.tokenizer_dir, CALIBRATION, report).feeds
    out_dir = args.workdir / "int4-peers"
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_bytes = exported.onnx_path.stat().st_size

    peers: list[tuple[str, Optional[str], Callable]] = []
    for name, symmetric, method in (("r1deploy rtn", True, "rtn"), ("r1deploy awq", True, "awq"), ("r1deploy awq asym", False, "awq")):
        def ours(src, dst, block, _calib, symmetric=symmetric, method=method):
            r = quantize_model(QuantizeConfig(model="minilm", workdir=args.workdir, precision="int4", method=method,
                                              block_size=block, format="qdq", symmetric=symmetric, force=True))
            shutil.copyfile(r.onnx_path, dst)
        peers.append((name, None, ours))
    ort_missing = peer_available("onnxruntime.quantization")
    peers.append(("ORT RTN sym", ort_missing, lambda s, d, b, c: ort_rtn(s, d, b, True, c)))
    peers.append(("ORT RTN asym", ort_missing, lambda s, d, b, c: ort_rtn(s, d, b, False, c)))
    mo_missing = peer_available("modelopt")
    peers.append(("ModelOpt awq_clip", mo_missing, lambda s, d, b, c: modelopt_int4(s, d, b, "awq_clip", c)))
    peers.append(("ModelOpt rtn_dq", mo_missing, lambda s, d, b, c: modelopt_int4(s, d, b, "rtn_dq", c)))

    rows: list[Row] = []
    for block in args.blocks:
        for name, missing, fn in peers:
            if missing:
                print(f"skip {name}: {missing}", file=sys.stderr)
                continue
            dst = out_dir / f"{name.replace(' ', '_')}-b{block}.onnx"
            started = time.perf_counter()
            fn(exported.onnx_path, dst, block, calib)
            seconds = time.perf_counter() - started
            acc = ev.measure(ref, dst)
            wbytes, count, limit = quantized_matmul_bytes(dst)
            rows.append(Row(name, block, acc["embedding_cosine"], acc["embedding_cosine_min"], acc["spearman"],
                            sum(p.stat().st_size for p in out_dir.glob(dst.name + "*")) / 1e6, wbytes, count,
                            8 * wbytes / max(count, 1), limit, seconds))
            print(f"done {name} b{block}: cosine {acc['embedding_cosine']:.4f}", file=sys.stderr)

    print(f"\nMiniLM-L6-v2 INT4 weight-only, {len(EVALUATION)} held-out sentences, FP32 model {fp32_bytes / 1e6:.1f} MB")
    header = f"{'method':<20} {'block':>5} {'cosine':>8} {'min':>7} {'spearman':>8} {'1-cos ×':>8} {'MB':>7} {'bits/w':>7} {'limit':>6} {'s':>6}"
    print(header)
    print("-" * len(header))
    for block in args.blocks:
        base = next((r for r in rows if r.block == block and r.method == "r1deploy awq"), None)
        for r in sorted((r for r in rows if r.block == block), key=lambda r: -r.cosine):
            ratio = (1 - r.cosine) / (1 - base.cosine) if base else float("nan")
            print(f"{r.method:<20} {r.block:>5} {r.cosine:>8.4f} {r.cosine_min:>7.4f} {r.spearman:>8.4f} {ratio:>8.2f} "
                  f"{r.model_mb:>7.1f} {r.bits_per_weight:>7.3f} {r.bits_limit:>6.3f} {r.seconds:>6.1f}")
    print("1-cos × = embedding error relative to r1deploy awq (sym) at the same block size; "
          "bits/w = quantized MatMul bytes ×8 / weights; limit = 4 + scale bits/block (+ 4/block with zero points)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
