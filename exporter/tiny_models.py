"""The embedded default models: tiny, real Hugging Face checkpoint directories.

* `r1-distill-tiny` — `Qwen2ForCausalLM`, the DeepSeek-R1-Distill-Qwen architecture, with LEARNED weights: it has
  memorised its embedded corpus (`exporter.tiny_corpus`: prose, code and R1-style chat turns with a `<think>`
  trace), so greedy decoding continues a corpus line from its first words and answers a corpus question with its
  reasoning and answer. The weights ship with the package (`data/tiny/`, ~2 MB) next to a record of the run that
  made them (`exporter/tiny_training.py`).
* `r1-moe-tiny` — `DeepseekV3ForCausalLM`, the full R1 architecture (MLA attention + routed/shared MoE experts),
  with seeded random weights (it tests the export / quantize paths of that architecture, not text).

Why ship the weights rather than train on first use: training takes minutes here (see the record), a fresh clone
and CI must stay fast, and floating-point training is not bit-exact across CPUs and library versions — the shipped
file is the one truth, and nothing compares a re-run of the training with it byte for byte. The tokenizer
(a byte-level BPE trained on the same corpus) ships too, since the weights are only meaningful with its ids.
The checkpoint directory is written to a temporary place and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .core import artifacts
from .tiny_corpus import CHAT_TURNS, CORPUS, HELD_OUT

SEED = 20250120  # DeepSeek-R1's release date

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK]

DATA = Path(__file__).resolve().parent / "data" / "tiny"
TOKENIZER_FILE = DATA / "tokenizer.json"
# Presets with learned weights: the safetensors file and the record of the training run that wrote it.
TRAINED = {"r1-distill-tiny": DATA / "r1-distill-tiny.safetensors"}

# DeepSeek-R1's chat format, as its own tokenizer_config.json's template renders it: the system prompts (joined by a
# blank line) right after bos, user turns, assistant turns with their thought dropped (the text after the last
# `</think>`) and their tool calls in R1's tool-call tags, tool outputs in R1's tool-output tags, and the generation
# prompt that opens a thought (none after tool outputs: the model goes on from `<｜tool▁outputs▁end｜>`). Two
# differences: R1's own template never resets its first-call / first-output flags between turns (a second tool
# turn loses its `<｜Assistant｜>`): they are reset per turn here; and it does not render `tools` at all, so the
# function definitions go into the system prompt as vLLM's and SGLang's R1 tool templates put them. A user-only
# chat renders exactly as before (tested: the trained model's answers depend on it).
_TOOL_CALL = ("'<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>' + call['function']['name'] + '\\n```json\\n'"
              " + call['function']['arguments'] + '\\n```<｜tool▁call▁end｜>'")
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', tools='', first_system=true, in_tool=false, first_output=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = m['content'] if ns.first_system else ns.system + '\\n\\n' + m['content'] -%}"
    "{%- set ns.first_system = false -%}"
    "{%- endfor -%}"
    "{%- if tools -%}"
    "{%- set ns.tools = '## Tools\\n\\nTo call a function, answer with\\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
    "function<｜tool▁sep｜>NAME\\n```json\\n{\"argument\": \"value\"}\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>\\n"
    "(one tool-call block per call, inside one tool-calls block). The functions:\\n' -%}"
    "{%- for tool in tools -%}{%- set ns.tools = ns.tools + '\\n```json\\n' + (tool | tojson) + '\\n```\\n' -%}{%- endfor -%}"
    "{%- set ns.system = ns.tools if ns.first_system else ns.system + '\\n\\n' + ns.tools -%}"
    "{%- endif -%}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set ns.in_tool = false -%}<｜User｜>{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] or '' -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{%- if ns.in_tool -%}<｜tool▁outputs▁end｜>{%- else -%}<｜Assistant｜>{%- endif -%}"
    "{%- set ns.in_tool = false -%}{%- set ns.first_output = true -%}"
    "{{ content }}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}"
    "<｜tool▁calls▁begin｜>"
    "{%- for call in m['tool_calls'] -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}{{ " + _TOOL_CALL + " }}{%- endfor -%}"
    "<｜tool▁calls▁end｜>"
    "{%- endif -%}"
    "{{ eos_token }}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if ns.first_output -%}<｜tool▁outputs▁begin｜>{%- endif -%}"
    "<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{%- set ns.in_tool = true -%}{%- set ns.first_output = false -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.in_tool -%}<｜tool▁outputs▁end｜>{%- endif -%}"
    "{%- if add_generation_prompt and not ns.in_tool -%}<｜Assistant｜><think>{{ '\\n' }}{%- endif -%}"
)


def chat_prompt(question: str) -> str:
    """What the chat template renders for one user message with add_generation_prompt (tested against it)."""
    return f"{BOS}{USER}{question}{ASSISTANT}{THINK}\n"


def chat_completion(reasoning: str, answer: str) -> str:
    """R1's shape of answer after the prompt: the rest of the think block, `</think>`, the answer, end of text."""
    return f"{reasoning}\n{END_THINK}\n\n{answer}{EOS}"


