"""Tiled streaming VAE decode: exact streaming per tile, seamless blend, the same as untiled where it fits."""
import argparse
import itertools

import numpy as np
import pytest
import torch

from avatar import cli
from avatar.errors import InvalidInput
from avatar.models import wan_vae
from avatar.models.wan_vae import StreamingDecoder, WanVAE
from avatar.presets import ModelSpec
from services.decoder.engine import DecoderEngine

TILE = 128                     # pixels: 16 latents, overlap 4 latents = a 32-pixel ramp
RAMP = TILE // 4


@pytest.fixture(scope="module")
def vae():
    return WanVAE.tiny(seed=5)


def _latents(t: int, h_px: int, w_px: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, t, h_px // 8, w_px // 8, generator=g)


def test_streamed_tiles_equal_one_shot_tiled_decode(vae):
    """Every tile carries its own cache across calls, so the block split changes nothing."""
    z = _latents(5, 128, 192)
    whole = vae.stream_decoder(TILE).decode(z)
    stream = vae.stream_decoder(TILE)
    parts = [stream.decode(z[:, :, a:b]) for a, b in ((0, 1), (1, 4), (4, 5))]   # prime, a block of 3, 1
    assert [p.shape[2] for p in parts] == [1, 12, 4]
    assert torch.equal(torch.cat(parts, dim=2), whole)
    assert stream.frames_in == 5 and len(stream._tiles) == 2     # 16 latents high fit; 24 wide: 2


def test_tiled_is_close_to_untiled(vae):
    """Tiles differ from the whole frame only through their borders (zero padding) and the global
    mid-block attention; measured on the tiny VAE at 128x192: max 0.28, mean 0.012."""
    z = _latents(3, 128, 192, seed=1)
    full, tiled = vae.decode(z), vae.stream_decoder(TILE).decode(z)
    assert tiled.shape == full.shape == (1, 3, 9, 128, 192)
    diff = (tiled - full).abs()
    # a tile placed one latent off: mean 0.05; averaging tiles without ramps: mean 0.03
    assert 0 < diff.mean() < 0.02 and diff.max() < 0.5, (diff.mean(), diff.max())


def test_blend_is_seamless_and_places_tiles_right(vae, monkeypatch):
    """With a stand-in decoder that is local (pixels = upsampled latents) plus a different constant
    per tile, the tiled frame minus the true frame must be a smooth cross-fade of those constants:
    exactly each tile's constant where it is alone, never steeper than the ramp allows."""
    offsets = [0.0, 0.2, 0.4, 0.6, 0.1, 0.3]

    def fake(self, z, cache, first):
        k = next(counter)
        img = 0.3 * torch.tanh(z[:, :3]).repeat_interleave(8, -1).repeat_interleave(8, -2)
        reps = torch.tensor([1] + [4] * (z.shape[2] - 1) if first else [4] * z.shape[2])
        return img.repeat_interleave(reps, dim=2) + offsets[k]

    monkeypatch.setattr(StreamingDecoder, "_decode_frames", fake)
    z = _latents(2, 192, 256, seed=2)                  # 24x32 latents: 2 x 3 tiles
    counter = itertools.count()
    truth = vae.stream_decoder().decode(z)             # one "tile": offset 0
    counter = itertools.count()
    stream = vae.stream_decoder(TILE)
    field = stream.decode(z) - truth
    assert len(stream._tiles) == 6
    assert field.std(dim=(0, 1, 2)).max() < 1e-6       # same blend for every frame and channel
    f = field[0, 0, 0]
    step = max(abs(a - b) for a in offsets for b in offsets) / RAMP
    assert (f[1:] - f[:-1]).abs().max() <= step + 1e-5
    assert (f[:, 1:] - f[:, :-1]).abs().max() <= step + 1e-5
    for tile, off in zip(stream._tiles, offsets):
        alone = (tile.weight == 1).nonzero()           # where no neighbour overlaps this tile
        assert len(alone) > 0
        ay, ax = alone[len(alone) // 2].tolist()
        assert abs(f[tile.y * 8 + ay, tile.x * 8 + ax] - off) < 1e-6, (tile.y, tile.x)
    assert f.min() >= min(offsets) - 1e-6 and f.max() <= max(offsets) + 1e-6


@pytest.mark.parametrize("length", [16, 17, 24, 29, 41, 88])
def test_tile_weights_cover_every_pixel_once(length):
    starts = [s * 8 for s in wan_vae._tile_starts(length, 16, 12)]
    assert starts[0] == 0 and starts[-1] == (length - min(16, length)) * 8
    assert all(0 < b - a <= 12 * 8 for a, b in zip(starts, starts[1:]))
    tile = min(16, length) * 8
    weights = wan_vae._axis_weights(starts, tile, RAMP)
    total = torch.zeros(length * 8)
    for s, w in zip(starts, weights):
        total[s:s + tile] += w
        assert (w[1:] - w[:-1]).abs().max() <= 1 / RAMP
    assert torch.allclose(total, torch.ones_like(total))


def test_frame_within_one_tile_is_the_untiled_decode(vae):
    z = _latents(3, 128, 96, seed=3)                   # 128x96 fits a 128-pixel tile
    stream = vae.stream_decoder(TILE)
    tiled = torch.cat([stream.decode(z[:, :, :1]), stream.decode(z[:, :, 1:])], dim=2)
    assert stream._tiles is None
    assert torch.equal(tiled, vae.decode(z))


@pytest.mark.parametrize("px, why", [(64, "at least 128"), (200, "multiple of 64"), (-128, "at least 128"),
                                     (256.0, "integer"), (True, "integer")])
def test_bad_tile_size_is_invalid_input(vae, px, why):
    with pytest.raises(InvalidInput, match=why):
        vae.stream_decoder(px)
    with pytest.raises(InvalidInput, match=why):
        DecoderEngine(ModelSpec(name="tiny", extra={"vae_tile": px}))


def test_stream_refuses_a_change_of_size(vae):
    stream = vae.stream_decoder(TILE)
    stream.decode(_latents(1, 128, 192))
    with pytest.raises(InvalidInput, match="started at 16x24"):
        stream.decode(_latents(1, 128, 256))


def test_decoder_engine_with_vae_tile_makes_a_valid_fragment():
    from test_decoder_engine import _job, _pcm
    width, height = 192, 128
    engine = DecoderEngine(ModelSpec(name="tiny", seed=3, extra={"vae_tile": TILE}))
    z = _latents(4, height, width, seed=4)[0]
    stream = engine.open_stream(_job(width=width, height=height, num_blocks=1, total_frames=12), z[:, :1])
    assert len(stream._decoder._tiles) == 2
    seen = []
    write = stream._writer.write_block
    stream._writer.write_block = lambda frames, pcm, final=False: (seen.append(frames.copy()),
                                                                   write(frames, pcm, final))[1]
    block = stream.decode_block(z[:, 1:], _pcm(0, 12), 12)
    init = stream.init_segment()
    stream.close()
    assert init[4:8] == b"ftyp" and block.data[4:8] == b"moof" and block.num_frames == 12
    expected = engine.vae.stream_decoder(TILE).decode(z[None])[0, :, 1:]
    expected = ((expected + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert seen[0].shape == (12, height, width, 3)
    assert np.array_equal(seen[0], expected)


def test_cli_vae_tile_flag_reaches_the_model_spec():
    parser = argparse.ArgumentParser()
    cli._add_model_flags(parser)
    assert cli.model_spec(parser.parse_args(["--vae-tile", "256", "--kv-fp8"])).extra == {
        "kv_dtype": "float8_e4m3fn", "vae_tile": 256}
    assert "vae_tile" not in cli.model_spec(parser.parse_args([])).extra
    with pytest.raises(SystemExit):
        parser.parse_args(["--vae-tile", "100"])
