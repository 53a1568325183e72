"""Special tokens out of the text the client reads, as the text streams in.

For the reasoning split the gateway asks `generate` for `skip_special_tokens=false` (so that `</think>` stays in the
text, reasoning.py), and then every special token it generates is in the text too — under `ignore_eos`, the
end-of-sentence tokens the model goes on past. `SpecialTokenFilter` removes the tokenizer's special tokens except
the ones kept (the think tags, which the splitter consumes; the tool-call tags, which the tool parser reads),
holding back a tail that could begin one, as the splitter does for its tags."""

from __future__ import annotations

from collections.abc import Iterable


class SpecialTokenFilter:
    def __init__(self, specials: Iterable[str]):
        self.specials = sorted({s for s in specials if s}, key=len, reverse=True)  # longest first: no prefix wins
        self.held = ""

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a special token."""
        for k in range(min(len(text), max((len(s) for s in self.specials), default=1) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) and s != tail for s in self.specials):
                return k
        return 0

    def feed(self, text: str) -> str:
        if not self.specials:
            return text
        buf = self.held + text
        for s in self.specials:
            if s in buf:
                buf = buf.replace(s, "")
        keep = self._held_tail(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        held, self.held = self.held, ""
        return held