PROMPT_WORDS = 4  # a prose/code line's prompt: its first words


def split_line(line: str, words: int = PROMPT_WORDS) -> tuple[str, str]:
    """(prompt, continuation) of a corpus line: cut before the whitespace that precedes word `words + 1`, so that
    the byte-level pre-tokenizer splits the line at the same place and the prompt's ids + the continuation's ids
    are the line's ids (checked by exporter/tiny_training.py and the tests)."""
    seen, i, n = 0, 0, len(line)
    while i < n:
        while i < n and line[i].isspace():
            i += 1
        if i == n:
            break
        if seen == words:
            j = i
            while j > 0 and line[j - 1].isspace():
                j -= 1
            return line[:j], line[j:]
        seen += 1
        while i < n and not line[i].isspace():
            i += 1
    raise ValueError(f"corpus line has fewer than {words + 1} words: {line!r}")


def reproduction_cases() -> list[tuple[str, str]]:
    """(prompt, exact continuation) for every training sequence: a chat turn's generation prompt and its reasoning
    + answer, a prose/code line's first words and the rest of it; the continuation ends with the end-of-text
    token. Training text = prompt + continuation."""
    cases = [(chat_prompt(q), chat_completion(r, a)) for q, r, a in CHAT_TURNS]
    for line in CORPUS:
        prompt, rest = split_line(line)
        cases.append((prompt, rest + EOS))
    return cases


def training_texts() -> list[str]:
    return [p + c for p, c in reproduction_cases()]


def held_out_texts() -> tuple[str, ...]:
    return HELD_OUT


def quality_texts(model: str) -> dict[str, tuple[str, ...]]:
    """What the quantize stage measures besides its held-out sentences (`QuantizeConfig.extra_texts`): for an
    embedded preset with learned weights, what it was trained on (how well quantization keeps what it memorised)
    and in-domain text it never saw; nothing for any other model."""
    if model not in TRAINED:
        return {}
    return {"corpus": tuple(training_texts()), "held_out_domain": held_out_texts()}


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


def train_tokenizer():
    """The byte-level BPE of the tiny models, learned on the corpus pieces (special tokens kept out of the
    training text, so no merge spans one). Used by exporter/tiny_training.py; the package ships its output."""
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
    pieces = list(CORPUS) + [part for turn in CHAT_TURNS for part in turn]
    tok.train_from_iterator(pieces * 4, trainer=trainer)
    return tok


def hf_tokenizer(preset: str, tokenizer_object=None):
    from transformers import PreTrainedTokenizerFast

    kwargs = {"tokenizer_object": tokenizer_object} if tokenizer_object is not None else {"tokenizer_file": str(TOKENIZER_FILE)}
    tok = PreTrainedTokenizerFast(
        **kwargs,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL[3:],
        model_max_length=TINY_CONFIGS[preset]["max_position_embeddings"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_model(preset: str, tok):
    """The architecture of `preset` with HF's seeded initialisation (float32, sdpa attention)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

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
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa", **extra)


def _fingerprint(preset: str) -> str:
    payload = {"config": TINY_CONFIGS[preset], "seed": SEED, "vocab": VOCAB_SIZE, "tokenizer": artifacts.sha256_file(TOKENIZER_FILE),
               "chat_template": artifacts.sha256_text(CHAT_TEMPLATE)}  # a changed template rewrites the checkpoint
    if preset in TRAINED:
        payload["weights"] = artifacts.sha256_file(TRAINED[preset])
    return artifacts.sha256_text(json.dumps(payload, sort_keys=True))[:16]


def write_tiny_checkpoint(preset: str, dest: Path) -> Path:
    """Write (once) the tiny checkpoint for `preset` to `dest`; reuse it when its fingerprint matches."""
    dest = Path(dest)
    stamp = dest / "r1deploy-preset.json"
    want = _fingerprint(preset)
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == want:
        return dest

    import torch
    import transformers

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tok = hf_tokenizer(preset)
        tok.save_pretrained(str(tmp))
        model = build_model(preset, tok)
        if preset in TRAINED:
            from safetensors.torch import load_file

            # strict: a shipped file that does not fit the architecture is a packaging bug, not a fallback case
            model.load_state_dict(load_file(str(TRAINED[preset])), strict=True)
        else:
            # A wider spread than HF's default init (std 0.02) gives the random model peaked, input-dependent
            # logits, so top-1 agreement and quantization error are meaningful measures on it.
            with torch.no_grad():
                g = torch.Generator().manual_seed(SEED)
                for _name, p in sorted(model.named_parameters()):
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
        model.save_pretrained(str(tmp), safe_serialization=True)
        model.generation_config.save_pretrained(str(tmp))
        (tmp / "r1deploy-preset.json").write_text(
            json.dumps({"preset": preset, "fingerprint": want, "seed": SEED, "trained": preset in TRAINED,
                        "transformers": transformers.__version__}, indent=2)
            + "\n"
        )
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
