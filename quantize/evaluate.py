"""Running exported graphs in ONNX Runtime (CPU) on real text: calibration activations and accuracy vs FP32.

Text is tokenized with the model's own tokenizer (`<workdir>/<model>/tokenizer`). Decoders run with an empty KV
cache (past length 0: the prefill path) on right-padded batches; padded positions are excluded.

Metrics, all against the FP32 graph, on `sentences.EVALUATION` (held-out text: the gate reads these) and, for the
embedded trained preset, on its training corpus and on in-domain text it never saw (`exporter.tiny_corpus`):

* decoders — `logits_cosine`: mean cosine similarity of the logit vectors per token; `top1_agreement`:
  fraction of tokens whose arg-max token is the same; `perplexity`: exp of the mean cross-entropy of the next
  token OF THE TEXT (real text perplexity; `perplexity_fp32` the FP32 model's), `perplexity_delta` = perplexity −
  perplexity_fp32 (negative when the candidate happens to predict this text better); `kl_divergence`: mean
  KL(FP32 ‖ candidate) of the next-token distributions in nats (0 only when they agree; it does not depend on
  the text being likely, so it separates methods even where perplexity is huge, e.g. a tiny model on text it
  never saw).
* encoders — `embedding_cosine`: mean cosine of the sentence embeddings; `spearman`: rank correlation between
  the FP32 and quantized pairwise-similarity matrices (upper triangle), i.e. whether retrieval order holds.

The gate reads `cosine` (logits or embedding cosine) and `top1` (decoders only).

Blocked DequantizeLinear → MatMul is fused by ONNX Runtime into MatMulNBits with 8-bit activations by default;
`session.qdq_matmulnbits_accuracy_level=0` keeps activations FP32 so the figures measure weight quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from exporter.core.errors import BadInput, StageFailed, first_line

ORT_SESSION_CONFIG = {
    "session.qdq_matmulnbits_accuracy_level": "0",
    # Idle ORT threads spin for a while after each run and starve the numpy quantization that follows.
    "session.intra_op.allow_spinning": "0",
}


# A graph larger than this is saved (stage._save) and handed to ONNX Runtime (`session`) as a file with external
# data: protobuf cannot serialise a model over 2 GiB in one file, and ONNX Runtime refuses bytes past 2^31
# ("narrowing_error": met on a 2-layer slice of R1-Distill-Qwen-1.5B, a 2.3 GB FP32 graph).
EXTERNAL_DATA_BYTES = 1800 << 20


def session(model: onnx.ModelProto | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in ORT_SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    try:
        if isinstance(model, Path):
            return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        if model.ByteSize() <= EXTERNAL_DATA_BYTES:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        import tempfile

        with tempfile.TemporaryDirectory(prefix="r1deploy-session-") as tmp:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # save_model moves the tensors' bytes out of the proto it is given
            onnx.save_model(copy, f"{tmp}/model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            del copy
            # the session holds (or maps) the weights once created: the files may go
            return ort.InferenceSession(f"{tmp}/model.onnx", opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for graphs it cannot load
        first = first_line(exc)
        raise StageFailed(f"ONNX Runtime cannot load the quantized graph: {first}") from exc


@dataclass
class TextBatch:
    """Tokenized sentences as graph feeds (FP32 dtypes; cast per session) and which positions are real."""

    feeds: dict[str, np.ndarray]
    mask: np.ndarray  # [batch, seq] bool


def _encode(tokenizer_dir: Path, sentences: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """ids and attention mask, right-padded. tokenizer.json (every fast tokenizer has one) is read with the
    `tokenizers` library directly — the same backend transformers uses, without its seconds of import time.
    Pad ids are never attended to nor scored, so the pad value does not matter."""
    if (tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        encs = tok.encode_batch(list(sentences))
        width = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), width), np.int64)
        mask = np.zeros((len(encs), width), np.int64)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if hf.pad_token is None:
        hf.pad_token = hf.eos_token
    hf.padding_side = "right"
    enc = hf(list(sentences), padding=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def tokenize(tokenizer_dir: Path, sentences: tuple[str, ...], export_report: dict) -> TextBatch:
    if not tokenizer_dir.is_dir():
        raise BadInput(f"no tokenizer at {tokenizer_dir}: re-run `r1deploy export --model {export_report['model']} --force`")
    ids, mask = _encode(tokenizer_dir, sentences)
    names = export_report["input_names"]
    feeds = {"input_ids": ids, "attention_mask": mask}
    if export_report.get("graph") == "fused":
        feeds.update(fused_feeds(mask, export_report["cache"]))
    elif export_report["kind"] == "decoder":
        feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        cache = export_report["cache"]
        for i in range(cache["num_layers"]):
            for slot, (heads, dim) in (("key", cache["key_shape"]), ("value", cache["value_shape"])):
                feeds[f"past_key_values.{i}.{slot}"] = np.zeros((ids.shape[0], heads, 0, dim), np.float32)
    elif "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids)  # single-segment sentences
    return TextBatch({k: v for k, v in feeds.items() if k in names}, mask.astype(bool))


def fused_feeds(mask: np.ndarray, cache: dict) -> dict[str, np.ndarray]:
    """The fused graph's length inputs for right-padded text (exporter.fused_graph): each row is a first prompt
    of its own length with an empty cache of the batch's width, and logits are asked for at every position, so
    the figures cover the same tokens as the generic graph's."""
    batch, width = mask.shape
    lengths = mask.sum(axis=1).astype(np.int32)
    feeds = {
        "seqlens_k": lengths - 1,
        "query_seqlens": lengths,
        "total_sequence_length": np.array(width, np.int32),
        "logits_index": np.broadcast_to(np.arange(width, dtype=np.int64), (batch, width)).copy(),
    }
    for i in range(cache["num_layers"]):
        for slot, (heads, dim) in (("key", cache["key_shape"]), ("value", cache["value_shape"])):
            feeds[f"past_key_values.{i}.{slot}"] = np.zeros((batch, heads, width, dim), np.float32)
    return feeds


