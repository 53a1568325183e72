#!/usr/bin/env python3
"""The streaming builder against the torch-traced path on a model larger than the tests' tiny one (issue 19: "the
streamed graph matches the torch-traced one on tiny and 122M"): one random Qwen2 checkpoint, built both ways —
`export --graph fused` (+ `quantize --graph fused`) and `stream-build` — at FP32, FP16 and INT4 RTN; prints whether
the nodes are the same, how many initializers differ in bytes, and the largest logit difference over padded rows
of different lengths in ONNX Runtime. Not part of `make test` (the tiny model's parity is: tests/test_stream_build.py).

    python benchmarks/stream_parity.py --layers 12 --hidden 768 --workdir /tmp/stream-parity   # 122 M parameters
    python benchmarks/stream_parity.py --slice-of CKPT [--slice-layers 2] --workdir /tmp/slice-parity

`--slice-of`: verification that scales (issue 19) — a real-size checkpoint cannot be compared with a PyTorch copy
on a CI box, so its first N layers (with its own embedding, final norm and LM head: the same shards, the same
tensors) are written as a checkpoint of their own, one tensor at a time, and both paths are built from that slice;
the FP32 export of the slice is verified against PyTorch by the export stage on the way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CASES = {  # name: (stream-build options, quantize options or None for the FP32 export itself)
    "fp32": (dict(), None),
    "fp16": (dict(precision="fp16"), dict(precision="fp16")),
    "int4-rtn-qdq": (dict(precision="int4", method="rtn", block_size=128, format="qdq"),
                     dict(precision="int4", method="rtn", block_size=128, format="qdq")),
    # AWQ calibrates layer by layer in numpy here, on the whole FP32 graph in ONNX Runtime in the stage: the same
    # search on activations equal to float rounding, so close, not byte for byte (tests/test_stream_build.py)
    "int4-awq-qdq": (dict(precision="int4", method="awq", block_size=128, format="qdq"),
                     dict(precision="int4", method="awq", block_size=128, format="qdq")),
}


def logits(path: Path, report: dict, lengths: list[int], vocab: int) -> np.ndarray:
    from quantize.evaluate import fused_feeds, session

    width = max(lengths)
    mask = np.arange(width)[None, :] < np.array(lengths)[:, None]
    ids = np.where(mask, (np.arange(width)[None, :] * 7919 + np.arange(len(lengths))[:, None] * 104729 + 5) % vocab, 0)
    sess = session(path)
    types = {i.name: i.type for i in sess.get_inputs()}
    feeds = {"input_ids": ids.astype(np.int64), **fused_feeds(mask.astype(np.int64), report["cache"])}
    feeds = {k: (v.astype(np.float16) if types[k] == "tensor(float16)" else v) for k, v in feeds.items()}
    return np.asarray(sess.run(["logits"], feeds)[0], np.float32)[mask]


def compare(a_path: Path, b_path: Path) -> dict:
    a, b = onnx.load(str(a_path)), onnx.load(str(b_path))
    same_nodes = [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    ai = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    bi = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    differing = sorted(n for n in bi if n not in ai or ai[n].dtype != bi[n].dtype or ai[n].tobytes() != bi[n].tobytes())
    return {"same_nodes": same_nodes, "initializers": len(bi), "differing_initializers": len(differing),
            "missing": sorted(set(bi) ^ set(ai))[:5], "first_differing": differing[:3]}


def slice_checkpoint(src: Path, dest: Path, layers: int) -> Path:
    """`src`'s first `layers` decoder layers + its embedding, final norm and LM head as a checkpoint of its own
    (one safetensors file, the tensors' own dtype), read and written one tensor at a time."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    if (dest / "config.json").is_file():
        return dest
    cfg = json.loads((src / "config.json").read_text())
    if layers < 1 or layers > int(cfg["num_hidden_layers"]):
        raise SystemExit(f"error: --slice-layers must lie in 1..{cfg['num_hidden_layers']}")
    index = src / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else {k: "model.safetensors" for k in safe_open(str(src / "model.safetensors"), "pt").keys()})

    def kept(name: str) -> bool:
        parts = name.split(".")
        return not (len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= layers)

    tensors = {}
    for name in sorted(n for n in where if kept(n)):
        with safe_open(str(src / where[name]), "pt") as f:
            tensors[name] = f.get_tensor(name).clone()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    cfg["num_hidden_layers"] = layers
    for key in ("layer_types",):  # per-layer lists (transformers checks their length)
        if isinstance(cfg.get(key), list):
            cfg[key] = cfg[key][:layers]
    if isinstance(cfg.get("max_window_layers"), int):
        cfg["max_window_layers"] = min(cfg["max_window_layers"], layers)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.suffix == ".json" and f.name not in ("config.json", index.name) or f.name.startswith("tokenizer"):
            shutil.copyfile(f, tmp / f.name)
    tmp.rename(dest)
    return dest


