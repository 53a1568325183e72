"""The embedded r1-distill-tiny has learned its corpus: greedy decoding (ONNX Runtime, in process) continues every
corpus prompt with its exact corpus text for FP32 and FP16 and, for INT4 AWQ, the quantize report states its
agreement with FP32 on held-out text, on in-domain text it never saw and on its corpus. No mocks: the real
shipped weights, the real export, the real quantize stage."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from exporter import tiny_models
from exporter.core import artifacts
from exporter.repository.reference import GreedyLoop
from quantize import QuantizeConfig, quantize_model
from quantize.sentences import CALIBRATION, EVALUATION

MODEL = "r1-distill-tiny"


@pytest.fixture(scope="module")
def tokenizer(exported, session_workdir):
    exported(MODEL)
    return Tokenizer.from_file(str(artifacts.ModelLayout(session_workdir, MODEL).tokenizer_dir / "tokenizer.json"))


def reproduced(onnx_path, tokenizer) -> list[str]:
    """The prompts whose greedy continuation is NOT the exact corpus continuation (end-of-text included)."""
    loop = GreedyLoop(onnx_path)
    misses = []
    for prompt, cont in tiny_models.reproduction_cases():
        want = tokenizer.encode(cont).ids
        if loop(tokenizer.encode(prompt).ids, len(want)) != want:
            misses.append(prompt)
    return misses


def test_chat_prompt_is_what_the_chat_template_renders(exported, session_workdir):
    from transformers import AutoTokenizer

    exported(MODEL)
    hf = AutoTokenizer.from_pretrained(str(artifacts.ModelLayout(session_workdir, MODEL).tokenizer_dir))
    for question, _, _ in tiny_models.CHAT_TURNS[:3]:
        rendered = hf.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        assert rendered == tiny_models.chat_prompt(question)
        assert rendered.endswith("<｜Assistant｜><think>\n")
    # the OpenAI gateway splits reasoning on this token id: it must stay one special token
    assert hf.convert_tokens_to_ids("</think>") in hf.all_special_ids


def test_corpus_cases_split_on_token_boundaries_and_held_out_is_never_trained(tokenizer):
    train = tiny_models.training_texts()
    cases = tiny_models.reproduction_cases()
    assert len(tiny_models.CHAT_TURNS) >= 24 and len(cases) == len(train)
    assert len({p for p, _ in cases}) == len(cases)  # every prompt leads to one continuation
    for prompt, cont in cases:
        assert tokenizer.encode(prompt + cont).ids[: len(tokenizer.encode(prompt).ids)] == tokenizer.encode(prompt).ids
    joined = "\n".join(train)
    for line in (*tiny_models.held_out_texts(), *EVALUATION, *CALIBRATION):
        assert line not in joined


def test_fp32_and_fp16_continue_every_corpus_prompt_exactly(exported, session_workdir, tokenizer):
    assert reproduced(exported(MODEL).onnx_path, tokenizer) == []
    fp16 = quantize_model(QuantizeConfig(model=MODEL, workdir=session_workdir, precision="fp16"))
    assert reproduced(fp16.onnx_path, tokenizer) == []


def test_chat_turn_answer_has_reasoning_then_answer(exported, tokenizer):
    question, reasoning, answer = tiny_models.CHAT_TURNS[0]
    loop = GreedyLoop(exported(MODEL).onnx_path)
    eos = tokenizer.token_to_id(tiny_models.EOS)
    ids = loop(tokenizer.encode(tiny_models.chat_prompt(question)).ids, 128, {eos})
    end_think = tokenizer.token_to_id(tiny_models.END_THINK)
    assert ids.count(end_think) == 1
    cut = ids.index(end_think)
    assert tokenizer.decode(ids[:cut], skip_special_tokens=False).strip() == reasoning
    assert tokenizer.decode(ids[cut + 1:], skip_special_tokens=False).strip() == answer


def test_int4_awq_report_states_agreement_on_held_out_and_corpus(exported, session_workdir, tokenizer):
    exported(MODEL)
    settings = dict(model=MODEL, workdir=session_workdir, precision="int4", method="awq", block_size=128,
                    format="qdq", mixed_precision=False)
    # the same variant without the preset's texts first: the texts are part of the fingerprint, so the run with
    # them below measures them instead of returning this report as up to date
    plain = quantize_model(QuantizeConfig(**settings))
    assert set(json.loads(plain.report_path.read_text())["accuracy_by_text"]) == {"held_out"}
    r = quantize_model(QuantizeConfig(**settings, extra_texts=tiny_models.quality_texts(MODEL)))
    assert not r.skipped
    report = json.loads(r.report_path.read_text())
    by_text = report["accuracy_by_text"]
    assert set(by_text) == {"held_out", "held_out_domain", "corpus"} and by_text["held_out"] == report["accuracy"]
    assert by_text["held_out"]["tokens"] > by_text["held_out_domain"]["tokens"] > 0
    for figures in by_text.values():
        assert 0.0 < figures["top1_agreement"] <= 1.0 and figures["kl_divergence"] >= 0.0
        assert figures["perplexity_fp32"] >= 1.0 and figures["perplexity"] >= 1.0
    # Learned weights: the model is near-certain on what it memorised and unsure on text it never saw.
    assert by_text["corpus"]["perplexity_fp32"] < 1.5 < by_text["held_out_domain"]["perplexity_fp32"]
    # What quantization costs is smallest where the model is sure (its corpus), largest on unseen text.
    assert by_text["corpus"]["kl_divergence"] < by_text["held_out"]["kl_divergence"]
    assert by_text["corpus"]["top1_agreement"] > by_text["held_out"]["top1_agreement"]
    # The edge profile's gate (cosine ≥ 0.95, top-1 ≥ 0.80 on held-out text) holds with every layer INT4, as
    # docs/benchmarks.md records; the edge profile therefore no longer needs mixed precision by default.
    assert r.accuracy["cosine"] >= 0.95 and r.accuracy["top1"] >= 0.80 and not r.kept_layers
    assert reproduced(r.onnx_path, tokenizer) == []  # INT4 AWQ still continues every corpus prompt


def test_edge_gate_rejects_rtn_b128_of_the_trained_model(exported, session_workdir):
    """The edge decision's other half: without mixed precision the gate does its job — plain RTN at block 128
    misses top-1 0.80 on held-out text (0.777 when measured for docs/benchmarks.md) and nothing is written."""
    from exporter.core.errors import StageFailed

    exported(MODEL)
    with pytest.raises(StageFailed, match="top-1 agreement .* below the gate 0.8 \\(profile edge\\)"):
        quantize_model(QuantizeConfig(model=MODEL, workdir=session_workdir, profile="edge", method="rtn"))
    assert not artifacts.ModelLayout(session_workdir, MODEL).onnx_dir("int4-rtn-b128-qdq").exists()
