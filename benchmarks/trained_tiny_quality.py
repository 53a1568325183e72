"""What quantization does to the TRAINED r1-distill-tiny, in one run: FP16 and INT4 (RTN and AWQ, symmetric,
block 32 / 64 / 128, QDQ), each scored against FP32 by the quantize stage itself (`quantize_report.json`) on three
texts — the held-out sentences the gate reads (generic English), in-domain text the model never trained on, and
its training corpus — and by greedy decoding: how many corpus prompts each variant still continues with the
exact corpus text (the in-process `GreedyLoop` over the variant's ONNX graph). Gate and mixed precision are off, so
every layer that the block tiles is quantized.

    .venv/bin/python benchmarks/trained_tiny_quality.py [--workdir build/bench-trained] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tokenizers import Tokenizer

from exporter import tiny_models
from exporter.core import artifacts
from exporter.export import ExportConfig, export_model
from exporter.repository.reference import GreedyLoop
from quantize import QuantizeConfig, quantize_model

MODEL = "r1-distill-tiny"
TEXTS = ("held_out", "held_out_domain", "corpus")


def reproduced(onnx_path: Path, tok: Tokenizer) -> tuple[int, int]:
    loop = GreedyLoop(onnx_path)
    cases = tiny_models.reproduction_cases()
    ok = 0
    for prompt, cont in cases:
        want = tok.encode(cont).ids  # ends with the end-of-text token: the loop must emit it too
        ok += loop(tok.encode(prompt).ids, len(want)) == want
    return ok, len(cases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("build/bench-trained"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    started = time.perf_counter()
    exp = export_model(ExportConfig(model=MODEL, workdir=args.workdir))
    layout = artifacts.ModelLayout(args.workdir, MODEL)
    tok = Tokenizer.from_file(str(layout.tokenizer_dir / "tokenizer.json"))
    variants = [("fp32", None, None), ("fp16", None, None)] + [
        ("int4", method, block) for method in ("rtn", "awq") for block in (32, 64, 128)]
    rows = []
    for precision, method, block in variants:
        if precision == "fp32":
            path, by_text, mb = exp.onnx_path, None, exp.onnx_bytes / 1e6
            name = "fp32"
        else:
            settings = dict(precision=precision)
            if precision == "int4":
                settings.update(method=method, block_size=block, format="qdq", symmetric=True, mixed_precision=False)
            q = quantize_model(QuantizeConfig(model=MODEL, workdir=args.workdir, extra_texts=tiny_models.quality_texts(MODEL),
                                              **settings))
            path, by_text, mb, name = q.onnx_path, q.accuracy_by_text, q.sizes.model_bytes / 1e6, q.variant
        ok, n = reproduced(path, tok)
        rows.append({"variant": name, "model_mb": round(mb, 3), "reproduced": ok, "cases": n, "by_text": by_text})
    seconds = time.perf_counter() - started
    print(f"{MODEL}, load {os.getloadavg()[0]:.1f}, {seconds:.0f} s; figures vs FP32 (cosine / top-1 / perplexity "
          "FP32 → variant / KL nats)")
    print("| variant | MB | corpus reproduced | " + " | ".join(TEXTS) + " |")
    print("|---|---:|---:|" + "---|" * len(TEXTS))
    for r in rows:
        cells = []
        for t in TEXTS:
            a = (r["by_text"] or {}).get(t)
            cells.append("—" if a is None else
                         f"{a['logits_cosine']:.4f} / {a['top1_agreement']:.3f} / {a['perplexity_fp32']:.2f} → "
                         f"{a['perplexity']:.2f} / {a['kl_divergence']:.4f}")
        print(f"| {r['variant']} | {r['model_mb']:.2f} | {r['reproduced']}/{r['cases']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "seconds": seconds, "load": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
