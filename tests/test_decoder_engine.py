"""DecoderEngine with the tiny VAE at 64x64: primed streaming decode, trimmed last block, playable fMP4."""

import json
import shutil
import subprocess

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import ColorRange, Colorspace
from ckpt_fixtures.encoders import write_vae
from conftest import ASSETS
from PIL import Image

from avatar.errors import InvalidInput, WeightsError
from avatar.jobs import Job
from avatar.presets import ModelSpec
from avatar.services.decoder.engine import DecoderEngine, to_yuv420p

SIZE, FPS, RATE = 64, 25, 48000
KEEP = [12, 7]  # the last block trimmed to the audio
TOTAL = sum(KEEP)


def _job(**kw) -> Job:
    spec = dict(
        width=SIZE,
        height=SIZE,
        fps=FPS,
        latent_frames_per_block=3,
        num_blocks=len(KEEP),
        total_frames=TOTAL,
        audio_sample_rate=RATE,
        model="tiny",
    )
    return Job(**(spec | kw))


def _pcm(first_frame: int, frames: int) -> np.ndarray:
    start, end = first_frame * RATE // FPS, (first_frame + frames) * RATE // FPS
    return (np.sin(2 * np.pi * 330 * np.arange(start, end) / RATE) * 9000).astype(np.int16)


