"""Extraction's resource shape: one decoder layer at a time (calibrated), memory that does not grow with depth
(data-free), and the device option (the same code path as CUDA, run with device="cpu" here)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from peft_graft import GraftConfigError, extract_skillpack

from fine_tunes import save_pair

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_calibrated_extraction_holds_at_most_one_decoder_layer(tmp_path, monkeypatch):
    from peft_graft.extraction import calibration

    base_dir, tuned_dir = save_pair(tmp_path, "llama", model_overrides={"num_hidden_layers": 4})
    live_counts, loaded = [], []
    materialize = calibration.materialize

    def counting(layers, index, *args, **kwargs):
        materialize(layers, index, *args, **kwargs)
        loaded.append(index)
        live_counts.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers))

    monkeypatch.setattr(calibration, "materialize", counting)
    texts = ["The quick brown fox jumps over the lazy dog."] * 6
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", calibration=texts, batch_size=2, progress=False)
    assert loaded == [0, 1, 2, 3]  # every layer, once, in order
    assert max(live_counts) == 1  # never two decoder layers at a time, let alone the whole base
    assert report.calibrated and all(m.output_error is not None for m in report.modules if m.form == "lowrank")


def test_projections_fed_the_same_input_share_one_hessian():
    from peft_graft.extraction.calibration import _HessianCollector

    from fine_tunes import build

    layer = build("llama", num_hidden_layers=1).model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj"]
    names += ["mlp.up_proj", "mlp.down_proj"]
    modules = {name: layer.get_submodule(name) for name in names}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        module.register_forward_hook(
            lambda m, args, out, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, module in modules.items()
    ]
    collector = _HessianCollector(modules)
    hidden = torch.randn(2, 3, 5, 128, generator=torch.Generator().manual_seed(0))
    position = torch.arange(5)[None]
    rotary = build("llama", num_hidden_layers=1).model.rotary_emb
    with torch.no_grad(), collector:
        for batch in hidden:  # two batches: the shared Hessians accumulate once each
            layer(batch, position_embeddings=rotary(batch, position), attention_mask=None)
    for handle in handles:
        handle.remove()
    hessians = collector.hessians
    assert hessians["self_attn.q_proj"] is hessians["self_attn.k_proj"] is hessians["self_attn.v_proj"]
    assert hessians["mlp.gate_proj"] is hessians["mlp.up_proj"]
    assert len({id(h) for h in hessians.values()}) == 4  # qkv, o, gate/up, down
    for name in names:
        x = torch.cat(inputs[name])
        assert torch.allclose(hessians[name], x.T @ x, rtol=1e-4, atol=1e-4), name


def test_device_option_runs_the_device_code_path_with_the_same_result(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "gpt2")
    default = extract_skillpack(base_dir, tuned_dir, tmp_path / "default", budget=1 / 8, progress=False)
    explicit = extract_skillpack(base_dir, tuned_dir, tmp_path / "cpu", budget=1 / 8, device="cpu", progress=False)
    auto = extract_skillpack(base_dir, tuned_dir, tmp_path / "auto", budget=1 / 8, device="auto", progress=False)
    for name in ("adapter_model.safetensors",):
        reference = (tmp_path / "default" / name).read_bytes()
        assert (tmp_path / "cpu" / name).read_bytes() == reference
        if not torch.cuda.is_available():
            assert (tmp_path / "auto" / name).read_bytes() == reference
    assert default.settings["device"] == explicit.settings["device"] == "cpu"
    assert auto.settings["device"] in ("cpu", "cuda", "mps")
    with pytest.raises(GraftConfigError, match="device must be"):
        extract_skillpack(base_dir, tuned_dir, tmp_path / "bad", device="tpu:7", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(GraftConfigError, match="CUDA is not available"):
            extract_skillpack(base_dir, tuned_dir, tmp_path / "cuda", device="cuda", progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "cuda").exists()


@pytest.mark.parametrize("calibrated", [False, True])
def test_several_devices_share_the_modules_and_give_the_same_pack(tmp_path, monkeypatch, calibrated):
    from peft_graft.extraction.compressor import Compressor

    base_dir, tuned_dir = save_pair(tmp_path, "llama", model_overrides={"num_hidden_layers": 2})
    texts = ["The quick brown fox jumps over the lazy dog."] * 4 if calibrated else None
    settings = {"budget": 1 / 8, "calibration": texts, "batch_size": 2, "progress": False}
    one = extract_skillpack(base_dir, tuned_dir, tmp_path / "one", **settings)
    threads, compress = set(), Compressor.compress

    def recording(self, spec, hessian=None):
        threads.add(threading.current_thread().name)
        return compress(self, spec, hessian)

    monkeypatch.setattr(Compressor, "compress", recording)
    two = extract_skillpack(base_dir, tuned_dir, tmp_path / "two", devices="cpu, cpu", **settings)
    assert len({name for name in threads if name.startswith("peft-graft-device")}) == 2  # both devices worked
    assert (tmp_path / "two" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "one" / "adapter_model.safetensors"
    ).read_bytes()
    assert two.settings["devices"] == ["cpu", "cpu"] and "devices" not in one.settings
    assert two.modules == one.modules


def test_devices_are_checked_before_anything_is_written(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "gpt2")
    with pytest.raises(GraftConfigError, match="at least one device"):
        extract_skillpack(base_dir, tuned_dir, tmp_path / "empty", devices="cpu,", progress=False)
    with pytest.raises(GraftConfigError, match="device must be"):
        extract_skillpack(base_dir, tuned_dir, tmp_path / "bad", devices="cpu,tpu:1", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(GraftConfigError, match="CUDA is not available"):
            extract_skillpack(base_dir, tuned_dir, tmp_path / "cuda", devices="cuda:0,cuda:1", progress=False)
    assert not any((tmp_path / name).exists() for name in ("empty", "bad", "cuda"))


EXTRACT_AND_REPORT_PEAK = """
import sys
from peft_graft import extract_skillpack

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) here: imports are not extraction
before = status("VmRSS")
extract_skillpack(sys.argv[1], sys.argv[2], sys.argv[3], budget=1 / 16, progress=False)
print((status("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
def test_data_free_memory_does_not_grow_with_depth(tmp_path):
    """A 2-layer and a 12-layer model of the same widths: extraction's peak may grow by about one module pair (the
    allocator's slack), never by the 10 extra layers (about 170 MB in bf16, 340 MB in float32)."""
    widths = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 4, "num_key_value_heads": 2}
    # Large blocks straight from mmap, so that freed tensors leave RSS at once rather than as heap slack whose size
    # depends on allocation order (±20 MB from run to run otherwise).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    runs = {}
    for layers in (2, 12):  # both at once: each process measures only itself
        base_dir, tuned_dir = save_pair(
            tmp_path / str(layers), "llama", torch.bfloat16, model_overrides={**widths, "num_hidden_layers": layers}
        )
        command = [sys.executable, "-c", EXTRACT_AND_REPORT_PEAK, base_dir, tuned_dir, tmp_path / f"pack{layers}"]
        runs[layers] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks = {}
    for layers, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-2000:]
        peaks[layers] = int(stdout.strip().splitlines()[-1])
    largest_pair = 2 * 3072 * 768 * 4  # the largest module's base and fine-tune, read as float32
    growth = peaks[12] - peaks[2]
    assert peaks[2] > largest_pair  # the measurement sees extraction at all
    assert growth < 1.5 * largest_pair, (
        f"extraction's peak RSS grew by {growth / 2**20:.1f} MiB from 2 to 12 layers "
        f"({peaks[2] / 2**20:.0f} -> {peaks[12] / 2**20:.0f} MiB); one module pair is {largest_pair / 2**20:.1f} MiB"
    )
