"""The whole-model stages refuse, before loading, a model this machine cannot hold (exporter/core/memory.py).

The big inputs here are real files of the real sizes — an R1-Distill-Qwen-7B-shaped BF16 safetensors checkpoint
(the tensor names and shapes transformers' model has, 15 GB) and a 30 GB FP32 export — written sparse, so they cost no disk: the
stages read only their headers and sizes before refusing. Each test skips on a machine with enough memory to
hold the model, where refusing would be wrong."""

from __future__ import annotations

import json
import struct

import onnx
import pytest
from conftest import assert_one_line, copy_workdir

from exporter.core import memory
from exporter.plan import builtin_shapes


def _tensors(config: dict) -> dict[str, list[int]]:
    """The checkpoint tensors transformers' own model has for `config` (built on the meta device: no memory), as
    benchmarks/real_size.py writes its checkpoints."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **cfg))
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def _sparse_checkpoint(path, config: dict) -> int:
    """A BF16 safetensors checkpoint of `config`'s tensors whose data is a hole; returns its parameter count."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    header, offset, params = {}, 0, 0
    for name, shape in _tensors(config).items():
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
        params += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)  # sparse: no data blocks written
    return params


def test_export_refuses_a_7b_checkpoint_before_loading_it(r1, tmp_path):
    config = builtin_shapes()["r1-distill-qwen-7b"]["config"]
    params = _sparse_checkpoint(tmp_path / "qwen7b", config)
    assert 7.5e9 < params < 7.7e9  # R1-Distill-Qwen-7B's 7.6 B: the shapes are the real ones
    need = memory.MemoryNeed.of("export", 4 * params, memory.EXPORT_PEAK_PER_FP32_BYTE).need
    available = memory.available_bytes()
    if available is None or available >= need:
        pytest.skip(f"this machine has {available} bytes available, enough for the 7B export's {need}")
    workdir = tmp_path / "w"
    line = assert_one_line(r1("--workdir", str(workdir), "export", "--model", str(tmp_path / "qwen7b")), 1,
                           "needs about")
    assert f"{need / memory.GIB:.1f} GiB" in line and "stream-build" in line and "--no-memory-check" in line, line
    assert not (workdir / "qwen7b").exists(), "nothing written for a stage that did not start"


def test_quantize_refuses_an_export_too_big_for_this_machine(r1, tmp_path, exported, session_workdir):
    """A real tiny export whose weights are moved to model.onnx.data, which is then extended (sparse) to 30 GB: the
    stage sizes what it would load from the files, as it does for a real 7B export."""
    exported("r1-distill-tiny")
    wd = copy_workdir(session_workdir, tmp_path / "w", "r1-distill-tiny")
    onnx_dir = wd / "r1-distill-tiny" / "onnx" / "fp32"
    model = onnx.load(str(onnx_dir / "model.onnx"))
    onnx.save(model, str(onnx_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    with open(onnx_dir / "model.onnx.data", "r+b") as fh:
        fh.truncate(30 * memory.GIB)
    need = memory.MemoryNeed.of("quantize", 30 * memory.GIB, memory.QUANTIZE_INT4_PEAK_PER_FP32_BYTE).need
    available = memory.available_bytes()
    if available is None or available >= need:
        pytest.skip(f"this machine has {available} bytes available, enough for the {need} bytes quantizing needs")
    before = sorted(p.name for p in (wd / "r1-distill-tiny" / "onnx").iterdir())  # the session's own variants
    proc = r1("--workdir", str(wd), "quantize", "--model", "r1-distill-tiny", "--precision", "int4", "--block-size", "64",
              "--force")
    line = assert_one_line(proc, 1, "needs about")
    assert "quantize --graph fused" in line, line
    after = sorted(p.name for p in (wd / "r1-distill-tiny" / "onnx").iterdir())
    assert after == before, "nothing written for a stage that did not start"


def test_available_memory_is_capped_by_the_cgroup_limit(tmp_path):
    """The kernel's and the cgroup's own file formats (v2 and v1), written as they appear, each read the way a
    container sees its limit."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683772 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n")
    none = tmp_path / "none"
    none.mkdir()
    assert memory.available_bytes(meminfo, none) == 20000000 * 1024

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8589934592\n")
    (v2 / "memory.current").write_text("3221225472\n")
    (v2 / "memory.stat").write_text("anon 1073741824\ninactive_file 1073741824\nactive_file 5\n")
    assert memory.cgroup_available(v2) == 8 * memory.GIB - 2 * memory.GIB  # 8 GiB limit, 3 used of which 1 is cache
    assert memory.available_bytes(meminfo, v2) == 6 * memory.GIB  # below MemAvailable's 19 GiB
    (v2 / "memory.max").write_text("max\n")
    assert memory.cgroup_available(v2) is None
    assert memory.available_bytes(meminfo, v2) == 20000000 * 1024

    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit, as v1 writes it
    (v1 / "memory.usage_in_bytes").write_text("6663135232\n")
    assert memory.cgroup_available(tmp_path / "v1") is None
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * memory.GIB}\n")
    (v1 / "memory.stat").write_text(f"cache 10\ntotal_inactive_file {memory.GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{5 * memory.GIB}\n")  # over the limit counting the cache
    assert memory.cgroup_available(tmp_path / "v1") == 0
