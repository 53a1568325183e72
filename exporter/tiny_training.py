"""Train the embedded `r1-distill-tiny` on its corpus and write what the package ships: exporter/data/tiny/
tokenizer.json, r1-distill-tiny.safetensors and r1-distill-tiny.train.json (the recipe, the loss curve, the time
it took, the machine, and the greedy reproduction rate it reached).

    .venv/bin/python -m exporter.tiny_training           # writes exporter/data/tiny/
    .venv/bin/python -m exporter.tiny_training --out DIR # writes elsewhere (to compare)

Only r1-distill-tiny's weights ship. `--preset r1-moe-tiny` trains the MoE model the same way (it reproduced the
whole corpus from step 75 too) but its batched-matmul experts cost ~4.8 s a step here against 0.29 s, 15 min
for 190 steps: not worth it for a model that stands in for the architecture, not for text.

Deterministic on one machine: fixed seed, one thread, full-batch steps in corpus order, deterministic torch
algorithms. Across CPUs or library versions the floating-point sums may differ, so a re-run can give slightly
different weights: the shipped file is what the package uses, and nothing compares a re-run with it byte for
byte — the script checks behaviour instead (every corpus prompt continues with its exact text).

Reproduction is checked exactly with one teacher-forced pass: greedy decoding from a prompt yields the corpus
continuation iff at every continuation position the arg-max of the logits is the corpus's next token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from exporter import tiny_models as tm

RECIPE = dict(steps=600, lr=3e-3, warmup=30, weight_decay=0.0, betas=(0.9, 0.98), clip=1.0, threads=1,
              min_steps_after_reproduction=150)


def encode(tok, cases):
    """Right-padded ids, attention mask, loss labels (-100 on padding) and the continuation positions."""
    rows = []
    for prompt, cont in cases:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + cont, add_special_tokens=False)["input_ids"]
        if full[: len(p)] != p:
            raise SystemExit(f"prompt tokens are not a prefix of the line's tokens: {prompt!r}")
        rows.append((full, len(p)))
    width = max(len(f) for f, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    cont = torch.zeros((len(rows), width), dtype=torch.bool)  # positions t whose NEXT token is continuation
    for i, (full, n_prompt) in enumerate(rows):
        ids[i, : len(full)] = torch.tensor(full)
        mask[i, : len(full)] = 1
        cont[i, n_prompt - 1 : len(full) - 1] = True
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels, cont


@torch.no_grad()
def reproduction(model, ids, mask, cont) -> tuple[float, float]:
    """(fraction of cases whose whole continuation greedy decoding reproduces, smallest logit margin over them)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = ids[:, 1:]
    c = cont[:, :-1]
    correct = (logits.argmax(-1) == target) | ~c
    true_logit = logits.gather(-1, target[..., None])[..., 0]
    other = logits.scatter(-1, target[..., None], float("-inf")).max(-1).values
    margin = (true_logit - other)[c]
    return float(correct.all(-1).float().mean()), float(margin.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=tm.DATA)
    ap.add_argument("--preset", choices=sorted(tm.TINY_CONFIGS), default="r1-distill-tiny")
    args = ap.parse_args()
    PRESET = args.preset

    torch.set_num_threads(RECIPE["threads"])
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    # One tokenizer for every preset: r1-distill-tiny's run learns it from the corpus (so a corpus change gives a
    # new one); another preset's run reuses the one in --out, so its weights fit the same ids.
    raw = tm.train_tokenizer() if PRESET == "r1-distill-tiny" else Tokenizer.from_file(str(args.out / "tokenizer.json"))
    tok = tm.hf_tokenizer(PRESET, tokenizer_object=raw)
    model = tm.build_model(PRESET, tok)
    cases = tm.reproduction_cases()
    ids, mask, labels, cont = encode(tok, cases)
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], betas=RECIPE["betas"], weight_decay=RECIPE["weight_decay"])
    steps, warm = RECIPE["steps"], RECIPE["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    curve, first_full = [], None
    model.train()
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip"])
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps:
            model.eval()
            rate, margin = reproduction(model, ids, mask, cont)
            model.train()
            curve.append({"step": step, "loss": round(loss.item(), 5), "reproduced": rate, "min_margin": round(margin, 3)})
            print(json.dumps(curve[-1]), flush=True)
            if rate == 1.0 and first_full is None:
                first_full = step
            if first_full is not None and step - first_full >= RECIPE["min_steps_after_reproduction"] and margin > 1.0:
                break
    model.eval()
    rate, margin = reproduction(model, ids, mask, cont)
    seconds = time.perf_counter() - started
    if rate < 1.0:
        raise SystemExit(f"only {rate:.1%} of the corpus is reproduced after {step} steps: change the recipe")

    args.out.mkdir(parents=True, exist_ok=True)
    raw.save(str(args.out / "tokenizer.json"))
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / f"{PRESET}.safetensors"), metadata={"format": "pt"})
    record = {
        "preset": PRESET, "recipe": RECIPE, "steps_run": step, "first_full_reproduction_step": first_full,
        "sequences": len(cases), "tokens": int(mask.sum()), "parameters": sum(p.numel() for p in model.parameters()),
        "final": {"loss": curve[-1]["loss"], "reproduced": rate, "min_margin": round(margin, 3)},
        "seconds": round(seconds, 1), "machine": {"cpu": platform.processor() or platform.machine(),
                                                   "cores": os.cpu_count(), "load": os.getloadavg()[0]},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
        "curve": curve,
    }
    (args.out / f"{PRESET}.train.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"reproduced {rate:.0%} of {len(cases)} sequences after {step} steps in {seconds:.0f} s → {args.out}")


if __name__ == "__main__":
    main()
