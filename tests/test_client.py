"""avatar.client against real gateways on loopback: the stream, files, deadline, retries, bad input."""

import asyncio
import json
import time

import grpc
import numpy as np
import pytest
from conftest import ASSETS, check_video, free_port
from test_cli import run_cli

from avatar import media
from avatar.client import AvatarClient, GenerateError, InvalidRequest, RetryPolicy, generate_to_file
from avatar.grpc_util import PUBLIC_MAX_REQUEST_BYTES
from avatar.v1 import avatar_pb2

pytestmark = pytest.mark.timeout(300)


def request(**kw) -> avatar_pb2.GenerateRequest:
    fields = dict(
        image=(ASSETS / "astronaut.png").read_bytes(),
        audio=(ASSETS / "speech.wav").read_bytes(),
        size="64*64",
        sample_steps=1,
    )
    return avatar_pb2.GenerateRequest(**(fields | kw))


def test_generate_streams_header_init_fragments_progress_status(mesh, tmp_path):
    async def collect():
        async with AvatarClient(mesh["gateway"].address) as client:
            call = client.generate(request(num_clip=1, infer_frames=36), timeout_s=120)
            return [msg async for msg in call], call

    messages, call = asyncio.run(collect())
    kinds = [m.WhichOneof("event") for m in messages]
    # block 0 in two fragments (its first 4 frames sooner), then progress once per block
    assert kinds == ["header", "init_segment", "fragment"] + ["fragment", "progress"] * 3 + ["status"], kinds
    assert call.attempts == 1 and call.audio_note is None
    header, status = messages[0].header, messages[-1].status
    assert (header.total_frames, header.expected_fragments, status.frames, status.blocks) == (36, 4, 36, 3)
    frags = [m.fragment for m in messages if m.WhichOneof("event") == "fragment"]
    assert [(f.index, f.first_frame, f.num_frames) for f in frags] == [(0, 0, 4), (0, 4, 8), (1, 12, 12), (2, 24, 12)]
    mp4 = tmp_path / "stream.mp4"
    mp4.write_bytes(messages[1].init_segment.data + b"".join(m.fragment.data for m in messages if m.fragment.data))
    check_video(mp4, 36 / 25)


def test_generate_to_file_writes_the_video_and_its_sidecar_only(mesh, tmp_path):
    out = tmp_path / "videos" / "talk.mp4"
    saved = generate_to_file(
        mesh["gateway"].address,
        request(num_clip=1, infer_frames=24, seed=3),
        out,
        timeout_s=120,
        sidecar={"parameters": {"who": "test"}},
    )
    check_video(out, 24 / 25)
    assert sorted(p.name for p in out.parent.iterdir()) == ["talk.json", "talk.mp4"]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["video"]["bytes"] == out.stat().st_size == saved.bytes and meta["video"]["sha256"] == saved.sha256
    assert meta["seed"] == 3 and meta["frames"] == 24 and meta["parameters"] == {"who": "test"}
    assert meta["model"]["name"] == "tiny" and "noise" in meta["model"]["description"]
    assert meta["server"] == mesh["gateway"].address and meta["trace_id"] == saved.status.trace_id != ""


def test_deadline_ends_the_call_and_leaves_no_file(mesh, tmp_path):
    out = tmp_path / "late.mp4"
    t0 = time.monotonic()
    with pytest.raises(GenerateError) as err:  # 7.2 s of speech: 15 blocks, far more than 0.8 s of work
        generate_to_file(mesh["gateway"].address, request(), out, timeout_s=0.8)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    assert time.monotonic() - t0 < 5
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_an_invalid_request_with_the_reason(mesh, tmp_path):
    with pytest.raises(InvalidRequest, match=r"W\*H") as err:  # refused by the gateway
        generate_to_file(mesh["gateway"].address, request(size="64x64"), tmp_path / "x.mp4")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.attempts == 1
    # audio the gateway would refuse is refused before any upload: nothing even listens here
    with pytest.raises(InvalidRequest, match="not audio") as err:
        generate_to_file(
            f"127.0.0.1:{free_port()}", request(audio=b"these are notes, not speech\n"), tmp_path / "y.mp4"
        )
    assert err.value.attempts == 0
    assert list(tmp_path.iterdir()) == []


def test_unavailable_is_retried_with_backoff_then_reported():
    retries = []
    t0 = time.monotonic()
    with pytest.raises(GenerateError) as err:  # nothing listens on that port
        asyncio.run(_drain(f"127.0.0.1:{free_port()}", RetryPolicy(retries=2, backoff_s=0.2), retries))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 3
    assert [round(wait, 2) for _, wait in retries] == [0.2, 0.4]
    assert time.monotonic() - t0 >= 0.6


async def _drain(address, retry, retries):
    async with AvatarClient(address, retry=retry) as client:
        async for _ in client.generate(request(), on_retry=lambda e, wait: retries.append((e, wait))):
            pass


