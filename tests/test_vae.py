"""Wan2.1 VAE: upstream names at full size, strict loading of upstream-layout files, streaming decode."""

import json
import pathlib

import pytest
import torch
from ckpt_fixtures.encoders import write_vae

from avatar.errors import InvalidInput, WeightsError
from avatar.models.wan_vae import S2V_14B_VAE, TINY_VAE, WanVAE, expected_upstream_shapes, infer_dims, upstream_key_map

KEYS = pathlib.Path(__file__).parent / "data" / "keys"


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return WanVAE.tiny(seed=0)


def _pixels(t: int, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


def test_full_size_names_and_shapes_equal_upstream_manifest():
    manifest = {name: tuple(shape) for name, shape, _ in json.loads((KEYS / "wan21_vae.json").read_text())}
    got = expected_upstream_shapes(S2V_14B_VAE)
    assert got == manifest
    # every upstream key maps to exactly one diffusers parameter and back
    model = WanVAE.build_meta(S2V_14B_VAE)
    key_map = upstream_key_map(model, S2V_14B_VAE)
    assert sorted(key_map.values()) == sorted(model.state_dict())
    assert infer_dims(manifest) == S2V_14B_VAE


def test_upstream_layout_checkpoint_loads_strictly_and_runs(tmp_path):
    path = write_vae(tmp_path, seed=3)
    assert path.name == "Wan2.1_VAE.pth"
    source = torch.load(path, weights_only=True)
    vae = WanVAE.from_upstream(path)
    assert vae.dims == TINY_VAE
    loaded = vae.model.state_dict()
    for up, name in upstream_key_map(vae.model, vae.dims).items():
        assert torch.equal(loaded[name], source[up]), up
    latents = vae.encode(_pixels(5))
    assert latents.shape == (1, 16, 2, 4, 6)
    video = vae.decode(latents)
    assert video.shape == (1, 3, 5, 32, 48)
    assert torch.isfinite(video).all() and video.abs().max() <= 1.0


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("drop", "missing keys: decoder.head.2.bias"),
        ("extra", "unexpected keys: decoder.head.3.weight"),
        ("shape", "wrong shapes: conv2.bias [15]"),
    ],
)
def test_broken_checkpoint_names_the_key_and_file(tmp_path, damage, expect):
    path = write_vae(tmp_path)
    sd = torch.load(path, weights_only=True)
    if damage == "drop":
        del sd["decoder.head.2.bias"]
    elif damage == "extra":
        sd["decoder.head.3.weight"] = torch.zeros(1)
    else:
        sd["conv2.bias"] = torch.zeros(15)
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        WanVAE.from_upstream(path)
    assert expect in str(err.value) and str(path) in str(err.value)


def test_unreadable_files_are_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="missing"):
        WanVAE.from_upstream(tmp_path / "Wan2.1_VAE.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pth"):
        WanVAE.from_upstream(bad)


def test_streaming_decode_equals_full_decode(vae):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 7, 2, 3, generator=g)
    full = vae.decode(latents)
    # diffusers' own loop over the same model decodes the same pixels (latents de-normalised first)
    ref = vae.model.decode(latents / vae.inv_std + vae.mean).sample
    assert (full - ref).abs().max() <= 1e-5
    stream = vae.stream_decoder()
    parts = [stream.decode(latents[:, :, :1]), stream.decode(latents[:, :, 1:4]), stream.decode(latents[:, :, 4:7])]
    assert [p.shape[2] for p in parts] == [1, 12, 12]
    assert torch.equal(torch.cat(parts, dim=2), full)


def test_streams_do_not_share_caches(vae):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 1, 16, 4, 2, 2, generator=g)
    sa, sb = vae.stream_decoder(), vae.stream_decoder()
    out_a = [sa.decode(a[:, :, :1])]
    out_b = [sb.decode(b[:, :, :1])]
    out_a.append(sa.decode(a[:, :, 1:]))
    out_b.append(sb.decode(b[:, :, 1:]))
    assert torch.equal(torch.cat(out_a, 2), vae.decode(a))
    assert torch.equal(torch.cat(out_b, 2), vae.decode(b))
    sa.close()
    with pytest.raises(RuntimeError, match="closed"):
        sa.decode(a[:, :, :1])


def test_encode_still_equals_encoding_the_repeated_frames(vae, monkeypatch):
    image = _pixels(1, 16, 16, seed=4)
    for n in (1, 5, 125):  # 125 frames = 31 groups of 4: past the fixed point (about 20 groups here)
        assert torch.equal(vae.encode_still(image, n), vae.encode(image.repeat(1, 1, n, 1, 1))), n
    calls = []
    forward = vae.model.encoder.forward
    monkeypatch.setattr(vae.model.encoder, "forward", lambda *a, **k: (calls.append(1), forward(*a, **k))[1])
    vae.encode_still(image, 365)
    assert len(calls) < 40  # not 92: the steady state is copied, not recomputed


def test_encode_steady_is_the_fixed_point_encode_still_reaches_in_one_pass(vae, monkeypatch):
    for seed, (h, w) in enumerate([(16, 16), (32, 48)]):
        image = _pixels(1, h, w, seed=10 + seed)
        tail = vae.encode_still(image, 365)[:, :, -19:]  # iterated to the fixed point
        steady = vae.encode_steady(image)
        assert steady.shape == (1, 16, 1, h // 8, w // 8)
        assert torch.allclose(tail, steady.expand_as(tail), atol=1e-5), (tail - steady).abs().max()
        # a different image settles elsewhere: the pass depends on the pixels, not only the weights
        assert not torch.allclose(steady, vae.encode_steady(_pixels(1, h, w, seed=20 + seed)), atol=1e-3)
    calls = []
    forward = vae.model.encoder.forward
    monkeypatch.setattr(vae.model.encoder, "forward", lambda *a, **k: (calls.append(1), forward(*a, **k))[1])
    vae.encode_steady(image)
    assert calls == []  # its own (summed-kernel) copy of the encoder, one pass, no groups
    with pytest.raises(ValueError, match="one frame"):
        vae.encode_steady(image.repeat(1, 1, 2, 1, 1))


def test_bad_input_is_rejected(vae):
    with pytest.raises(InvalidInput, match="multiples of 8"):
        vae.encode(_pixels(1, 30, 32))
    with pytest.raises(InvalidInput, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(3, 1, 32, 32))
    with pytest.raises(InvalidInput, match="latents must be"):
        vae.decode(torch.zeros(1, 4, 1, 4, 4))


def test_bfloat16_vae_tracks_float32(vae):
    """LiveAvatar runs the VAE in bf16: same weights, outputs close to float32 ones."""
    half = WanVAE(WanVAE.tiny(seed=0, dtype=torch.bfloat16).model, vae.dims)
    x = _pixels(5, 16, 16, seed=5)
    z = vae.encode(x)
    assert half.dtype == torch.bfloat16 and half.encode(x).dtype == torch.float32
    assert (half.encode(x) - z).abs().max() < 0.05 * z.abs().max()
    assert (half.decode(z) - vae.decode(z)).abs().max() < 0.1
