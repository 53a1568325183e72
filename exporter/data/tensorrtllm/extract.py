"""Regenerates backend_templates.json from a clone of triton-inference-server/tensorrtllm_backend (not run by the
tool or the tests: the JSON is committed, SOURCE.md says from which commit).

    python3 exporter/data/tensorrtllm/extract.py /path/to/tensorrtllm_backend.git c2e65b88d85255be30cf50440a91662abeb497dd

It reads, at that commit, each all_models/inflight_batcher_llm/<model>/config.pbtxt template and
docs/model_config.md, and records per model: the tensors (name, type, dims, optional), the `parameters` keys and
which `${variable}` fills each, where every unquoted `${variable}` lands in the config, and the variables the
backend's documentation lists as *Mandatory parameters*. The template is parsed as a Triton ModelConfig after
its unquoted placeholders are replaced by typed stand-ins, so the catalogue is what Triton would read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")
# The field an unquoted placeholder sits in → where it lands in a ModelConfig.
FIELD_PATHS = {
    "max_batch_size": "max_batch_size",
    "decoupled": "model_transaction_policy.decoupled",
    "preferred_batch_size": "dynamic_batching.preferred_batch_size",
    "max_queue_delay_microseconds": "dynamic_batching.max_queue_delay_microseconds",
    "max_queue_size": "dynamic_batching.default_queue_policy.max_queue_size",
    "count": "instance_group.count",
    "backend": "backend",
}
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def _git_show(repo: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _mandatory(doc: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for section in re.split(r"^### ", doc, flags=re.M)[1:]:
        name = section.split(" model", 1)[0].strip()
        if name not in MODELS or "*Mandatory parameters*" not in section:
            continue
        table = section.split("*Mandatory parameters*", 1)[1].split("*Optional parameters*", 1)[0]
        out[name] = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    return out


def _locations(text: str) -> dict[str, list[str]]:
    """Unquoted placeholders: variable → the config paths it fills."""
    found: dict[str, list[str]] = {}
    tensor = None
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = re.search(r'name:\s*"(\w+)"', line)
        if m:
            tensor = m.group(1)
        for m in re.finditer(r"(\w+)\s*:\s*\[?\s*\$\{(\w+)\}", line):
            field, var = m.groups()
            path = f"tensor[{tensor}].data_type" if field == "data_type" else FIELD_PATHS.get(field, field)
            found.setdefault(var, [])
            if path not in found[var]:
                found[var].append(path)
        m = re.search(r'backend:\s*"\$\{(\w+)\}"', line)
        if m:
            found.setdefault(m.group(1), ["backend"])
    return found


def _stand_in(text: str) -> str:
    text = re.sub(r"data_type:\s*\$\{\w+\}", "data_type: TYPE_FP32", text)
    text = re.sub(r"decoupled:\s*\$\{\w+\}", "decoupled: true", text)
    return re.sub(r"(?<!\")\$\{\w+\}(?!\")", "1", text)


def extract(repo: str, commit: str) -> dict:
    doc = _git_show(repo, commit, "docs/model_config.md")
    mandatory = _mandatory(doc)
    models = {}
    for name in MODELS:
        path = f"all_models/inflight_batcher_llm/{name}/config.pbtxt"
        text = _git_show(repo, commit, path)
        config = text_format.Parse(_stand_in(text), mc.ModelConfig())
        tensors = lambda items: [  # noqa: E731
            {"name": t.name, "data_type": mc.DataType.Name(t.data_type), "dims": list(t.dims),
             **({"reshape": list(t.reshape.shape)} if t.HasField("reshape") else {}),
             **({"optional": True} if getattr(t, "optional", False) else {}),
             **({"allow_ragged_batch": True} if getattr(t, "allow_ragged_batch", False) else {})}
            for t in items
        ]
        params = {k: _PLACEHOLDER.fullmatch(v.string_value).group(1) if _PLACEHOLDER.fullmatch(v.string_value)
                  else v.string_value for k, v in sorted(config.parameters.items())}
        entry = {
            "template": path,
            "backend": config.backend, "platform": config.platform,
            "placeholders": sorted(set(_PLACEHOLDER.findall("\n".join(
                ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))))),
            "mandatory": mandatory.get(name, []),
            "locations": _locations(text),
            "parameters": params,
            "input": tensors(config.input),
            "output": tensors(config.output),
        }
        # what is left of the config once tensors, parameters and steps are taken out: batching, instance
        # groups, transaction policy (unquoted placeholders hold stand-ins here; `locations` says which)
        skeleton = mc.ModelConfig()
        skeleton.CopyFrom(config)
        for key in ("input", "output", "parameters", "ensemble_scheduling", "name"):
            skeleton.ClearField(key)
        entry["skeleton"] = json_format.MessageToDict(skeleton, preserving_proto_field_name=True)
        entry["has_dynamic_batching"] = config.HasField("dynamic_batching")
        if name == "ensemble":
            entry["steps"] = [json_format.MessageToDict(s, preserving_proto_field_name=True)
                              for s in config.ensemble_scheduling.step]
        models[name] = entry
    return {
        "source": {"repository": "triton-inference-server/tensorrtllm_backend", "commit": commit,
                   "documentation": "docs/model_config.md"},
        "models": models,
    }


if __name__ == "__main__":
    data = extract(sys.argv[1], sys.argv[2])
    out = Path(__file__).with_name("backend_templates.json")
    out.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(f"wrote {out}")