@pytest.fixture(scope="module")
def engine():
    return DecoderEngine(ModelSpec(name="tiny", seed=3))


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(0)
    prime = torch.randn(16, 1, SIZE // 8, SIZE // 8, generator=g)
    blocks = [torch.randn(16, 3, SIZE // 8, SIZE // 8, generator=g) for _ in KEEP]
    return prime, blocks


def run_stream(engine, latents, yuv_on_device: bool = False):
    """Runs one stream; (init segment, blocks, tail, the frames handed to the muxer)."""
    prime, blocks = latents
    stream = engine.open_stream(_job(), prime)
    assert not stream.yuv_on_device  # the CPU keeps RGB + swscale
    stream.yuv_on_device = yuv_on_device
    seen = []
    write = stream._writer.write_block
    stream._writer.write_block = lambda frames, pcm, final=False, keyframe=True: (
        seen.append(frames.copy()),
        write(frames, pcm, final, keyframe),
    )[1]
    outs, first = [], 0
    for block, keep in zip(blocks, KEEP):
        outs.append(stream.decode_block(block, _pcm(first, keep), keep))
        first += keep
    tail = stream.finish()
    init = stream.init_segment()
    stream.close()
    return init, outs, tail, seen


@pytest.fixture(scope="module")
def decoded(engine, latents):
    return run_stream(engine, latents)


def test_blocks_are_the_continuation_of_the_reference_frame(engine, latents, decoded):
    """Frames equal a one-shot decode of [prime, blocks...] without its first (reference) frame."""
    prime, blocks = latents
    full = engine.vae.decode(torch.cat([prime] + blocks, dim=1)[None])[0]  # [3, 1 + 12 k, H, W]
    expected = ((full[:, 1 : 1 + TOTAL] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    got = np.concatenate(decoded[3])
    assert got.shape == (TOTAL, SIZE, SIZE, 3)
    assert np.abs(got.astype(int) - expected.permute(1, 2, 3, 0).numpy().astype(int)).max() <= 1


def test_yuv420p_conversion_matches_swscale_bt709_limited_range():
    """The on-device RGB -> yuv420p (the decoder's path on a GPU) equals what swscale makes of the
    same picture: Y within one level; chroma on average within half a level (swscale filters the
    2x2 subsampling differently from our box average: up to 6 levels apart at sharp edges)."""
    rgb = np.array(Image.open(ASSETS / "astronaut.png").convert("RGB").resize((128, 96)))
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[:, None].float() / 127.5 - 1.0  # [3, 1, H, W]
    ours = to_yuv420p(pixels)[0].numpy().astype(int)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
    )
    theirs = frame.to_ndarray().astype(int)
    assert ours.shape == theirs.shape == (144, 128)
    assert np.abs(ours[:96] - theirs[:96]).max() <= 1  # Y
    assert np.abs(ours[96:] - theirs[96:]).mean() < 0.5 and np.abs(ours[96:] - theirs[96:]).max() <= 8  # Cb, Cr


def test_the_gpu_path_hands_the_muxer_yuv420p_and_plays_the_same_video(engine, latents, decoded, tmp_path):
    """yuv_on_device (on by itself on a GPU) forced on the CPU: the muxer gets yuv420p planes and
    the video is as close to the decoder's frames as the RGB path's video."""
    init, outs, _, seen = run_stream(engine, latents, yuv_on_device=True)
    assert [f.shape for f in seen] == [(keep, SIZE * 3 // 2, SIZE) for keep in KEEP]
    paths = []
    for name, (head, parts) in {"yuv": (init, outs), "rgb": (decoded[0], decoded[1])}.items():
        paths.append(tmp_path / f"{name}.mp4")
        paths[-1].write_bytes(head + b"".join(o.data for o in parts))
    yuv, rgb = (np.stack([f.to_ndarray(format="rgb24") for f in av.open(str(p)).decode(video=0)]) for p in paths)
    assert yuv.shape == rgb.shape == (TOTAL, SIZE, SIZE, 3)
    # as close to the decoder's frames as the RGB path's video (the tiny VAE's frames are noise:
    # H.264 and 4:2:0 lose a lot of them either way)
    truth = np.concatenate(decoded[3]).astype(int)
    err_yuv, err_rgb = np.abs(yuv - truth).mean(), np.abs(rgb - truth).mean()
    assert err_yuv < 1.1 * err_rgb, (err_yuv, err_rgb)


def test_the_first_block_in_two_fragments_is_the_same_video_sooner(engine, latents, decoded, tmp_path):
    """mux(frames=4) then mux(): block 0's first 4 frames (an IDR first) and their audio as a
    fragment of their own, then the rest going on from there (no IDR): the same H.264 and AAC
    packets as one fragment per block, so the same decoded pictures and sound."""
    if shutil.which("ffprobe") is None:
        pytest.skip("needs ffprobe")
    prime, blocks = latents
    stream = engine.open_stream(_job(), prime)
    frames = stream.decode_frames(blocks[0], _pcm(0, KEEP[0]), KEEP[0])
    with pytest.raises(ValueError, match=r"frames must be in 1\.\.12"):
        stream.mux(frames, 13)
    first = stream.mux(frames, 4)
    assert (first.num_frames, first.continued, stream.blocks) == (4, True, 0) and first.vae_ms > 0
    with pytest.raises(RuntimeError, match="decode_frames twice"):  # the block is not done yet
        stream.decode_frames(blocks[1], _pcm(12, KEEP[1]), KEEP[1])
    rest = stream.mux(frames)
    assert (rest.num_frames, rest.continued, rest.vae_ms, stream.blocks, stream.frames) == (8, False, 0.0, 1, 12)
    last = stream.decode_block(blocks[1], _pcm(12, KEEP[1]), KEEP[1])
    init = stream.init_segment()
    stream.close()
    split, whole = tmp_path / "split.mp4", tmp_path / "whole.mp4"
    split.write_bytes(init + first.data + rest.data + last.data)
    whole.write_bytes(decoded[0] + b"".join(o.data for o in decoded[1]))

    def packets(path, kind):
        with av.open(str(path)) as c:
            return [(bytes(p), p.is_keyframe, p.pts) for p in c.demux(**{kind: 0}) if p.size]

    for kind in ("video", "audio"):  # the same packets at the same times: only the fragments' bounds moved
        assert packets(split, kind) == packets(whole, kind)
    with av.open(str(split)) as c:
        keys = [p.is_keyframe for p in c.demux(video=0) if p.size]
    assert keys == [True] + [False] * 11 + [True] + [False] * 6  # IDRs at block starts only
    info = json.loads(
        subprocess.run(
            ["ffprobe", "-v", "error", "-of", "json", "-show_streams", "-count_frames", str(split)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    video = next(st for st in info["streams"] if st["codec_type"] == "video")
    assert int(video["nb_read_frames"]) == TOTAL
    # the first fragment alone plays: its 4 frames and the audio encoded so far
    head = tmp_path / "head.mp4"
    head.write_bytes(init + first.data)
    with av.open(str(head)) as c:
        assert len([f for f in c.decode(video=0)]) == 4


def test_stream_is_a_playable_mp4(decoded, tmp_path):
    if shutil.which("ffprobe") is None:
        pytest.skip("needs ffprobe")
    init, outs, tail, _ = decoded
    assert [o.num_frames for o in outs] == KEEP
    assert all(o.vae_ms > 0 and o.mux_ms > 0 for o in outs)
    assert tail == b""  # the job's last block carried the audio tail
    path = tmp_path / "stream.mp4"
    path.write_bytes(init + b"".join(o.data for o in outs))
    info = json.loads(
        subprocess.run(
            ["ffprobe", "-v", "error", "-of", "json", "-show_streams", "-count_frames", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    streams = {s["codec_type"]: s for s in info["streams"]}
    assert streams["video"]["codec_name"] == "h264" and streams["audio"]["codec_name"] == "aac"
    assert int(streams["video"]["nb_read_frames"]) == TOTAL
    assert float(streams["video"]["start_time"]) == 0 and float(streams["audio"]["start_time"]) >= 0
    assert abs(float(streams["audio"]["duration"]) - TOTAL / FPS) < 0.05
    for k, o in enumerate(outs):  # each fragment plays alone after the init segment
        one = tmp_path / f"one{k}.mp4"
        one.write_bytes(init + o.data)
        frames = json.loads(
            subprocess.run(
                ["ffprobe", "-v", "error", "-of", "json", "-show_frames", "-select_streams", "v", str(one)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )["frames"]
        assert len(frames) == KEEP[k] and frames[0]["key_frame"] == 1


def test_bad_blocks_are_refused(engine):
    small = dict(width=32, height=32, num_blocks=1)  # 32x32 keeps this test cheap
    block = torch.randn(16, 3, 4, 4)
    stream = engine.open_stream(_job(**small), torch.randn(16, 1, 4, 4))
    with pytest.raises(InvalidInput, match="latent must be"):
        stream.decode_block(torch.zeros(16, 2, 4, 4), _pcm(0, 12), 12)
    with pytest.raises(InvalidInput, match="keep_frames"):
        stream.decode_block(block, _pcm(0, 12), 13)
    with pytest.raises(InvalidInput, match="audio samples"):
        stream.decode_block(block, _pcm(0, 6), 12)
    with pytest.raises(InvalidInput, match="int16"):
        stream.decode_block(block, _pcm(0, 12).astype(np.float32), 12)
    with pytest.raises(InvalidInput, match="NaN"):
        stream.decode_block(torch.full((16, 3, 4, 4), float("nan")), _pcm(0, 12), 12)
    assert stream.decode_block(block, _pcm(0, 12), 12).num_frames == 12  # still usable
    with pytest.raises(InvalidInput, match="extra"):
        stream.decode_block(block, _pcm(12, 12), 12)
    stream.close()
    stream.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        stream.decode_block(block, _pcm(12, 12), 12)


def test_decoding_and_muxing_in_two_halves_gives_the_same_fragments(engine, latents):
    """What the decoder service does (it reports the device's half done before muxing) gives
    decode_block's bytes; the halves go in order, one block at a time."""
    _, whole, _, _ = run_stream(engine, latents)
    prime, blocks = latents
    stream = engine.open_stream(_job(), prime)
    try:
        first = stream.decode_frames(blocks[0], _pcm(0, KEEP[0]), KEEP[0])
        assert first.frames.shape[0] == KEEP[0] and first.vae_ms > 0 and stream.blocks == 0
        with pytest.raises(RuntimeError, match="without mux"):
            stream.decode_frames(blocks[1], _pcm(KEEP[0], KEEP[1]), KEEP[1])
        halves = [stream.mux(first)]
        with pytest.raises(RuntimeError, match="decode_frames"):
            stream.mux(first)  # muxed already
        second = stream.decode_frames(blocks[1], _pcm(KEEP[0], KEEP[1]), KEEP[1])
        halves.append(stream.mux(second))
    finally:
        stream.close()
    assert [h.data for h in halves] == [w.data for w in whole]
    assert [h.num_frames for h in halves] == KEEP


def test_bad_streams_are_refused(engine, latents):
    prime, _ = latents
    with pytest.raises(InvalidInput, match="prime_latent"):
        engine.open_stream(_job(), torch.zeros(16, 1, 4, 8))
    with pytest.raises(InvalidInput, match="multiples of 16"):
        engine.open_stream(_job(width=70), prime)
    with pytest.raises(InvalidInput, match="sample rate"):
        engine.open_stream(_job(audio_sample_rate=12345), prime)


def test_model_selection(tmp_path):
    with pytest.raises(WeightsError):
        DecoderEngine(ModelSpec(name="s2v-14b", ckpt_dir=None))
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(WeightsError, match="Wan2.1_VAE.pth"):
        DecoderEngine(ModelSpec(name="s2v-14b", ckpt_dir=str(tmp_path / "empty")))
    # an upstream-layout Wan2.1_VAE.pth (tiny dims) loads through the real-checkpoint path
    write_vae(tmp_path / "ckpt", seed=3)
    loaded = DecoderEngine(ModelSpec(name="s2v-14b", ckpt_dir=str(tmp_path / "ckpt")))
    tiny = DecoderEngine(ModelSpec(name="tiny", seed=3))
    z = torch.randn(1, 16, 1, 8, 8)
    assert torch.equal(loaded.vae.decode(z), tiny.vae.decode(z))


def test_compiled_decoder_runs_only_at_sizes_warmed_before_serving(latents):
    """--compile: warm_up compiles at the preset sizes; a request at a warmed size runs the compiled
    decoder with no new compilation (tracing during a request breaks other threads' compiled
    models), and any other size decodes eagerly."""
    prime, blocks = latents
    engine = DecoderEngine(ModelSpec(name="tiny", seed=3, compile=True))
    compilations = []

    def backend(graph_module, example_inputs):  # dynamo's real capture, run without inductor (CPU)
        compilations.append(len(example_inputs))
        return graph_module.forward

    engine._compiled = torch.compile(engine.vae.model.decoder, backend=backend)

    def decode(width, height):
        job = _job(width=width, height=height)

        def z(t):
            return torch.nn.functional.interpolate(t, size=(height // 8, width // 8))

        stream = engine.open_stream(job, z(prime))
        used = stream._decoder._decoder
        pixels = [stream._decoder.decode(z(b)[None]) for b in blocks]
        stream.close()
        return used, torch.cat(pixels, dim=2)

    eager_used, eager = decode(SIZE, SIZE)
    assert eager_used is engine.vae.model.decoder and not compilations
    lines = engine.warm_up([(SIZE, SIZE)])
    assert len(lines) == 1 and lines[0].startswith(f"{SIZE}*{SIZE}: compiled in") and compilations
    before = len(compilations)
    used, compiled = decode(SIZE, SIZE)
    assert used is engine._compiled and len(compilations) == before, "a request compiled"
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    other_used, _ = decode(SIZE + 16, SIZE)
    assert other_used is engine.vae.model.decoder and len(compilations) == before
    assert DecoderEngine(ModelSpec(name="tiny", seed=3)).warm_up([(SIZE, SIZE)]) == []  # no --compile

    def broken(graph_module, example_inputs):
        raise RuntimeError("the compiler failed")

    engine._compiled = torch.compile(engine.vae.model.decoder, backend=broken)
    (line,) = engine.warm_up([(SIZE + 32, SIZE)])
    assert line.startswith(f"{SIZE + 32}*{SIZE}: not compiled, decodes eagerly") and "compiler failed" in line
    assert engine.decoder_for(SIZE + 32, SIZE) is None


def test_a_compiled_decoder_keeps_decoding_while_another_thread_compiles(latents):
    """torch.compile's tracing (make_fx) sets FX's tracing flag for the whole process; a compiled
    model called meanwhile from another thread used to raise "Detected that you are using FX to
    symbolically trace a dynamo-optimized function" (an H100 request in `serve --role all`)."""
    import threading

    from torch.fx.experimental.proxy_tensor import make_fx

    prime, blocks = latents
    engine = DecoderEngine(ModelSpec(name="tiny", seed=3, compile=True))
    engine._compiled = torch.compile(engine.vae.model.decoder, backend=lambda gm, inputs: gm.forward)
    engine.warm_up([(SIZE, SIZE)])
    reference = engine.vae.stream_decoder()
    expected = [reference.decode(prime[None])] + [reference.decode(b[None]) for b in blocks]

    tracing, release = threading.Event(), threading.Event()

    def traced(x):  # another thread's compilation, held in the middle of its trace
        tracing.set()
        release.wait(60)
        return x * 2

    tracer = threading.Thread(target=lambda: make_fx(traced)(torch.ones(2)))
    tracer.start()
    try:
        assert tracing.wait(30)
        assert torch.fx._symbolic_trace._is_fx_tracing_flag, "the trace is not in progress"
        stream = engine.vae.stream_decoder(engine.decoder_for(SIZE, SIZE))
        got = [stream.decode(prime[None])] + [stream.decode(b[None]) for b in blocks]
    finally:
        release.set()
        tracer.join(30)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
