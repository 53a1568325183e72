"""The served r1-distill-tiny answers with what it learned: through a real Triton (CPU build, python backend,
python_ort repositories), greedy decoding continues corpus prompts — R1-style chat turns rendered with the chat
template, prose and code lines from their first words — with their exact corpus text, for FP32 and FP16."""

from __future__ import annotations

import json
import urllib.request

import pytest
from tokenizers import Tokenizer

from exporter import tiny_models
from exporter.repository import RepositoryConfig, write_repository
from exporter.serve import ServerConfig, TritonServer
from quantize import QuantizeConfig, quantize_model

pytestmark = pytest.mark.triton
MODEL = "r1-distill-tiny"
CHAT_CASES = 8
LINE_CASES = 4


def served_cases() -> list[tuple[str, str]]:
    cases = tiny_models.reproduction_cases()
    chats = cases[: len(tiny_models.CHAT_TURNS)]
    lines = cases[len(tiny_models.CHAT_TURNS):]
    # spread over the corpus rather than its first entries
    return chats[:: max(1, len(chats) // CHAT_CASES)][:CHAT_CASES] + lines[:: max(1, len(lines) // LINE_CASES)][:LINE_CASES]


def generate(server, prompt: str, max_tokens: int) -> dict:
    body = {"text_input": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    req = urllib.request.Request(f"http://{server.endpoints.http}/v2/models/generate/generate",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_served_greedy_continues_corpus_prompts_exactly(precision, exported, session_workdir, tmp_path):
    exported(MODEL)
    if precision == "fp16":
        quantize_model(QuantizeConfig(model=MODEL, workdir=session_workdir, precision="fp16"))
    repo = write_repository(RepositoryConfig(model=MODEL, profile="edge", variant="python_ort", workdir=session_workdir,
                                             out=tmp_path / precision, onnx_variant=precision))
    tok = Tokenizer.from_file(str(repo.out / "generate/1/tokenizer/tokenizer.json"))
    eos = tok.token_to_id(tiny_models.EOS)
    cases = served_cases()
    assert len(cases) >= 8
    misses = []
    with TritonServer(ServerConfig(model_repository=repo.out)) as server:
        for prompt, cont in cases:
            want = tok.encode(cont).ids
            assert want[-1] == eos
            want = want[:-1]  # the end-of-text token ends the answer; it is not part of it
            reply = generate(server, prompt, len(want) + 8)
            ok = (reply["token_ids"] == want and reply["finish_reason"] == "eos"
                  and reply["text_output"] == tok.decode(want, skip_special_tokens=True))
            if not ok:
                misses.append((prompt, reply))
    assert misses == []
