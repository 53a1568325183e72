"""The exportable forms of a model: what the ONNX graph takes and returns.

Decoders are wrapped so the graph carries the KV cache as flat tensors — the form a server needs for both
prefill (past length 0) and decode (one new token, past > 0)::

    inputs : input_ids [batch, seq], attention_mask [batch, past+seq], position_ids [batch, seq],
             past_key_values.<i>.key / .value  [batch, heads, past, dim]
    outputs: logits [batch, seq, vocab], present.<i>.key / .value [batch, heads, past+seq, dim]

The cache tensor shapes are read from the model itself (one tiny forward pass), so any architecture whose
transformers cache is a list of (key, value) layers works — including DeepseekV3, whose MLA cache holds the
compressed latent ("key" [b, 1, past, kv_lora_rank]) and the rope key ("value" [b, 1, past, rope_dim]).

Encoders return the last hidden state and the mean-pooled, L2-normalised sentence embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sources import ModelKind


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    key_shape: tuple[int, int]  # (heads, dim) of one layer's "key" slot
    value_shape: tuple[int, int]

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def empty(self, batch: int, past: int, dtype=torch.float32) -> list[torch.Tensor]:
        out = []
        for _ in range(self.num_layers):
            out.append(torch.zeros(batch, self.key_shape[0], past, self.key_shape[1], dtype=dtype))
            out.append(torch.zeros(batch, self.value_shape[0], past, self.value_shape[1], dtype=dtype))
        return out


def cache_layout(model) -> CacheLayout:
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    k, v = layers[0].keys, layers[0].values
    return CacheLayout(len(layers), (k.shape[1], k.shape[3]), (v.shape[1], v.shape[3]))


class DecoderWithPast(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(list(zip(past[0::2], past[1::2], strict=True)), config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


class EncoderWithPooling(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return hidden, torch.nn.functional.normalize(pooled, p=2.0, dim=-1)


def encoder_input_names(model) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


def positions_from_mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Position ids of the last `seq` tokens, counting only attended positions (left padding safe)."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, -seq:]


@dataclass(frozen=True)
class ShapeCase:
    """One input shape used for verification (and, for decoders, the example for export)."""

    name: str
    batch: int
    seq: int
    past: int = 0
    left_pad: int = 0  # padding tokens at the start of row 0


def make_inputs(kind: ModelKind, case: ShapeCase, vocab: int, layout: CacheLayout | None, input_names: list[str], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (case.batch, case.seq), generator=g)
    total = case.past + case.seq
    mask = torch.ones(case.batch, total, dtype=torch.long)
    if case.left_pad:
        mask[0, : case.left_pad] = 0
    if kind is ModelKind.ENCODER:
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in input_names:
            feeds["token_type_ids"] = torch.zeros_like(ids)
        return feeds
    assert layout is not None
    past = [torch.randn(t.shape, generator=g) for t in layout.empty(case.batch, case.past)]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask, case.seq)}
    feeds.update(dict(zip(layout.names("past_key_values"), past, strict=True)))
    return feeds