def run(sess, batch: TextBatch, outputs: list[str], extra: Optional[dict[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
    types = {i.name: i.type for i in sess.get_inputs()}
    feeds = {
        k: (v.astype(np.float16) if types.get(k) == "tensor(float16)" else v) for k, v in batch.feeds.items()
    }
    feeds.update(extra or {})
    # FP16 graphs may return FP16: compare everything in FP32.
    return {n: np.asarray(v, dtype=np.float32) for n, v in zip(outputs, sess.run(outputs, feeds), strict=True)}


def capture_activations(model: onnx.ModelProto, batch: TextBatch, tensors: list[str]) -> dict[str, np.ndarray]:
    """Values of intermediate tensors, exposed as extra graph outputs, flattened to [rows, features] over real
    (unpadded) tokens when they carry the batch and sequence axes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            probe.graph.output[-1].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    values = run(session(probe), batch, tensors)
    rows = batch.mask.reshape(-1)
    out = {}
    for name, v in values.items():
        if v.ndim == 3 and v.shape[:2] == batch.mask.shape:
            out[name] = v.reshape(-1, v.shape[-1])[rows]
        else:  # e.g. routed-token activations [tokens·top_k, K, 1]: no padding axis to drop
            out[name] = v.reshape(-1, v.shape[-2] if v.shape[-1] == 1 else v.shape[-1])
    return out


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(denom, 1e-30)


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties are vanishingly rare for float similarities, so ordinal ranks suffice)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


COMPARE_ROWS = 128  # token positions compared at a time (a 152 k vocabulary: ~150 MB per float64 array)


class DecoderMetrics:
    """The decoder figures, accumulated over chunks of token positions: each figure is a function of one
    position's logits (and its next token), so chunks give the same result as all positions at once, without
    [positions, vocab] float64 temporaries (9 GiB and more at R1-Distill's 152 k vocabulary). Used by `Reference`
    (ONNX Runtime outputs) and by the streaming builder's layer-by-layer evaluation (exporter.stream_build)."""

    def __init__(self) -> None:
        self.parts: list[list[np.ndarray]] = [[], [], [], [], []]

    def add(self, ref: np.ndarray, got: np.ndarray, targets: np.ndarray, scored: np.ndarray) -> None:
        """`ref`, `got`: [n, vocab] logits of n real positions; `targets`: the next token of each; `scored`: whether
        that next token is real text (the last position of a text has none)."""
        lp_ref, lp_got = _log_softmax(ref), _log_softmax(got)
        target = targets[scored]
        for out, value in zip(self.parts, (
            _cosine_rows(ref, got),
            (np.exp(lp_ref) * (lp_ref - lp_got)).sum(-1),
            ref.argmax(-1) == got.argmax(-1),
            -lp_ref[scored][np.arange(len(target)), target],
            -lp_got[scored][np.arange(len(target)), target],
        ), strict=True):
            out.append(value)

    def result(self) -> dict[str, float]:
        cos, kl, agree, nll_ref, nll_got = (np.concatenate(p) for p in self.parts)
        ppl_ref, ppl_got = float(np.exp(nll_ref.mean())), float(np.exp(nll_got.mean()))
        return {
            "cosine": float(cos.mean()),
            "logits_cosine": float(cos.mean()),
            "logits_cosine_min": float(cos.min()),
            "top1": float(agree.mean()),
            "top1_agreement": float(agree.mean()),
            "perplexity_fp32": ppl_ref,
            "perplexity": ppl_got,
            "perplexity_delta": ppl_got - ppl_ref,
            "kl_divergence": float(kl.mean()),
            "tokens": int(len(cos)),
        }


@dataclass
class Reference:
    """FP32 outputs on the evaluation text, computed once and compared with every candidate."""

    kind: str
    batch: TextBatch
    output: str  # logits | embeddings
    values: np.ndarray

    def _decoder_metrics(self, candidate: np.ndarray) -> dict[str, float]:
        """Over every real token position, in row-major order: logits cosine, KL(FP32 ‖ candidate), top-1
        agreement, and the negative log-likelihood of the next token under each where the next position is real
        text too (right padding); COMPARE_ROWS positions at a time."""
        mask, ids = self.batch.mask, self.batch.feeds["input_ids"]
        rows, cols = np.nonzero(mask)
        nxt = np.minimum(cols + 1, mask.shape[1] - 1)
        scored = (cols + 1 < mask.shape[1]) & mask[rows, nxt]
        targets = ids[rows, nxt]
        metrics = DecoderMetrics()
        for start in range(0, len(rows), COMPARE_ROWS):
            at = slice(start, start + COMPARE_ROWS)
            metrics.add(self.values[rows[at], cols[at]], candidate[rows[at], cols[at]], targets[at], scored[at])
        return metrics.result()

    def compare(self, candidate: np.ndarray) -> dict[str, float]:
        if self.kind == "decoder":
            return self._decoder_metrics(candidate)
        cos = _cosine_rows(self.values, candidate)
        iu = np.triu_indices(len(self.values), k=1)
        sim_ref = (self.values @ self.values.T)[iu]
        sim_got = (candidate @ candidate.T)[iu]
        return {
            "cosine": float(cos.mean()),
            "embedding_cosine": float(cos.mean()),
            "embedding_cosine_min": float(cos.min()),
            "spearman": spearman(sim_ref, sim_got),
            "sentences": int(len(self.values)),
        }


def reference(model: onnx.ModelProto | Path, batch: TextBatch, kind: str, sess=None) -> Reference:
    output = "logits" if kind == "decoder" else "embeddings"
    values = run(sess or session(model), batch, [output])[output]
    return Reference(kind, batch, output, values)


def measure(ref: Reference, model: onnx.ModelProto | Path, sess=None, extra: Optional[dict] = None) -> dict[str, float]:
    sess = sess or session(model)
    return ref.compare(run(sess, ref.batch, [ref.output], extra)[ref.output])
