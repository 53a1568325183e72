"""Structured output for the `generate` model: a grammar (JSON of any shape, a JSON schema, a regex, EBNF) enforced
token by token with xgrammar, the engine vLLM and TensorRT-LLM use.

`GuideFactory` compiles a request's grammar once (cached by its text) against the model's tokenizer; each
sequence gets its own `Guide` (an xgrammar matcher and its state). The scheduler asks `masks(guides, vocab)` for
the rows whose guide is active — one bitmask per row, filled by xgrammar's C++ matcher and unpacked in one numpy
operation over those rows — and sets every forbidden logit to -inf, so constrained and unconstrained rows share
the batch. Once the grammar is complete only end-of-sequence tokens are allowed.

R1 thinks first: when the prompt leaves a `<think>` block open (R1's chat template does), the guide starts
inactive — the reasoning is free — and the grammar applies from the token after `</think>`.

xgrammar (and the torch it imports) is loaded on the first guided request only, so a deployment that never sees
one pays nothing. Copied next to the generate model's model.py.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

GUIDE_TYPES = ("json_object", "json_schema", "regex", "ebnf")


class GuideError(ValueError):
    """The grammar is unusable (bad schema, bad regex): the request's error, one line."""


class Guide:
    """One sequence's grammar state. `active` is False while an open think block is being generated."""

    __slots__ = ("matcher", "active", "think_end", "vocab")

    def __init__(self, matcher, active: bool, think_end: int | None, vocab: int):
        self.matcher, self.active, self.think_end, self.vocab = matcher, active, think_end, vocab

    def accept(self, token: int) -> None:
        if not self.active:
            if token == self.think_end:
                self.active = True
            return
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    @staticmethod
    def masks(guides: list[Guide], vocab: int) -> np.ndarray:
        return masks(guides, vocab)

    def copy(self) -> Guide:
        return Guide(self.matcher.fork(), self.active, self.think_end, self.vocab)


class GuideFactory:
    def __init__(self, tokenizer_json: str, stop_ids: list[int], think_start: int | None, think_end: int | None,
                 cache_size: int = 64):
        self.tokenizer_json, self.stop_ids = tokenizer_json, sorted(stop_ids)
        self.think_start, self.think_end = think_start, think_end
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()
        self._compiler = None

    def _load(self):
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=self.tokenizer_json)
            info = xgr.TokenizerInfo.from_huggingface(tok, stop_token_ids=self.stop_ids)
            self._xgr, self._vocab = xgr, info.vocab_size
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def compile(self, kind: str, guide: str):
        if kind not in GUIDE_TYPES:
            raise GuideError(f"guided_decoding_guide_type must be one of {', '.join(GUIDE_TYPES)}, got {kind!r}")
        if kind != "json_object" and not guide.strip():
            raise GuideError(f"guided_decoding_guide is empty (a {kind} needs its text)")
        key = (kind, guide)
        with self.lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                return hit
            compiler = self._load()
            try:
                if kind == "json_object":
                    grammar = compiler.compile_builtin_json_grammar()
                elif kind == "json_schema":
                    # no free whitespace between tokens: a small model would otherwise fill max_tokens with it
                    grammar = compiler.compile_json_schema(guide, any_whitespace=False, strict_mode=True)
                elif kind == "regex":
                    grammar = compiler.compile_regex(guide)
                else:
                    grammar = compiler.compile_grammar(guide)
            except Exception as exc:  # noqa: BLE001 — xgrammar raises several kinds; all mean a bad guide
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise GuideError(f"guided_decoding_guide ({kind}) is not usable: {first}") from None
            self.cache[key] = grammar
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
            return grammar

    def guide(self, kind: str, guide: str, prompt_ids: list[int]) -> Guide:
        """A fresh guide for a sequence with this prompt: inactive when the prompt leaves a think block open."""
        grammar = self.compile(kind, guide)
        open_think = False
        if self.think_start is not None and self.think_end is not None:
            for t in reversed(prompt_ids):
                if t == self.think_end:
                    break
                if t == self.think_start:
                    open_think = True
                    break
        return Guide(self._xgr.GrammarMatcher(grammar), not open_think, self.think_end, self._vocab)


_BATCH = []  # one xgrammar BatchGrammarMatcher, made on first use


def masks(guides: list[Guide], vocab: int) -> np.ndarray:
    """[len(guides), vocab] bool: the tokens each (active) guide allows next. The bitmasks of every row are filled
    in one call (xgrammar's batch matcher, on its own threads), not one Python call per row."""
    if not _BATCH:
        import xgrammar as xgr

        _BATCH.append(xgr.BatchGrammarMatcher(max_threads="auto"))
    known = guides[0].vocab  # the tokenizer's: every guide comes from the one factory of this model
    bitmask = np.full((len(guides), (known + 31) // 32), -1, np.int32)  # every bit set: all allowed
    # a finished grammar (only with ignore_eos) constrains nothing more
    live = [i for i, g in enumerate(guides) if not g.matcher.is_terminated()]
    if live:
        _BATCH[0].batch_fill_next_token_bitmask([guides[i].matcher for i in live], bitmask, indices=live)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    if allowed.shape[1] < vocab:  # logits past the tokenizer's vocabulary (padding rows of the embedding): never
        allowed = np.pad(allowed, ((0, 0), (0, vocab - allowed.shape[1])))
    return allowed
