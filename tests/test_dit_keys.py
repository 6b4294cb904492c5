"""Full-size DiT on the meta device: upstream's parameter names/shapes and the LiveAvatar LoRA keys."""

import json
import re
from pathlib import Path

import pytest
from ckpt_fixtures.dit import one_torch_thread  # noqa: F401 (autouse)
from peft import LoraConfig, inject_adapter_in_model

from avatar.errors import WeightsError
from avatar.services.generator.lora import DEFAULT_TARGETS, PREFIX, plan_lora
from avatar.services.generator.weights import build_dit

KEYS = Path(__file__).parent / "data" / "keys"


def _manifest(name):
    return {n: (tuple(shape), dtype) for n, shape, dtype in json.loads((KEYS / name).read_text())}


def test_s2v_14b_meta_model_has_exactly_upstream_names_shapes_dtypes():
    model = build_dit("s2v-14b", device="meta")
    ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    upstream = _manifest("wan22_s2v_14b_dit.json")
    assert sorted(set(upstream) - set(ours)) == []
    assert sorted(set(ours) - set(upstream)) == []
    assert {k: v for k, v in ours.items() if v != upstream[k]} == {}
    assert sum(p.numel() for p in model.parameters()) == 16_295_755_609
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tiny_preset_has_the_same_structure_as_s2v_14b():
    def pattern(keys):
        return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}

    tiny = build_dit("tiny", device="meta").state_dict()
    full = _manifest("wan22_s2v_14b_dit.json")
    assert pattern(tiny) == pattern(full)


def test_liveavatar_lora_keys_apply_to_the_meta_model():
    model = build_dit("s2v-14b", device="meta")
    lora = _manifest("liveavatar_lora.json")
    plan = plan_lora(model, {k: s for k, (s, _) in lora.items()})
    assert (plan.rank, plan.alpha, plan.wrapped, len(plan.modules)) == (128, 64.0, 448, 448)
    assert plan.extra == {} and plan.ignored == []
    # The same through peft itself: the wrapped model's LoRA tensors are exactly the file's keys.
    inject_adapter_in_model(
        LoraConfig(r=128, lora_alpha=64, target_modules=list(DEFAULT_TARGETS)), model, low_cpu_mem_usage=True
    )
    wrapped = {PREFIX + k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items() if ".lora_" in k}
    assert wrapped == lora
    assert sum(1 for k in wrapped if k.startswith(PREFIX + "audio_injector.")) == 96  # easy to overlook


def test_lora_key_matching_no_layer_fails_naming_it():
    model = build_dit("s2v-14b", device="meta")
    lora = {k: s for k, (s, _) in _manifest("liveavatar_lora.json").items()}
    lora[PREFIX + "blocks.0.norm3.lora_A.default.weight"] = (128, 5120)
    lora[PREFIX + "blocks.0.norm3.lora_B.default.weight"] = (5120, 128)
    with pytest.raises(WeightsError, match=r"blocks\.0\.norm3\.lora_A"):
        plan_lora(model, lora)
    bad = {k: s for k, (s, _) in _manifest("liveavatar_lora.json").items()}
    bad[PREFIX + "blocks.3.ffn.0.lora_B.default.weight"] = (5120, 128)  # ffn.0 has out 13824
    with pytest.raises(WeightsError, match=r"shape mismatch.*blocks\.3\.ffn\.0.*\(13824, 128\)"):
        plan_lora(model, bad)
