"""The stages an engine is built from, run before it: export, then the deployment profile's quantization.

`r1deploy build-engine` (and `make build-engine`) run these by default, so a fresh clone gets an engine from a
checkpoint in one command. Each stage keeps its own content-hash cache (`manifest.json`), so when the ONNX is
already there and its inputs are unchanged this costs only the hashing, and the engine stage then finds its own
fingerprint unchanged too: a second run rebuilds nothing.

An existing export is redone with the options it was made with (read back from its manifest), not with the
defaults, so a model exported with e.g. `--exporter legacy` is a cache hit here rather than a silent re-export.
"""

from __future__ import annotations

import time

from .. import tiny_models
from ..core import artifacts
from ..core.profiles import Precision
from .builder import EngineConfig, UpstreamStage


def _recorded_export_options(layout: artifacts.ModelLayout) -> dict:
    """The ExportConfig fields an earlier export used (its manifest's config), or {} when there is none."""
    manifest = artifacts.read_manifest(layout.onnx_dir("fp32")) or {}
    recorded = manifest.get("config") or {}  # the export stage records its ExportConfig.fingerprint_config()
    keys = ("opset", "exporter", "external_data_threshold_mib", "verify", "tolerance")
    return {k: recorded[k] for k in keys if k in recorded}


def prepare_engine_inputs(cfg: EngineConfig, *, allow_pickle: bool = False,
                          trust_remote_code: bool = False) -> list[UpstreamStage]:
    """Export `cfg.model` and quantize it to the variant `cfg` builds, each skipped when up to date.

    `cfg.force` is not passed on: it rebuilds the engine, not the ONNX it is built from."""
    from quantize import QuantizeConfig, quantize_model

    from ..export import ExportConfig, export_model

    layout = artifacts.ModelLayout.for_model(cfg.workdir, cfg.model)
    t0 = time.perf_counter()
    exp = export_model(ExportConfig(model=cfg.model, workdir=cfg.workdir, allow_pickle=allow_pickle,
                                    trust_remote_code=trust_remote_code, **_recorded_export_options(layout)))
    done = [UpstreamStage("export", exp.skipped, exp.onnx_path, time.perf_counter() - t0)]
    if cfg.precision is not Precision.FP32:
        t0 = time.perf_counter()
        q = quantize_model(QuantizeConfig(model=cfg.model, workdir=cfg.workdir, profile=cfg.profile,
                                          precision=cfg.precision, extra_texts=tiny_models.quality_texts(cfg.model)))
        done.append(UpstreamStage(f"quantize {q.variant}", q.skipped, q.onnx_path, time.perf_counter() - t0))
    return done
