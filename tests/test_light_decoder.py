"""Light latent decoder (TAEHV taew2_1): the published key layout loads, streaming equals one-shot
decoding and TAEHV's own (parallel) semantics, the full VAE's frame contract, the CUDA stream is a
no-op on the CPU, bad weights exit 2 in one line, and a mesh renders the same frames count with it."""

import subprocess

import numpy as np
import pytest
import torch
from conftest import ASSETS, AVATAR, ROOT, ffprobe, generate, metrics_of

from avatar.errors import WeightsError
from avatar.jobs import Job
from avatar.memory_planner import LIGHT_DECODER_PARAMS, MemoryRequest, estimate
from avatar.presets import DecoderOptions, ModelSpec
from avatar.services.decoder.engine import DecoderEngine
from avatar.services.decoder.light_decoder import (
    TAEW2_1,
    TINY_LIGHT,
    LightDecoder,
    LightDecoderNet,
    MemoryBlock,
    TimeExpand,
    expected_shapes,
)

LIGHT_TINY = ModelSpec(name="tiny", seed=3, decoder_options=DecoderOptions(kind="light"))


def _checkpoint(dims=TAEW2_1, seed=0, encoder=True, double_first_expand=False) -> dict:
    """A state dict in the published file's layout: decoder.* (and a few encoder.* tensors, which the
    loader must ignore), random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in expected_shapes(dims).items()}
    if double_first_expand:  # a checkpoint trained with the first time expansion on
        sd["decoder.7.conv.weight"] = torch.randn(2 * dims.widths[0], dims.widths[0], 1, 1, generator=g)
    if encoder:
        sd |= {"encoder.0.weight": torch.randn(64, 3, 3, 3, generator=g), "encoder.0.bias": torch.zeros(64)}
    return sd


# -- the published layout -------------------------------------------------------------------------


def test_layout_is_taehvs_decoder_for_wan21():
    shapes = expected_shapes(TAEW2_1)
    # TAEHV's decoder: clamp, conv 16->256, 3 memory blocks per stage at 256/128/64, three
    # upsample + time expansion steps, conv 64->3; parameterless layers hold no keys
    assert shapes["decoder.1.weight"] == (256, 16, 3, 3)
    assert shapes["decoder.3.conv.0.weight"] == (256, 512, 3, 3)  # [frame, previous frame] in
    assert shapes["decoder.5.conv.4.bias"] == (256,)
    assert shapes["decoder.7.conv.weight"] == (256, 256, 1, 1)  # first time expansion off
    assert shapes["decoder.8.weight"] == (128, 256, 3, 3) and "decoder.8.bias" not in shapes
    assert shapes["decoder.13.conv.weight"] == (256, 128, 1, 1)  # 2x in time
    assert shapes["decoder.19.conv.weight"] == (128, 64, 1, 1)  # 2x in time
    assert shapes["decoder.22.weight"] == (3, 64, 3, 3)
    assert not any(k.split(".")[1] in {"0", "2", "6", "12", "18", "21"} for k in shapes)
    assert sum(int(np.prod(s)) for s in shapes.values()) == LIGHT_DECODER_PARAMS  # the planner's count


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_the_published_layout_strictly(tmp_path, suffix):
    sd = _checkpoint()
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    dec = LightDecoder.from_file(path)
    assert dec.dims == TAEW2_1 and dec.source == str(path)
    got = dec.model.state_dict()
    assert set(got) == {k for k in sd if k.startswith("decoder.")}
    assert all(torch.equal(got[k], sd[k]) for k in got)


def test_a_doubled_first_time_expansion_keeps_the_later_frames_channels(tmp_path):
    sd = _checkpoint(TINY_LIGHT, double_first_expand=True)
    torch.save(sd, tmp_path / "t.pth")
    dec = LightDecoder.from_file(tmp_path / "t.pth")
    w0 = TINY_LIGHT.widths[0]
    assert torch.equal(dec.model.state_dict()["decoder.7.conv.weight"], sd["decoder.7.conv.weight"][w0:])


def test_widths_are_read_from_the_file(tmp_path):
    torch.save(_checkpoint(TINY_LIGHT), tmp_path / "tiny.pth")
    assert LightDecoder.from_file(tmp_path / "tiny.pth").dims == TINY_LIGHT


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda sd: sd.pop("decoder.10.conv.2.weight"), "decoder.10.conv.2.weight"),
        (lambda sd: sd.update({"decoder.22.weight": torch.zeros(4, 8, 3, 3)}), "decoder.22.weight"),
        (lambda sd: sd.update({"decoder.30.weight": torch.zeros(1)}), "decoder.30.weight"),
        (lambda sd: sd.update({"vae.conv.weight": torch.zeros(1)}), "not a TAEHV decoder"),
        (lambda sd: sd.update({"decoder.1.weight": torch.zeros(32, 48, 3, 3)}), "48-channel"),
        (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("decoder.")], "not a TAEHV decoder"),
    ],
)
def test_wrong_keys_and_shapes_are_named(tmp_path, change, reason):
    sd = _checkpoint(TINY_LIGHT)
    change(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=reason) as err:
        LightDecoder.from_file(tmp_path / "bad.pth")
    assert "\n" not in str(err.value) and "bad.pth" in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(WeightsError, match="missing"):
        LightDecoder.from_file(tmp_path / "nope.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="cannot load"):
        LightDecoder.from_file(tmp_path / "junk.safetensors")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        LightDecoder.from_file(tmp_path / "list.pth")


# -- decoding ----------------------------------------------------------------------------------------


def _taehv_parallel_reference(net: LightDecoderNet, z: torch.Tensor) -> torch.Tensor:
    """TAEHV's whole-video semantics, written independently of the streaming code: every layer over
    all frames at once, each memory block fed its input shifted one frame later (zeros first), then
    the first 3 frames trimmed. z [16, T, h, w] -> [3, 4T - 3, H, W] in [0, 1]."""
    x = z.permute(1, 0, 2, 3)  # frames first
    for layer in net.decoder:
        if isinstance(layer, MemoryBlock):
            past = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
            x = layer(x, past)
        elif isinstance(layer, TimeExpand):
            x = layer.conv(x).reshape(x.shape[0] * layer.stride, x.shape[1], *x.shape[2:])
        else:
            x = layer(x)
    return x[3:].clamp(0, 1).permute(1, 0, 2, 3)


@pytest.fixture(scope="module")
def tiny_light():
    return LightDecoder.random(TINY_LIGHT, seed=1)


def test_one_shot_decode_is_taehvs_video_decode(tiny_light):
    z = torch.randn(1, 16, 5, 6, 8, generator=torch.Generator().manual_seed(0))
    got = tiny_light.decode(z)
    want = _taehv_parallel_reference(tiny_light.model, z[0]) * 2 - 1
    assert got.shape == (1, 3, 17, 48, 64)  # 1 + 4 (t - 1) frames, 8x in space: the VAE's contract
    torch.testing.assert_close(got[0], want, atol=2e-5, rtol=0)
    assert got.min() >= -1 and got.max() <= 1 and got.std() > 0.1  # not a flat frame


def test_streaming_in_blocks_equals_decoding_whole(tiny_light):
    z = torch.randn(2, 16, 10, 8, 8, generator=torch.Generator().manual_seed(1))  # two streams at once
    whole = tiny_light.decode(z)
    stream = tiny_light.stream_decoder()
    parts = [stream.decode(z[:, :, a:b]) for a, b in ((0, 1), (1, 4), (4, 7), (7, 10))]
    assert [p.shape[2] for p in parts] == [1, 12, 12, 12]  # first call 1 + 4(t-1), then 4t
    assert torch.equal(torch.cat(parts, dim=2), whole)
    torch.testing.assert_close(whole[1:], tiny_light.decode(z[1:]), atol=1e-5, rtol=0)  # streams do not mix
    stream.close()
    with pytest.raises(RuntimeError, match="closed"):
        stream.decode(z[:, :, :1])


def test_the_compiled_path_traces_as_one_graph(tiny_light):
    """--compile wraps the net in torch.compile: one graph per latent frame, no breaks (the
    aot_eager backend checks the tracing without needing a C++ compiler here)."""
    compiled = torch.compile(tiny_light.model, backend="aot_eager", fullgraph=True)
    z = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stream = tiny_light.stream_decoder(compiled)
    got = torch.cat([stream.decode(z[:, :, :1]), stream.decode(z[:, :, 1:])], dim=2)
    torch.testing.assert_close(got, tiny_light.decode(z), atol=1e-5, rtol=0)


def test_frame_counts_match_the_full_vae():
    from avatar.models.wan_vae import WanVAE

    z = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    full, light = WanVAE.tiny(seed=0), LightDecoder.random(TINY_LIGHT)
    assert full.decode(z).shape == light.decode(z).shape
    fs, ls = full.stream_decoder(), light.stream_decoder()
    for a, b in ((0, 1), (1, 4)):
        assert fs.decode(z[:, :, a:b]).shape == ls.decode(z[:, :, a:b]).shape


# -- the engine: choice, stream, memory plan ---------------------------------------------------------


def _job(blocks: int) -> Job:
    return Job(
        width=64,
        height=64,
        fps=25,
        latent_frames_per_block=3,
        num_blocks=blocks,
        total_frames=12 * blocks,
        audio_sample_rate=48000,
        model="tiny",
    )


def test_engine_runs_the_light_decoder_block_by_block():
    engine = DecoderEngine(LIGHT_TINY)
    assert engine.kind == "light" and isinstance(engine.vae, LightDecoder)
    assert engine.describe().startswith("light (TAEHV taew2_1")
    g = torch.Generator().manual_seed(4)
    prime = torch.randn(16, 1, 8, 8, generator=g)
    blocks = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(2)]
    stream = engine.open_stream(_job(2), prime)
    seen = []
    write = stream._writer.write_block
    stream._writer.write_block = lambda frames, pcm, final=False, keyframe=True: (
        seen.append(frames.copy()),
        write(frames, pcm, final, keyframe),
    )[1]
    pcm = np.zeros(12 * 48000 // 25, dtype=np.int16)
    outs = [stream.decode_block(b, pcm, 12) for b in blocks]
    stream.close()
    assert [o.num_frames for o in outs] == [12, 12] and all(o.vae_ms > 0 for o in outs)
    full = engine.vae.decode(torch.cat([prime, *blocks], dim=1)[None])[0, :, 1:]  # without the reference frame
    want = ((full + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(np.concatenate(seen), want)


def test_cuda_stream_is_a_no_op_on_the_cpu():
    engine = DecoderEngine(LIGHT_TINY)
    assert engine.stream.stream is None and engine.stream.priority is None
    before = torch.randn(3)
    with engine.stream.active():
        inside = before * 2
    assert torch.equal(inside, before * 2)


def test_full_is_the_default_and_the_planner_counts_the_light_decoder():
    assert ModelSpec().decoder_options.kind == "full" and "light" not in ModelSpec().describe()
    assert "light latent decoder" in LIGHT_TINY.describe()
    hd = MemoryRequest(704, 384)
    full = estimate(hd, fp8=True, encoder_device="cpu", kv_sets=1)
    light = estimate(hd, fp8=True, encoder_device="cpu", kv_sets=1, light_decoder=True)
    assert light.parts["vae"] < full.parts["vae"] / 4 and light.total < full.total


def test_options_refuse_what_cannot_run(tmp_path):
    from avatar.errors import InvalidInput

    with pytest.raises(InvalidInput, match="one of full, light"):
        DecoderOptions(kind="tiny")
    with pytest.raises(InvalidInput, match="--latent-decoder light"):
        DecoderOptions(light_path="x.pth")
    with pytest.raises(InvalidInput, match="needs --light-decoder-path"):
        ModelSpec(name="s2v-14b", ckpt_dir=str(tmp_path), decoder_options=DecoderOptions(kind="light"))


# -- the command line and the mesh --------------------------------------------------------------------


def _serve(*args, env):
    return subprocess.run(
        [*AVATAR, "serve", "--role", "decoder", "--listen", "127.0.0.1:0", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_light_decoder_flags_exit_2_in_one_line(tmp_path, env):
    r = _serve("--latent-decoder", "light", "--light-decoder-path", str(tmp_path / "nope.pth"), env=env)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    sd = _checkpoint(TINY_LIGHT)
    sd.pop("decoder.15.conv.0.weight")
    torch.save(sd, tmp_path / "wrong.pth")
    r = _serve("--latent-decoder", "light", "--light-decoder-path", str(tmp_path / "wrong.pth"), env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "decoder.15.conv.0.weight" in r.stderr.strip().splitlines()[-1]
    r = _serve("--light-decoder-path", str(tmp_path / "wrong.pth"), env=env)
    assert r.returncode == 2 and "--latent-decoder light" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.mesh
def test_a_mesh_with_the_light_decoder_streams_the_same_frames_count(tmp_path, start_service):
    from avatar.v1 import avatar_pb2

    torch.save(_checkpoint(TINY_LIGHT, seed=5), tmp_path / "taew2_1_tiny.pth")
    ckpt = str(tmp_path / "taew2_1_tiny.pth")
    light = start_service(
        "all", "--latent-decoder", "light", "--light-decoder-path", ckpt, "--metrics-port", "0", trace=True
    )
    full = start_service("all")
    request = avatar_pb2.GenerateRequest(
        image=(ASSETS / "astronaut.png").read_bytes(),
        audio=(ASSETS / "speech.wav").read_bytes(),
        size="64*64",
        num_clip=1,
        infer_frames=24,
        sample_steps=2,
        seed=7,
    )
    videos = {}
    for name, svc in (("light", light), ("full", full)):
        s = generate(svc.address, request)
        assert s.status is not None and s.status.frames > 0
        videos[name] = (s, s.write_mp4(tmp_path / f"{name}.mp4"))
    (ls, lpath), (fs, fpath) = videos["light"], videos["full"]
    assert "light latent decoder" in ls.header.model and "taew2_1_tiny.pth" in ls.header.model
    assert "light" not in fs.header.model
    lv = next(st for st in ffprobe(lpath)["streams"] if st["codec_type"] == "video")
    fv = next(st for st in ffprobe(fpath)["streams"] if st["codec_type"] == "video")
    assert int(lv["nb_read_frames"]) == int(fv["nb_read_frames"]) == ls.status.frames == fs.status.frames
    assert lpath.read_bytes() != fpath.read_bytes()  # a different decoder really ran
    assert "latent decoder: light" in light.log.read_text()
    assert metrics_of(light)['avatar_latent_decoder{kind="light"}'] == 1
    spans = [s for s in light.spans() if s["name"] == "vae_decode"]
    assert spans and all(s["attributes"]["decoder"] == "light" for s in spans)