def main() -> None:
    from serving_scaling import random_qwen2

    from exporter.export import ExportConfig, export_model
    from exporter.stream_build import StreamConfig, stream_build
    from quantize import QuantizeConfig, quantize_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", type=Path, default=REPO / "build" / "stream-parity")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--slice-of", type=Path, default=None, help="a real-size checkpoint: compare on its first layers")
    ap.add_argument("--slice-layers", type=int, default=2)
    args = ap.parse_args()
    wd = args.workdir
    if args.slice_of is not None:
        t = time.perf_counter()
        ckpt = slice_checkpoint(args.slice_of, wd / f"{args.slice_of.name}-{args.slice_layers}-layers", args.slice_layers)
        args.vocab = int(json.loads((ckpt / "config.json").read_text())["vocab_size"])
        print(f"slice of {args.slice_of}: {args.slice_layers} layers in {time.perf_counter() - t:.1f} s", flush=True)
    else:
        ckpt = wd / f"qwen2-{args.layers}x{args.hidden}"
        if not (ckpt / "config.json").is_file():
            random_qwen2(ckpt, args.layers, args.hidden, args.vocab)
    t = time.perf_counter()
    fused = export_model(ExportConfig(model=str(ckpt), workdir=wd, graph="fused"))
    print(f"export --graph fused: {time.perf_counter() - t:.1f} s", flush=True)
    report = json.loads(fused.report_path.read_text())
    lengths = [37, 12, 1]
    rows = []
    for key in args.cases.split(","):
        s_opts, q_opts = CASES[key]
        out = wd / "stream" / key
        if not (out / "model.onnx").is_file():
            stream_build(ckpt, out, StreamConfig(**s_opts))
        traced = fused.onnx_path if q_opts is None else quantize_model(
            QuantizeConfig(model=str(ckpt), workdir=wd, graph="fused", **q_opts)).onnx_path
        row = {"case": key, **compare(out / "model.onnx", traced)}
        x, y = logits(out / "model.onnx", report, lengths, args.vocab), logits(traced, report, lengths, args.vocab)
        row["max_abs_logit_diff"] = float(np.max(np.abs(x - y)))
        row["max_abs_logit"] = float(np.max(np.abs(y)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    params = sum(int(np.prod(v.dims)) for v in onnx.load(str(fused.onnx_path), load_external_data=False).graph.initializer)
    print(f"\nmodel: {ckpt.name}, {params / 1e6:.1f} M initializer elements")
    print(f"{'case':<14} {'same nodes':<11} {'initializers differing':<24} {'max |Δ logit|':>14}")
    for r in rows:
        print(f"{r['case']:<14} {str(r['same_nodes']):<11} {r['differing_initializers']:>3} of {r['initializers']:<17} "
              f"{r['max_abs_logit_diff']:>14.3g}")


if __name__ == "__main__":
    main()
