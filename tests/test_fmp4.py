"""Fragmented MP4 writer: ffprobe reads the concatenated stream and each fragment on its own."""

import io
import json
import shutil
import struct
import subprocess

import av
import numpy as np
import pytest

from avatar.services.decoder.fmp4 import FragmentedMp4Writer, avcc_from_parameter_sets, split_annexb

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe")

W, H, FPS, RATE = 96, 64, 25, 48000
FRAMES_PER_BLOCK = 12
SAMPLES_PER_BLOCK = FRAMES_PER_BLOCK * RATE // FPS


def _frames(block: int, n: int = FRAMES_PER_BLOCK) -> np.ndarray:
    """A moving gradient: real content for the encoder, different in every frame."""
    y, x = np.mgrid[0:H, 0:W]
    out = []
    for i in range(n):
        t = block * FRAMES_PER_BLOCK + i
        out.append(
            np.stack([(x * 2 + t * 5) % 256, (y * 3 + t * 7) % 256, np.full_like(x, (t * 11) % 256)], axis=-1).astype(
                np.uint8
            )
        )
    return np.stack(out)


def _tone(start: int, n: int, freq: float = 440.0) -> np.ndarray:
    t = (np.arange(n) + start) / RATE
    return (np.sin(2 * np.pi * freq * t) * 12000).astype(np.int16)


def _probe(path, *args) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-of", "json", *args, str(path)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def _boxes(data: bytes) -> list[bytes]:
    kinds, pos = [], 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        kinds.append(kind)
        pos += size
    assert pos == len(data), "box sizes must add up to the byte count"
    return kinds


@pytest.fixture(scope="module")
def stream():
    """init segment + 5 full blocks (the last one final) of frames and a 440 Hz tone."""
    writer = FragmentedMp4Writer(W, H, FPS, RATE)
    fragments = []
    for b in range(5):
        fragments.append(writer.write_block(_frames(b), _tone(b * SAMPLES_PER_BLOCK, SAMPLES_PER_BLOCK), final=b == 4))
    return writer, writer.init_segment(), fragments


def test_each_block_returns_one_moof_mdat_pair(stream):
    _, init, fragments = stream
    assert _boxes(init) == [b"ftyp", b"moov"]
    assert len(fragments) == 5
    for frag in fragments:
        assert _boxes(frag) == [b"moof", b"mdat"]


def test_concatenated_stream_is_a_valid_mp4(stream, tmp_path):
    _, init, fragments = stream
    path = tmp_path / "all.mp4"
    path.write_bytes(init + b"".join(fragments))
    info = _probe(path, "-show_streams", "-count_frames", "-show_format")
    streams = {s["codec_type"]: s for s in info["streams"]}
    v, a = streams["video"], streams["audio"]
    assert v["codec_name"] == "h264" and v["pix_fmt"] == "yuv420p"
    assert (v["width"], v["height"]) == (W, H)
    assert v["r_frame_rate"] == "25/1"
    assert int(v["nb_read_frames"]) == 5 * FRAMES_PER_BLOCK
    assert a["codec_name"] == "aac" and a["profile"] == "LC"
    assert int(a["channels"]) == 1 and int(a["sample_rate"]) == RATE
    assert float(v["start_time"]) >= 0 and float(a["start_time"]) >= 0
    video_s = 5 * FRAMES_PER_BLOCK / FPS
    assert abs(float(v["duration"]) - video_s) < 1e-3
    assert abs(float(a["duration"]) - video_s) < 0.05
    # ffmpeg decodes the whole file without a complaint
    err = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True, text=True
    ).stderr
    assert err == ""


def test_every_fragment_starts_with_a_keyframe_and_plays_alone(stream, tmp_path):
    _, init, fragments = stream
    for k, frag in enumerate(fragments):
        path = tmp_path / f"frag{k}.mp4"
        path.write_bytes(init + frag)
        frames = _probe(path, "-show_frames", "-select_streams", "v")["frames"]
        assert len(frames) == FRAMES_PER_BLOCK
        assert frames[0]["key_frame"] == 1
        assert abs(float(frames[0]["pts_time"]) - k * FRAMES_PER_BLOCK / FPS) < 1e-6


def test_audio_stays_in_sync_with_frame_times(tmp_path):
    """A click at 1.00 s of input PCM is heard at 1.00 s of the output (priming compensated)."""
    writer = FragmentedMp4Writer(W, H, FPS, RATE)
    n = 4 * SAMPLES_PER_BLOCK
    pcm = np.zeros(n, np.int16)
    click = RATE  # sample index of 1.00 s
    pcm[click : click + 480] = (np.sin(np.arange(480) / 480 * np.pi * 40) * 20000).astype(np.int16)
    data = writer.init_segment() + b"".join(
        writer.write_block(_frames(b), pcm[b * SAMPLES_PER_BLOCK : (b + 1) * SAMPLES_PER_BLOCK], final=b == 3)
        for b in range(4)
    )
    with av.open(io.BytesIO(data)) as c:
        decoded = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    assert abs(len(decoded) - n) < 1024
    onset = int(np.argmax(np.abs(decoded) > 0.1))
    assert abs(onset - click) < RATE * 0.005, f"click heard at {onset / RATE:.4f} s"


