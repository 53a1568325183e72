"""DeepSeek-R1's reasoning, split from the answer as the text streams in.

R1's chat template ends the prompt with `<think>\\n`, so the model usually generates only the closing `</think>`:
everything before `</think>` is reasoning, whether or not an opening `<think>` was generated, and a response that
never closes its thought is all reasoning (as vLLM's deepseek_r1 parser does).

`</think>` is a special token in R1's tokenizers, so text decoded with `skip_special_tokens` has lost it. Two ways
to find it, one per kind of `generate` model:
* text mode — the model takes `skip_special_tokens=false` (the contract's generate): the tags are in the text,
  and may be split across chunks (`</th` + `ink>`), so a tail that could begin a tag is held back;
* token mode — an older generate without that input: the tag is found by its token id in each chunk's
  `token_ids`; the chunk's text is cut where the text of the tokens after the tag begins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from .models import THINK_END, THINK_START


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ReasoningSplitter:
    """`feed(text, token_ids)` → (reasoning piece, content piece); `finish()` → what was held back."""

    def __init__(self, think_end_id: Optional[int] = None, decode: Optional[Callable[[list[int]], str]] = None):
        # token mode when given the id and a decode (skip_special_tokens=True, as the model decoded)
        self.think_end_id = think_end_id if decode is not None else None
        self.decode = decode
        self.reasoning = True
        self.started = False  # past a leading `<think>` (or sure there is none)
        self.held = ""

    def feed(self, text: str, token_ids: Optional[list[int]] = None) -> tuple[str, str]:
        if not self.reasoning:
            return "", text
        if self.think_end_id is not None:
            return self._feed_tokens(text, list(token_ids or []))
        return self._feed_text(text)

    def _feed_tokens(self, text: str, ids: list[int]) -> tuple[str, str]:
        if self.think_end_id not in ids:
            return text, ""
        self.reasoning = False
        k = ids.index(self.think_end_id)
        before, after = ids[:k], ids[k + 1 :]
        cut = len(text)
        if after:
            # the text of the tokens after the tag ends the chunk; failing that (a stop string cut it), the text
            # of the tokens before the tag begins it
            tail, head = self.decode(after), self.decode(before) if before else ""
            if tail and text.endswith(tail):
                cut = len(text) - len(tail)
            else:
                cut = len(head) if text.startswith(head) else 0
        return text[:cut], text[cut:]

    def _feed_text(self, text: str) -> tuple[str, str]:
        buf = self.held + text
        self.held = ""
        if not self.started:
            stripped = buf.lstrip()
            if stripped.startswith(THINK_START):
                buf = stripped[len(THINK_START):]
                self.started = True
            elif not stripped or THINK_START.startswith(stripped):
                self.held = buf  # only whitespace or the start of `<think>` so far: wait
                return "", ""
            else:
                self.started = True
        at = buf.find(THINK_END)
        if at >= 0:
            self.reasoning = False
            return buf[:at], buf[at + len(THINK_END):]
        keep = _held_prefix(buf, THINK_END)
        if keep:
            self.held = buf[-keep:]
            buf = buf[:-keep]
        return buf, ""

    def finish(self) -> tuple[str, str]:
        """The end of the text: a held tail was reasoning after all (the thought never closed)."""
        held, self.held = self.held, ""
        return (held, "") if self.reasoning else ("", held)


def split_whole(text: str, token_ids: Optional[list[int]] = None, think_end_id: Optional[int] = None,
                decode: Optional[Callable[[list[int]], str]] = None) -> tuple[str, str]:
    """(reasoning, content) of a whole completion."""
    s = ReasoningSplitter(think_end_id, decode)
    r1, c1 = s.feed(text, token_ids)
    r2, c2 = s.finish()
    return r1 + r2, c1 + c2
