"""Sampling cost per decode step: r1deploy's batched sampler (`llm_scheduler.sample_rows`, what `generate` runs)
against the per-row sampler it replaced and a torch sampler built the way vLLM's v1 sampler works (softmax, a full
sort of each row for top-k / top-p, the exponential race for the draw; multi-threaded torch ops), on the same
logits in one run.

    .venv/bin/python benchmarks/sampling.py [--rows 64] [--vocab 151936] [--repeats 5]

Logits: "peaked" rows are Zipf-like (log-probability falling as 1.2·ln(rank), ids shuffled, noise 0.3), the shape
of a trained LM's next-token distribution; "flat" rows are N(0, 2) — the worst case for a nucleus cut, where top-p
0.95 keeps most of the vocabulary. Issue #21's goal is ≤ 1 ms per step for 64 rows at 151 936 tokens; the script
also prints the floor of any full-vocabulary host sampler here: one pass of `max` over the logits.

The per-row "before" sampler is the one `generate` used until this script was written (float64 softmax, a full
argsort per row, `Generator.choice`), copied here as the baseline. vLLM itself is not imported: its sampler needs
its own venv and a GPU-shaped build; the torch sampler follows its published algorithm, not its code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "exporter" / "repository" / "python_models"))
import llm_scheduler as ls  # noqa: E402

CASES = [  # temperature, top_p, top_k
    ("greedy", 0.0, 1.0, 0),
    ("T=0.6", 0.6, 1.0, 0),
    ("T=0.6 top_p=0.95 (R1's)", 0.6, 0.95, 0),
    ("T=1 top_k=50 top_p=0.95", 1.0, 0.95, 50),
]


class PerRowBefore:
    """The sampler r1deploy had before the batched one: one row at a time."""

    def __init__(self, temperature: float, top_p: float, seed: int):
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temperature
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
            nucleus = np.zeros_like(p)
            nucleus[keep] = p[keep]
            p = nucleus / nucleus.sum()
        return int(self.rng.choice(p.shape[0], p=p))


def torch_sampler(torch, logits, temperature: float, top_p: float, top_k: int, gen):
    """Batched over rows in torch, the way vLLM's v1 sampler does it: greedy by argmax; else logits / T, a sort of
    every row, the tail beyond top_k and beyond the top_p mass masked, softmax, then argmax(p / Exp(1))."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    x = logits / temperature
    if top_k or top_p < 1.0:
        s, idx = x.sort(dim=-1, descending=False)
        if top_k:
            kth = s[:, -top_k].unsqueeze(1)
            s = s.masked_fill(s < kth, float("-inf"))
        if top_p < 1.0:
            p = s.softmax(dim=-1)
            tail = p.cumsum(dim=-1) <= 1 - top_p
            tail[:, -1] = False
            s = s.masked_fill(tail, float("-inf"))
        x = torch.empty_like(x).scatter_(-1, idx, s)
    p = x.softmax(dim=-1)
    q = torch.empty_like(p).exponential_(generator=gen)
    return p.div_(q).argmax(dim=-1)


def logits_for(kind: str, rows: int, vocab: int, rng) -> np.ndarray:
    if kind == "flat":
        return (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    base = -1.2 * np.log(np.arange(1, vocab + 1))
    out = np.empty((rows, vocab), np.float32)
    for r in range(rows):
        out[r, rng.permutation(vocab)] = base + 0.3 * rng.standard_normal(vocab) + 20
    return out


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.rows < 1 or args.vocab < 2 or args.repeats < 1:
        print("error: --rows ≥ 1, --vocab ≥ 2 and --repeats ≥ 1", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0]
    print(f"rows {args.rows}, vocab {args.vocab}, {os.cpu_count()} cores, load {load:.2f}; "
          f"torch {torch.__version__ + f' ({torch.get_num_threads()} threads)' if torch else 'not installed'}")
    print(f"{'logits':7} {'case':26} {'r1deploy ms':>12} {'before ms':>10} {'torch ms':>9} {'before/r1d':>11} "
          f"{'torch/r1d':>10} {'goal 1 ms':>9}")
    for kind in ("peaked", "flat"):
        logits = logits_for(kind, args.rows, args.vocab, rng)
        floor = timed(lambda logits=logits: logits.max(axis=1), args.repeats)
        for name, t, p, k in CASES:
            samplers = [ls.Sampler(t, p, i, k) for i in range(args.rows)]
            scratch: dict = {}
            ours = timed(lambda s=samplers, x=logits, w=scratch: ls.sample_rows(s, x, w), args.repeats)
            before = float("nan")
            if k == 0:
                old = [PerRowBefore(t, p, i) for i in range(args.rows)]
                before = timed(lambda old=old, x=logits: [old[i](x[i]) for i in range(args.rows)], 1)
            theirs = float("nan")
            if torch is not None:
                tl = torch.from_numpy(logits)
                gen = torch.Generator().manual_seed(0)
                theirs = timed(lambda tl=tl, t=t, p=p, k=k, gen=gen: torch_sampler(torch, tl, t, p, k, gen), args.repeats)
            print(f"{kind:7} {name:26} {ours:12.1f} {before:10.1f} {theirs:9.1f} {before / ours:11.1f} "
                  f"{theirs / ours:10.2f} {'met' if ours <= 1.0 else 'missed':>9}")
        print(f"{kind:7} {'floor: one max pass':26} {floor:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
