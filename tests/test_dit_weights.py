"""The DiT from a tiny checkpoint in the upstream layout: strict, lazy loading and clear errors."""

import json

import pytest
import torch
from ckpt_fixtures.dit import one_torch_thread, write_dit_checkpoint  # noqa: F401 (one_torch_thread: autouse)
from safetensors.torch import load_file, save_file

from avatar.checkpoints import DIT_INDEX as INDEX_NAME
from avatar.errors import WeightsError
from avatar.services.generator.kv_cache import KVCache, KVCacheSpec
from avatar.services.generator.weights import build_dit, load_dit, random_dit

SHARD2 = "diffusion_pytorch_model-00002-of-00002.safetensors"


@pytest.fixture
def ckpt(tmp_path):
    model = write_dit_checkpoint(tmp_path, seed=3)
    return tmp_path, model


def _run(model, seed=0):
    """Sink prefill + one block forward on a 64x64-pixel latent; returns the velocity."""
    g = torch.Generator().manual_seed(seed)
    h = w = 8
    kv = KVCache(KVCacheSpec.for_model(model, h, w, window_frames=6), model.dtype, "cpu")
    ctx = model.embed_text(torch.randn(1, 5, model.config.text_dim, generator=g))
    model.prefill_sink(torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 16, 19, h, w, generator=g), ctx, kv)
    audio = model.encode_audio(torch.randn(1, model.config.audio_layers, model.config.audio_dim, 12, generator=g))
    return model(torch.randn(1, 16, 3, h, w, generator=g), torch.tensor([900.0]), ctx, audio, kv, 0, 0, 34)


def test_tiny_checkpoint_in_upstream_layout_loads_strictly_and_runs(ckpt):
    folder, written = ckpt
    index = json.loads((folder / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert all(t.dtype == torch.bfloat16 for t in load_file(folder / SHARD2).values())
    model = load_dit(folder, device="cpu", dtype=torch.float32)
    assert model.dtype == torch.float32 and not any(p.device.type == "meta" for p in model.parameters())
    for name, tensor in written.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.to(torch.bfloat16).float()), name
    out = _run(model)
    assert out.shape == (1, 16, 3, 8, 8) and torch.isfinite(out).all() and out.abs().mean() > 0
    # the bf16-rounded copy computes what the original computes, up to that rounding
    ref = _run(written.to(torch.bfloat16).float())
    torch.testing.assert_close(out, ref)


def test_unknown_config_keys_are_ignored_unsupported_variants_fail(ckpt):
    folder, _ = ckpt
    cfg = json.loads((folder / "config.json").read_text())
    assert "motion_token_num" in cfg  # upstream key our constructor does not take
    load_dit(folder, dtype=torch.float32)
    (folder / "config.json").write_text(json.dumps({**cfg, "enable_motioner": True}))
    with pytest.raises(WeightsError, match="enable_motioner"):
        load_dit(folder)


def _rewrite_shard(folder, edit):
    tensors = load_file(folder / SHARD2)
    edit(tensors)
    save_file(tensors, str(folder / SHARD2))
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != SHARD2}
    index["weight_map"].update({k: SHARD2 for k in tensors})
    (folder / INDEX_NAME).write_text(json.dumps(index))


def test_missing_key_is_named(ckpt):
    folder, _ = ckpt
    victim = sorted(load_file(folder / SHARD2))[0]
    _rewrite_shard(folder, lambda t: t.pop(victim))
    with pytest.raises(WeightsError, match=rf"missing 1 tensor.*{victim}"):
        load_dit(folder)


def test_renamed_key_names_both_names_and_the_file(ckpt):
    folder, _ = ckpt
    victim = sorted(load_file(folder / SHARD2))[-1]
    _rewrite_shard(folder, lambda t: t.__setitem__("renamed." + victim, t.pop(victim)))
    with pytest.raises(WeightsError) as err:
        load_dit(folder)
    msg = str(err.value)
    assert f"missing 1 tensor(s): {victim}" in msg and f"renamed.{victim}" in msg and SHARD2 in msg


def test_shape_mismatch_and_missing_shard_are_named(ckpt):
    folder, _ = ckpt
    victim = "trainable_cond_mask.weight"
    shard = json.loads((folder / INDEX_NAME).read_text())["weight_map"][victim]
    tensors = load_file(folder / shard)
    tensors[victim] = torch.zeros(4, tensors[victim].shape[1], dtype=torch.bfloat16)
    save_file(tensors, str(folder / shard))
    with pytest.raises(WeightsError, match=rf"{victim} is \(4, 64\) in {shard}, expected \(3, 64\)"):
        load_dit(folder)
    (folder / SHARD2).unlink()
    with pytest.raises(WeightsError, match=f"{SHARD2}: listed in .* but missing"):
        load_dit(folder)
    (folder / "empty").mkdir()
    with pytest.raises(WeightsError, match="config.json: missing"):
        load_dit(folder / "empty")
    with pytest.raises(WeightsError, match="nowhere: checkpoint folder missing"):
        load_dit(folder / "nowhere")


def test_random_weights_are_seeded_and_built_on_the_target_device():
    a, b, c = (random_dit("tiny", "cpu", torch.float32, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.head.weight, c.head.head.weight)
    assert all(p.abs().sum() > 0 for p in a.parameters())  # every path contributes (no zero init)
    assert build_dit("tiny").device.type == "meta"


def test_the_folder_above_the_checkpoint_works_like_for_the_other_components(tmp_path):
    """download-weights' DEST holds Wan2.2-S2V-14B/: --ckpt_dir DEST loads the DiT too."""
    written = write_dit_checkpoint(tmp_path / "Wan2.2-S2V-14B", seed=4)
    model = load_dit(tmp_path, device="cpu", dtype=torch.float32)
    name = "head.head.weight"
    assert torch.equal(model.state_dict()[name], written.state_dict()[name].to(torch.bfloat16).float())
