"""The embedded default models: tiny, deterministic, real Hugging Face checkpoint directories.

* `r1-distill-tiny` — `Qwen2ForCausalLM`, the DeepSeek-R1-Distill-Qwen architecture.
* `r1-moe-tiny` — `DeepseekV3ForCausalLM`, the full R1 architecture (MLA attention + routed/shared MoE experts).

Weights come from a fixed seed, the tokenizer is a byte-level BPE trained on an embedded corpus, so the same
files come out on every machine. The directory is written to a temporary place and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

SEED = 20250120  # DeepSeek-R1's release date

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL = [BOS, EOS, PAD, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]

# Small, fixed text the tokenizer is trained on and that calibration and accuracy checks draw from.
CORPUS = [
    "DeepSeek-R1 is a reasoning model trained with large-scale reinforcement learning.",
    "The distilled models use the Qwen2 and Llama architectures, from 1.5 billion to 70 billion parameters.",
    "A deployment takes a checkpoint, exports it to ONNX, quantizes the weights and builds a TensorRT engine.",
    "Triton Inference Server serves the engine with dynamic batching and streams tokens to the client.",
    "Kubernetes schedules the server on nodes with NVIDIA A100 or RTX 4090 GPUs.",
    "The key-value cache stores the attention keys and values of every past token.",
    "Prefill processes the whole prompt at once; decode produces one token per step.",
    "Quantization to four-bit integers shrinks the weights by about seventy-five percent.",
    "Activation-aware scaling protects the channels that matter most for accuracy.",
    "The quick brown fox jumps over the lazy dog while the model thinks step by step.",
    "Mixture-of-experts layers route each token to a few experts out of many.",
    "Multi-head latent attention compresses the key-value cache into a small latent vector.",
    "Latency, throughput and accuracy are measured before a model ships to production.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Question: what is 17 times 3? Answer: <think>17 times 3 is 51.</think> 51.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2025; symbols + - * / = ( ) [ ] { } < > ! ? . , ; :",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)

TINY_CONFIGS: dict[str, dict] = {
    "r1-distill-tiny": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
    ),
    "r1-moe-tiny": dict(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE — like R1's first 3 dense layers
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
}
VOCAB_SIZE = 1024


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def _fingerprint(preset: str) -> str:
    payload = json.dumps({"config": TINY_CONFIGS[preset], "seed": SEED, "corpus": CORPUS, "vocab": VOCAB_SIZE}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_tiny_checkpoint(preset: str, dest: Path) -> Path:
    """Write (once) the tiny checkpoint for `preset` to `dest`; reuse it when its fingerprint matches."""
    dest = Path(dest)
    stamp = dest / "r1deploy-preset.json"
    want = _fingerprint(preset)
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == want:
        return dest

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_train_tokenizer(),
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            additional_special_tokens=SPECIAL[3:],
            model_max_length=TINY_CONFIGS[preset]["max_position_embeddings"],
        )
        tok.chat_template = CHAT_TEMPLATE
        tok.padding_side = "left"
        tok.save_pretrained(str(tmp))

        settings = dict(TINY_CONFIGS[preset])
        model_type = settings.pop("model_type")
        settings.update(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        config = AutoConfig.for_model(model_type, **settings)
        torch.manual_seed(SEED)
        extra = {"experts_implementation": "batched_mm"} if model_type == "deepseek_v3" else {}
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa", **extra)
        # A wider spread than HF's default init (std 0.02) gives the tiny model peaked, input-dependent
        # logits, so top-1 agreement and quantization error are meaningful measures on it.
        with torch.no_grad():
            g = torch.Generator().manual_seed(SEED)
            for _name, p in sorted(model.named_parameters()):
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
        model.save_pretrained(str(tmp), safe_serialization=True)
        model.generation_config.save_pretrained(str(tmp))
        (tmp / "r1deploy-preset.json").write_text(
            json.dumps({"preset": preset, "fingerprint": want, "seed": SEED, "transformers": transformers.__version__}, indent=2)
            + "\n"
        )
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