def test_fragment_is_ready_when_the_call_returns():
    """No one-block delay: the first block's fragment already holds its 12 frames."""
    writer = FragmentedMp4Writer(W, H, FPS, RATE)
    first = writer.write_block(_frames(0), _tone(0, SAMPLES_PER_BLOCK))
    with av.open(io.BytesIO(writer.init_segment() + first)) as c:
        assert sum(1 for _ in c.decode(video=0)) == FRAMES_PER_BLOCK


def test_finish_flushes_the_audio_tail_and_trimmed_last_block(tmp_path):
    writer = FragmentedMp4Writer(W, H, FPS, RATE)
    parts = [
        writer.init_segment(),
        writer.write_block(_frames(0), _tone(0, SAMPLES_PER_BLOCK)),
        writer.write_block(_frames(1, 5), _tone(SAMPLES_PER_BLOCK, 5 * RATE // FPS)),
    ]
    tail = writer.finish()
    assert _boxes(tail) == [b"moof", b"mdat"]
    assert writer.finish() == b""
    path = tmp_path / "trim.mp4"
    path.write_bytes(b"".join(parts) + tail)
    streams = {s["codec_type"]: s for s in _probe(path, "-show_streams", "-count_frames")["streams"]}
    assert int(streams["video"]["nb_read_frames"]) == 17
    assert abs(float(streams["audio"]["duration"]) - 17 / FPS) < 0.05
    with pytest.raises(RuntimeError):
        writer.write_block(_frames(2), _tone(0, SAMPLES_PER_BLOCK))


def test_mime_type_names_the_real_codecs(stream):
    writer, init, _ = stream
    mime = writer.mime_type()
    assert mime.startswith('video/mp4; codecs="avc1.') and mime.endswith(',mp4a.40.2"')
    profile_level = mime.split("avc1.")[1][:6]
    avcc = init[init.index(b"avcC") + 4 :]
    assert bytes.fromhex(profile_level) == avcc[1:4]


def test_avcc_and_annexb_helpers():
    nals = split_annexb(b"\x00\x00\x00\x01\x67\x64\x00\x1f\xac\x00\x00\x01\x68\xee\x3c\x80")
    assert nals == [b"\x67\x64\x00\x1f\xac", b"\x68\xee\x3c\x80"]
    rec = avcc_from_parameter_sets(b"\x67\x42\xc0\x1e\xab", b"\x68\xce")
    assert rec[:4] == b"\x01\x42\xc0\x1e" and rec[4] == 0xFF and rec[5] == 0xE1


@pytest.mark.parametrize(
    "bad",
    [
        dict(frames=np.zeros((12, H, W + 2, 3), np.uint8)),
        dict(frames=np.zeros((12, H, W, 3), np.float32)),
        dict(frames=np.zeros((0, H, W, 3), np.uint8)),
        dict(pcm=np.zeros(100, np.float32)),
        dict(pcm=np.zeros((2, 100), np.int16)),
    ],
)
def test_bad_blocks_are_rejected(bad):
    writer = FragmentedMp4Writer(W, H, FPS, RATE)
    args = dict(frames=_frames(0), pcm=_tone(0, SAMPLES_PER_BLOCK)) | bad
    with pytest.raises(ValueError):
        writer.write_block(args["frames"], args["pcm"])


def test_bad_writer_settings_are_rejected():
    with pytest.raises(ValueError, match="even"):
        FragmentedMp4Writer(95, 64)
    with pytest.raises(ValueError, match="sample rate"):
        FragmentedMp4Writer(96, 64, 25, 12345)


def test_colours_survive_and_are_tagged_bt709(tmp_path):
    """The RGB->YUV matrix matches the colour tags in the SPS, so players show the right colours."""
    writer = FragmentedMp4Writer(W, H, FPS, RATE)
    colours = [(200, 50, 100), (20, 220, 40), (30, 60, 230), (250, 250, 250)]
    frames = np.zeros((FRAMES_PER_BLOCK, H, W, 3), np.uint8)
    for i in range(FRAMES_PER_BLOCK):
        frames[i] = colours[i % len(colours)]
    data = writer.init_segment() + writer.write_block(frames, _tone(0, SAMPLES_PER_BLOCK), final=True)
    path = tmp_path / "colour.mp4"
    path.write_bytes(data)
    v = _probe(path, "-show_streams", "-select_streams", "v")["streams"][0]
    assert (v["color_space"], v["color_primaries"], v["color_transfer"], v["color_range"]) == (
        "bt709",
        "bt709",
        "bt709",
        "tv",
    )
    with av.open(io.BytesIO(data)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            rgb = frame.to_ndarray(format="rgb24")[H // 2, W // 2].astype(int)
            assert np.abs(rgb - colours[i % len(colours)]).max() <= 4, (i, rgb)
