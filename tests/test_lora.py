"""PEFT LoRA files on the tiny DiT: naming variants, merge == unmerged forward, clear failures."""

import json

import pytest
import torch
from ckpt_fixtures.dit import one_torch_thread, write_lora  # noqa: F401 (one_torch_thread: autouse)
from safetensors.torch import save_file

from avatar.errors import WeightsError
from avatar.services.generator.kv_cache import KVCache, KVCacheSpec
from avatar.services.generator.lora import load_lora, lora_layers
from avatar.services.generator.weights import random_dit


def _dit():
    return random_dit("tiny", "cpu", torch.float32, seed=11)


def _velocity(model):
    g = torch.Generator().manual_seed(0)
    h = w = 8
    kv = KVCache(KVCacheSpec.for_model(model, h, w, window_frames=3), torch.float32, "cpu")
    ctx = model.embed_text(torch.randn(1, 4, 32, generator=g))
    model.prefill_sink(torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 16, 19, h, w, generator=g), ctx, kv)
    audio = model.encode_audio(torch.randn(1, 5, 32, 12, generator=g))
    return model(torch.randn(1, 16, 3, h, w, generator=g), torch.tensor([700.0]), ctx, audio, kv, 0, 0, 30)


@pytest.mark.parametrize("prefix,segment", [(True, True), (False, True), (True, False)])
def test_lora_loads_changes_outputs_and_merged_equals_unmerged(tmp_path, prefix, segment):
    path = tmp_path / "lora.safetensors"
    write_lora(path, _dit(), rank=4, prefix=prefix, adapter_segment=segment)
    base = _velocity(_dit())

    unmerged = _dit()
    report = load_lora(unmerged, path, merge=False)
    assert report.matched == 104 and len(report.plan.modules) == report.plan.wrapped == 52
    assert len(lora_layers(unmerged)) == 52
    with_lora = _velocity(unmerged)
    assert (with_lora - base).abs().max() > 1e-3

    merged = _dit()
    assert load_lora(merged, path).merged and lora_layers(merged) == []
    assert isinstance(merged.audio_injector.injector[0].q, torch.nn.Linear)
    torch.testing.assert_close(_velocity(merged), with_lora, rtol=1e-4, atol=1e-4)

    report.handle.merge_adapter()  # merge in place, then take it back out: the base returns
    torch.testing.assert_close(_velocity(unmerged), with_lora, rtol=1e-4, atol=1e-4)
    report.handle.unmerge_adapter()
    report.handle.disable_adapter_layers()
    torch.testing.assert_close(_velocity(unmerged), base, rtol=1e-4, atol=1e-4)


def test_merged_weight_is_base_plus_scaled_product(tmp_path):
    path = tmp_path / "lora.safetensors"
    tensors = write_lora(path, _dit(), rank=4, prefix=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2.0}))
    model = _dit()
    report = load_lora(model, path)
    assert (report.plan.rank, report.plan.alpha) == (4, 2.0)
    a = tensors["base_model.model.blocks.1.ffn.2.lora_A.default.weight"]
    b = tensors["base_model.model.blocks.1.ffn.2.lora_B.default.weight"]
    expected = _dit().blocks[1].ffn[2].weight + 0.5 * b @ a
    torch.testing.assert_close(model.blocks[1].ffn[2].weight, expected)


def test_lora_key_matching_no_module_fails_and_leaves_the_model_alone(tmp_path):
    path = tmp_path / "lora.safetensors"
    tensors = write_lora(path, _dit(), rank=4)
    tensors["base_model.model.head.head.lora_A.default.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.head.head.lora_B.default.weight"] = torch.zeros(64, 4)
    save_file(tensors, str(path))
    model = _dit()
    with pytest.raises(WeightsError, match=r"1 LoRA key\(s\) match no .*head\.head\.lora_A"):
        load_lora(model, path)
    assert lora_layers(model) == []

    save_file({"blocks.0.norm3.weight": torch.ones(64)}, str(path))
    with pytest.raises(WeightsError, match="no LoRA tensors"):
        load_lora(model, path)


def test_base_tensors_in_a_lora_file_load_as_upstream_would(tmp_path):
    """Upstream loads the whole file non-strictly into the peft-wrapped model: tensors naming a
    parameter load (a wrapped layer's own weight only under its `.base_layer.` name)."""
    path = tmp_path / "lora.safetensors"
    tensors = write_lora(path, _dit(), rank=4)
    norm = torch.full((64,), 3.0)
    q_weight = torch.full((64, 64), 0.5)
    tensors.update(
        {
            "base_model.model.blocks.0.norm3.weight": norm,
            "base_model.model.blocks.0.self_attn.q.base_layer.weight": q_weight,
            "base_model.model.blocks.1.self_attn.q.weight": torch.zeros(64, 64),  # renamed under peft: skipped
            "base_model.model.no_such.weight": torch.zeros(3),
        }
    )
    save_file(tensors, str(path))
    model = _dit()
    report = load_lora(model, path, merge=False)
    assert sorted(report.plan.extra.values()) == ["blocks.0.norm3.weight", "blocks.0.self_attn.q.weight"]
    assert sorted(report.plan.ignored) == [
        "base_model.model.blocks.1.self_attn.q.weight",
        "base_model.model.no_such.weight",
    ]
    assert torch.equal(model.blocks[0].norm3.weight, norm)
    assert torch.equal(model.blocks[0].self_attn.q.base_layer.weight, q_weight)
    assert torch.equal(model.blocks[1].self_attn.q.base_layer.weight, _dit().blocks[1].self_attn.q.weight)
    assert "2 base tensors loaded" in report.describe() and "2 tensors ignored" in report.describe()