def test_a_busy_gateway_is_retried_when_its_retry_after_hint_says(start_service):
    """One session slot, no queue: the second call is refused with RESOURCE_EXHAUSTED and a
    retry-after-ms hint, waits as long as the hint says (not the 30 s backoff) and then succeeds."""
    server = start_service("all", "--max-sessions", "1", "--max-queue", "0")

    async def scenario():
        async with AvatarClient(server.address, retry=RetryPolicy(retries=30, backoff_s=30)) as client:
            first = client.generate(request(), timeout_s=200)  # 15 blocks hold the only slot
            it = aiter(first)
            while (await anext(it)).WhichOneof("event") != "fragment":
                pass
            retries = []
            second = client.generate(
                request(num_clip=1, infer_frames=12), timeout_s=200, on_retry=lambda e, wait: retries.append((e, wait))
            )
            finish_first = asyncio.create_task(_consume(it))
            got = [m.WhichOneof("event") async for m in second]
            await finish_first
            return second, retries, got

    second, retries, got = asyncio.run(scenario())
    assert got[-1] == "status" and second.attempts == len(retries) + 1 >= 2
    assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in e.details for e, _ in retries), retries
    assert all(0.1 <= wait < 30 for _, wait in retries), retries


async def _consume(it):
    async for _ in it:
        pass


# --- audio that does not fit the request limit (generated here, never committed) --------------


def _wav(path, mono: np.ndarray, rate: int, channels: int = 2):
    """A 16-bit WAV of `mono` (the right channel 0.8 times the left when stereo)."""
    import soundfile

    data = np.stack([mono, 0.8 * mono], axis=1) if channels == 2 else mono
    soundfile.write(str(path), data, rate, subtype="PCM_16")
    return path


def _speech(seconds: float, rate: int) -> np.ndarray:
    import soundfile

    pcm, src = soundfile.read(str(ASSETS / "speech.wav"), dtype="float32")
    up = media.resample(pcm, src, rate)
    return np.tile(up, int(seconds * rate) // len(up) + 1)[: round(seconds * rate)]


@pytest.fixture(scope="module")
def six_minutes_wav(tmp_path_factory):
    """6 minutes of speech as 48 kHz stereo 16-bit WAV: 69 MB, twice the public request limit."""
    path = _wav(tmp_path_factory.mktemp("long") / "six-minutes.wav", _speech(360, 48000), 48000)
    assert path.stat().st_size > 2 * PUBLIC_MAX_REQUEST_BYTES
    return path


def test_long_speech_is_sent_as_lossless_flac_and_renders(mesh, six_minutes_wav, tmp_path, env):
    """Was: 'RESOURCE_EXHAUSTED: Sent message larger than max' although 360 s is within the limit."""
    out = tmp_path / "long.mp4"
    r = run_cli(
        "generate",
        "--image",
        str(ASSETS / "astronaut.png"),
        "--audio",
        str(six_minutes_wav),
        "--server",
        mesh["gateway"].address,
        "--size",
        "64*64",
        "--num_clip",
        "1",
        "--infer_frames",
        "12",
        "--sample_steps",
        "1",
        "--out",
        str(out),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "mono FLAC at 48000 Hz" in r.stderr, r.stderr
    check_video(out, 12 / 25)
    assert "FLAC" in json.loads(out.with_suffix(".json").read_text())["audio_note"]


def test_flac_keeps_every_sample_of_the_mono_mix(six_minutes_wav):
    from avatar.client import fit_request

    original = request(audio=six_minutes_wav.read_bytes())
    fitted, note = fit_request(original)
    assert fitted.ByteSize() <= PUBLIC_MAX_REQUEST_BYTES and fitted.audio[:4] == b"fLaC", note
    assert fitted.image == original.image and fitted.size == original.size
    want, got = media.decode_audio(original.audio), media.decode_audio(fitted.audio)
    assert (got.sample_rate, len(got.samples)) == (48000, len(want.samples)) == (48000, 360 * 48000)
    assert np.abs(got.samples - want.samples).max() <= 1 / 32768 + 1e-7  # 16-bit rounding of the mix only


def test_audio_even_flac_cannot_shrink_is_sent_as_opus(tmp_path):
    from avatar.client import OPUS_BITRATE, fit_request

    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 360 * 48000).astype(np.float32)  # FLAC cannot pack it
    wav = _wav(tmp_path / "noise.wav", noise, 48000)
    fitted, note = fit_request(request(audio=wav.read_bytes()))
    assert fitted.audio[:4] == b"OggS" and "Opus" in note, note
    assert fitted.ByteSize() <= 360 * OPUS_BITRATE / 8 * 1.1
    assert abs(media.decode_audio(fitted.audio).duration_s - 360) < 0.05


def test_audio_over_the_documented_limit_is_refused_before_any_upload(tmp_path):
    too_long = _wav(tmp_path / "long.wav", _speech(601, 16000), 16000, channels=1)  # 19 MB: fits the request
    with pytest.raises(InvalidRequest) as err:
        generate_to_file(f"127.0.0.1:{free_port()}", request(audio=too_long.read_bytes()), tmp_path / "x.mp4")
    assert err.value.details == "audio is too long: 601.0 s, the limit is 600 s"  # the gateway's words
    assert err.value.attempts == 0  # nothing listens there: it never tried
