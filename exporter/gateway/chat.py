"""Chat messages → prompt text with the model's own chat template, rendered as transformers renders it: Jinja in an
ImmutableSandboxedEnvironment (a template is data from a checkpoint: it may not reach Python objects' internals
or mutate what it is given), trim_blocks/lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a
`tojson` that keeps non-ASCII text."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..core.errors import BadInput


class TemplateRejected(ValueError):
    """The template refused the messages (raise_exception) or failed on them: the client's fault (400)."""


def _raise(message: str):
    raise TemplateRejected(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str], where: str):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise BadInput(f"{where}: chat template does not compile: {exc.message} (line {exc.lineno})") from None
        self.special = special

    @classmethod
    def from_tokenizer_dir(cls, tokenizer_dir: Path, model: str) -> ChatTemplate:
        """The template from chat_template.jinja (transformers 5) or tokenizer_config.json's `chat_template`."""
        config = {}
        try:
            config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            pass
        source = None
        if (tokenizer_dir / "chat_template.jinja").is_file():
            source = (tokenizer_dir / "chat_template.jinja").read_text()
        elif isinstance(config.get("chat_template"), str):
            source = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):  # [{"name": "default", "template": ...}, …]
            named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
            source = named.get("default")
        if not source:
            raise BadInput(f"model {model}: no chat template in {tokenizer_dir} (use /v1/completions)")

        def token(key: str) -> str:
            value = config.get(key)
            if isinstance(value, dict):  # an AddedToken as a dict
                value = value.get("content")
            return value if isinstance(value, str) else ""

        special = {k: token(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(source, special, str(tokenizer_dir))

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        import jinja2

        extra = {"tools": tools} if tools else {}  # as transformers: `tools` undefined when there are none
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra,
                                        **self.special)
        except TemplateRejected:
            raise
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateRejected(f"chat template refused: {exc}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise TemplateRejected(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from None
