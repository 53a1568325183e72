"""Repository stage: a Triton model repository for one model under one deployment profile.

    from exporter.repository import RepositoryConfig, write_repository
    result = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort"))

Layout — one repository per (model, deployment profile), so all profiles coexist::

    <workdir>/<model>/model_repository/<profile>/     default `--out`
    model_repository/<profile>/                        committed copy for r1-distill-tiny (text files only)

An LLM (decoder) repository::

    generate/config.pbtxt      entry point: python backend, decoupled, max_batch_size 0
    generate/1/model.py        tokenize → prefill → decode loop over the KV cache → sample → stream
    generate/1/tokenizer/      the model's tokenizer files (git-ignored in the committed copy)
    generate/1/model.plan      a TensorRT-RTX plan (edge) that generate runs in-process: then no llm model
    llm/config.pbtxt           the engine model, one of three variants (the profile's serving_variant):
    llm/1/model.plan             tensorrt_plan     Triton's TensorRT backend (GPU)
    llm/1/model.onnx             onnxruntime_onnx  Triton's ONNX Runtime backend (GPU + TensorRT EP, or CPU)
    llm/1/model.py + model.onnx  python_ort        python backend running ONNX Runtime (CPU-only servers)

An encoder repository::

    embed/config.pbtxt         entry point: ensemble text → tokenizer → encoder → embeddings (response cache on)
    tokenizer/config.pbtxt, tokenizer/1/model.py, tokenizer/1/tokenizer/
    encoder/config.pbtxt, encoder/1/…   the engine model, same three variants

Every config.pbtxt is a `ModelConfig` protobuf message written with `text_format` (same inputs, same bytes)
and parsed back before the directory is renamed into place. Engine-model IO comes from the engine's
engine.json when a TensorRT engine is placed (and its max_batch_size caps the batcher), else from the ONNX
graph. The python models are real files in `exporter/repository/python_models/`, copied verbatim.
"""

from .configs import parse, render
from .writer import (
    EMBED,
    ENCODER,
    GENERATE,
    LLM,
    TOKENIZER,
    PlacedModel,
    RepositoryConfig,
    RepositoryResult,
    default_out,
    eos_token_ids,
    write_repository,
)

__all__ = [
    "EMBED",
    "ENCODER",
    "GENERATE",
    "LLM",
    "TOKENIZER",
    "PlacedModel",
    "RepositoryConfig",
    "RepositoryResult",
    "default_out",
    "eos_token_ids",
    "parse",
    "render",
    "write_repository",
]
