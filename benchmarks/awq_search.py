"""The AWQ search (`quantize.core.quantize_awq`) on one decoder layer of a real shape, timed weight by weight.

Random FP32 weights of the shape's MatMuls (q|k|v fused, o, gate, up, down: the fused graph's layout) and random
activations with a spread of per-channel magnitudes (so the scale search has salient channels to find), as many
rows as the 48 calibration sentences give with MiniLM's tokenizer (715). Prints seconds, the chosen alpha and the
relative output error ‖X(W − Ŵ)‖² / ‖XW‖² per weight, and the layer's total. Run it on two commits to compare
implementations (docs/benchmarks.md records the numpy search against the torch one):

    python benchmarks/awq_search.py [--shape r1-distill-qwen-1.5b] [--block-size 128] [--rows 715]
"""

from __future__ import annotations

import argparse
import time
from importlib import resources

import numpy as np
import yaml

from quantize import core


def layer_shapes(shape: str) -> dict[str, tuple[int, int]]:
    configs = yaml.safe_load(resources.files("exporter").joinpath("data/model_configs.yaml").read_text())
    cfg = configs[shape]["config"]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * d
    return {"qkv_proj": (h, h + 2 * kv), "o_proj": (h, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="r1-distill-qwen-1.5b", help="a shape of exporter/data/model_configs.yaml")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--rows", type=int, default=715, help="calibration activation rows")
    ap.add_argument("--asymmetric", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    total = 0.0
    for name, (k, n) in layer_shapes(args.shape).items():
        w = rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.02)
        x = rng.standard_normal((args.rows, k), dtype=np.float32) * np.exp(rng.standard_normal(k, dtype=np.float32))
        t0 = time.perf_counter()
        qw = core.quantize_awq(w, x, args.block_size, not args.asymmetric)
        dt = time.perf_counter() - t0
        total += dt
        ref = x @ w
        err = float(np.square(ref - x @ qw.dequantize()).sum() / np.square(ref).sum())
        print(f"{name:10s} [{k}, {n}]  {dt:6.2f} s  alpha {qw.alpha:.1f}  output error {err:.6f}", flush=True)
    print(f"layer total {total:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
