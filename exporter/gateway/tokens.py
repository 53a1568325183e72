"""vLLM's `POST /tokenize` and `POST /detokenize`: the served model's tokenizer (and chat template) as the model
sees its prompt — for clients that count tokens or build prompts, and to see what a chat becomes."""

from __future__ import annotations

from .errors import ApiError
from .fields import DETOKENIZE, TOKENIZE, check_fields
from .messages import parse_messages
from .tools import parse_tools, render_prompt


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    return default if value is None else value  # the JSON type is checked by the registry


def _model(body: dict, llms: dict, embedders: dict):
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise ApiError(400, "model is required (GET /v1/models lists them)", "model")
    if model_id in llms:
        m = llms[model_id]
        return m, m.tokenizer, m.limits.max_sequence_len
    if model_id in embedders:
        m = embedders[model_id]
        return m, m.tokenizer, m.max_length
    raise ApiError(404, f"The model `{model_id}` does not exist", "model", "model_not_found")


def tokenize(body: dict, llms: dict, embedders: dict) -> dict:
    check_fields(body, TOKENIZE)
    model, tok, max_len = _model(body, llms, embedders)
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise ApiError(400, "give prompt or messages (one of them)", "prompt" if has_prompt else "messages")
    if has_messages:
        if model not in llms.values():
            raise ApiError(400, "messages: this model has no chat template (give prompt)", "messages")
        from .chat import TemplateRejected

        try:
            text = render_prompt(model.template, parse_messages(body), parse_tools(body),
                                 _flag(body, "add_generation_prompt", True))
        except TemplateRejected as exc:
            raise ApiError(400, str(exc), "messages") from None
    else:
        if body.get("tools") is not None:
            raise ApiError(400, "tools go with messages", "tools")
        text = body["prompt"]
    ids = tok.encode(text, add_special_tokens=_flag(body, "add_special_tokens", True)).ids
    strs = [tok.id_to_token(i) for i in ids] if _flag(body, "return_token_strs", False) else None
    return {"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": strs}


def detokenize(body: dict, llms: dict, embedders: dict) -> dict:
    check_fields(body, DETOKENIZE)
    _, tok, _ = _model(body, llms, embedders)
    ids = body.get("tokens")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ApiError(400, "tokens must be a list of token ids", "tokens")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens")
    return {"prompt": tok.decode(ids, skip_special_tokens=False)}
