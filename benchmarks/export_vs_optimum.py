"""Export the same Qwen2 decoder (random weights, ~125M parameters) with KV cache with r1deploy and with Optimum's
ONNX exporter, in one run; print wall time and peak RSS of each and the ratios.

    .venv/bin/python benchmarks/export_vs_optimum.py [--layers 12] [--hidden 768] [--repeat 1]

Optimum (`optimum-onnx`) pins an older transformers, so it lives in its own venv, created on first use under
build/bench-venvs/optimum (torch pinned through the project's constraints file). Each exporter runs in its own
process; peak RSS is that process's ru_maxrss (os.wait4), wall time includes its imports and validation —
both tools verify their ONNX against PyTorch by default and both do here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def make_checkpoint(path: Path, layers: int, hidden: int) -> int:
    code = f"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from exporter.tiny_models import write_tiny_checkpoint
tok_dir = write_tiny_checkpoint("r1-distill-tiny", __import__("pathlib").Path({str(path.parent / "tok")!r}))
cfg = Qwen2Config(vocab_size=32000, hidden_size={hidden}, intermediate_size={hidden * 8 // 3 // 64 * 64},
    num_hidden_layers={layers}, num_attention_heads={hidden // 64}, num_key_value_heads=2,
    max_position_embeddings=4096, tie_word_embeddings=False)
torch.manual_seed(0)
m = Qwen2ForCausalLM(cfg)
m.save_pretrained({str(path)!r}, safe_serialization=True)
print(sum(p.numel() for p in m.parameters()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.strip().splitlines()[-1])


def ensure_optimum_venv(venv: Path) -> Path | None:
    cli = venv / "bin" / "optimum-cli"
    if cli.exists():
        return cli
    print(f"creating {venv} for optimum-onnx (one-off, a few minutes)…", flush=True)
    constraints = VENV_BIN.parent / "constraints.txt"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        if constraints.is_file():
            pip += ["-c", str(constraints)]
        subprocess.run(pip + ["optimum-onnx==0.1.0", "onnxruntime"], check=True)
    except subprocess.CalledProcessError as exc:
        print(f"optimum-onnx could not be installed ({exc}); skipping the peer")
        return None
    return cli if cli.exists() else None


def measure(cmd: list[str], env: dict | None = None) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[0]} failed ({code}):\n{output[-3000:]}")
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / (1 << 20), "cpu_s": usage.ru_utime + usage.ru_stime}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--optimum-venv", type=Path, default=REPO / "build" / "bench-venvs" / "optimum")
    ap.add_argument("--with-legacy", action="store_true", help="also time r1deploy's legacy (TorchScript) exporter")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "qwen2-bench"
        n = make_checkpoint(ckpt, args.layers, args.hidden)
        print(f"checkpoint: Qwen2ForCausalLM, {n / 1e6:.0f}M parameters, random weights, {ckpt}")
        rows: dict[str, dict] = {}
        r1 = str(VENV_BIN / "r1deploy")
        rows["r1deploy (dynamo)"] = measure([r1, "-q", "--workdir", str(tmp / "r1"), "export", "--model", str(ckpt), "--force"])
        if args.with_legacy:
            rows["r1deploy (legacy)"] = measure(
                [r1, "-q", "--workdir", str(tmp / "r1l"), "export", "--model", str(ckpt), "--force", "--exporter", "legacy"]
            )
        cli = ensure_optimum_venv(args.optimum_venv)
        if cli:
            rows["optimum-onnx 0.1.0"] = measure(
                [str(cli), "export", "onnx", "--model", str(ckpt), "--task", "text-generation-with-past", str(tmp / "optimum")],
                env={"HF_HUB_OFFLINE": "1"},
            )
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()} — CPU only")
    print(f"{'exporter':24} {'wall s':>8} {'peak RSS GiB':>13} {'CPU s':>8}")
    for name, r in rows.items():
        print(f"{name:24} {r['wall_s']:8.1f} {r['peak_rss_gib']:13.2f} {r['cpu_s']:8.1f}")
    peer = rows.get("optimum-onnx 0.1.0")
    if peer:
        for name, r in rows.items():
            if name.startswith("r1deploy"):
                print(
                    f"{name} / optimum: time {r['wall_s'] / peer['wall_s']:.2f}x, peak RSS {r['peak_rss_gib'] / peer['peak_rss_gib']:.2f}x"
                    f"  (goal: time ≤ 1.00x and RSS ≤ 0.45x)"
                )
    if args.json:
        args.json.write_text(json.dumps({"parameters": n, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
