"""Gateway planner: request + preset -> JobSpec (size, blocks, caps) and exact per-block audio slices."""

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from avatar.errors import InvalidInput
from avatar.gateway import planner
from avatar.presets import DEFAULT_SEED, FRAMES_PER_BLOCK, ModelSpec
from avatar.v1 import avatar_pb2

TINY = ModelSpec()
BIG = ModelSpec(name="s2v-14b", random_weights=True)


def req(**kw) -> avatar_pb2.GenerateRequest:
    return avatar_pb2.GenerateRequest(**kw)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 120, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_blocks_follow_the_audio_and_the_last_block_is_trimmed():
    job = planner.plan_job(req(), TINY, 5.0, (512, 512))
    assert (job.total_frames, job.num_blocks, job.fps) == (125, 11, 25)
    assert job.total_frames - (job.num_blocks - 1) * FRAMES_PER_BLOCK == 5  # kept of the last block
    assert job.sample_steps == 3 and job.seed == DEFAULT_SEED  # preview
    assert job.infer_frames == 36  # preview's 32 frames per clip, rounded up to whole blocks
    assert job.latent_frames_per_block == 3 and job.audio_sample_rate == 48000 and job.model == "tiny"
    # rounding to whole frames: 5.01 s -> 125 frames, 5.03 s -> 126 frames (one more block only past 132)
    assert planner.plan_job(req(), TINY, 5.01, (512, 512)).total_frames == 125
    assert planner.plan_job(req(), TINY, 5.03, (512, 512)).total_frames == 126


def test_num_clip_caps_the_video():
    job = planner.plan_job(req(num_clip=1, infer_frames=48), TINY, 5.0, (512, 512))
    assert (job.total_frames, job.num_blocks) == (48, 4)
    job = planner.plan_job(req(preset="hd", num_clip=2, infer_frames=32), TINY, 60.0, (512, 512))
    assert (job.infer_frames, job.total_frames, job.num_blocks) == (36, 72, 6)
    job = planner.plan_job(req(num_clip=1, infer_frames=80), TINY, 60.0, (512, 512))  # upstream's default
    assert (job.infer_frames, job.total_frames, job.num_blocks) == (84, 84, 7)


def test_sizes_follow_preset_model_and_image_aspect():
    hd = planner.plan_job(req(preset="hd"), BIG, 2.0, (1408, 768))
    assert (hd.width, hd.height) == (704, 384)
    tiny = planner.plan_job(req(preset="hd"), TINY, 2.0, (1408, 768))  # 1/4 of each side
    assert (tiny.width, tiny.height) == (176, 96)
    for model, (w, h) in ((TINY, (512, 512)), (TINY, (300, 900)), (BIG, (900, 300))):
        job = planner.plan_job(req(preset="standard"), model, 2.0, (w, h))
        d = model.size_divisor
        assert job.width % d == 0 and job.height % d == 0
        assert (job.width >= job.height) == (w >= h)  # the aspect follows the image
    explicit = planner.plan_job(req(size="64*64"), TINY, 2.0, (512, 512))
    assert (explicit.width, explicit.height) == (64, 64)


def test_seed_is_optional_and_zero_is_a_seed():
    assert planner.plan_job(req(seed=0), TINY, 1.0, (64, 64)).seed == 0
    assert planner.plan_job(req(seed=7), TINY, 1.0, (64, 64)).seed == 7


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(preset="ultra"), "unknown preset 'ultra'"),
        (dict(sample_steps=51), "sample_steps must be between 1 and 50"),
        (dict(sample_steps=-1), "sample_steps"),
        (dict(infer_frames=-12), "infer_frames must be positive"),
        (dict(num_clip=-2), "num_clip must be >= 0"),
        (dict(size="big"), "size must be written W\\*H"),
        (dict(size="64*48"), "at least 64 px on each side"),
    ],
)
def test_bad_requests_say_why(kw, match):
    with pytest.raises(InvalidInput, match=match):
        planner.plan_job(req(**kw), TINY, 5.0, (512, 512))


def test_prepare_cuts_audio_into_exact_block_slices_in_sync():
    rate = 22050
    audio = np.zeros((int(rate * 5.0), 2), np.float32)  # stereo at an odd rate
    click = int(rate * 1.0)
    audio[click : click + 40] = 0.9  # a click at t = 1.000 s
    plan = planner.prepare(req(image=png_bytes(320, 240), audio=wav_bytes(audio, rate), size="96*64"), TINY)
    job = plan.job
    assert plan.pixels.dtype == np.uint8 and plan.pixels.shape == (job.height, job.width, 3)
    assert len(plan.pcm_out) == job.total_frames * 1920 and plan.pcm_out.dtype == np.int16
    assert abs(len(plan.pcm_16k) - 5.0 * 16000) <= 1
    # the click stays at 1.000 s in the 48 kHz output (within 1 ms)
    assert abs(int(np.argmax(np.abs(plan.pcm_out) > 10000)) - 48000) <= 48
    slices = [plan.block_audio(i) for i in range(job.num_blocks)]
    assert [k for _, k in slices] == [12] * 10 + [5]
    assert all(len(pcm) == keep * 1920 for pcm, keep in slices)
    assert np.array_equal(np.concatenate([pcm for pcm, _ in slices]), plan.pcm_out)  # no gap, no overlap
    with pytest.raises(ValueError):
        plan.block_audio(job.num_blocks)
    assert [plan.kept_frames(i) for i in range(job.num_blocks)] == [k for _, k in slices]
    with pytest.raises(ValueError):
        plan.kept_frames(-1)


def test_prepare_leaves_the_output_audio_for_later(monkeypatch):
    # The encoders need only the 16 kHz audio: the 48 kHz output (the muxer's) is made on first
    # use, which the gateway schedules while block 0 runs, not on the way to the encoders.
    calls = []
    resample = planner.media.resample
    monkeypatch.setattr(planner.media, "resample", lambda x, a, b: (calls.append(b), resample(x, a, b))[1])
    plan = planner.prepare(req(image=png_bytes(128, 128), audio=wav_bytes(np.zeros(16000, np.float32), 16000)), TINY)
    assert calls == [16000]
    assert len(plan.pcm_out) == plan.job.total_frames * 1920 and calls == [16000, 48000]
    assert plan.pcm_out is plan.pcm_out and calls == [16000, 48000]  # made once


def test_prepare_cuts_audio_to_the_capped_video():
    rate = 16000
    plan = planner.prepare(
        req(
            image=png_bytes(128, 128),
            audio=wav_bytes(np.full(rate * 4, 0.1, np.float32), rate),
            num_clip=1,
            infer_frames=24,
        ),
        TINY,
    )
    assert (plan.job.total_frames, plan.job.num_blocks) == (24, 2)
    assert len(plan.pcm_out) == 24 * 1920 and len(plan.pcm_16k) == 24 * 640
    assert plan.audio_duration_s == pytest.approx(4.0)


def test_prepare_refuses_what_is_not_media():
    with pytest.raises(InvalidInput, match="image"):
        planner.prepare(req(image=b"not an image", audio=wav_bytes(np.zeros(16000, np.float32), 16000)), TINY)
    with pytest.raises(InvalidInput, match="audio"):
        planner.prepare(req(image=png_bytes(128, 128), audio=b"RIFF....garbage"), TINY)


def test_a_preset_never_cuts_the_audio_short():
    """preview used to stop at its num_clip 10 x 36 frames: 14.4 s of a 60 s speech, unsaid."""
    for preset in ("", "preview", "standard", "hd"):
        job = planner.plan_job(req(preset=preset), TINY, 60.0, (512, 512))
        assert (job.total_frames, job.num_blocks) == (1500, 125), preset
    assert planner.plan_job(req(preset="standard"), TINY, 600.0, (512, 512)).total_frames == 15000


def test_a_cut_says_what_cut_it_and_how_to_get_all_of_it():
    audio = wav_bytes(np.zeros(60 * 16000, np.float32), 16000)
    cut = planner.prepare(req(image=png_bytes(128, 128), audio=audio, num_clip=10, infer_frames=32), TINY)
    assert (cut.job.total_frames, cut.audio_duration_s) == (360, 60.0)
    assert cut.truncation == (
        "num_clip 10 x 36 frames cut the video to 14.40 s of the 60.00 s of audio; num_clip 0 renders all of it"
    )
    whole = planner.prepare(req(image=png_bytes(128, 128), audio=audio, preset="preview"), TINY)
    assert whole.job.total_frames == 1500 and whole.truncation == ""


def test_a_returning_portrait_is_decoded_and_fitted_once_per_size(monkeypatch):
    monkeypatch.setattr(planner, "PORTRAIT_SIZES", planner.ResultCache(2))
    monkeypatch.setattr(planner, "FITTED_PORTRAITS", planner.ResultCache(2))
    decoded = []
    load = planner.media.load_image
    monkeypatch.setattr(planner.media, "load_image", lambda data: (decoded.append(len(data)), load(data))[1])
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, format="PNG")
    portrait, audio = buf.getvalue(), wav_bytes(np.zeros(16000, np.float32), 16000)
    first = planner.prepare(req(image=portrait, audio=audio, size="96*64"), TINY)
    again = planner.prepare(req(image=portrait, audio=audio, size="96*64"), TINY)
    assert len(decoded) == 1 and np.array_equal(first.pixels, again.pixels)
    again.pixels[:] = 0  # each plan owns its pixels: the next request still gets the portrait
    assert np.array_equal(planner.prepare(req(image=portrait, audio=audio, size="96*64"), TINY).pixels, first.pixels)
    larger = planner.prepare(req(image=portrait, audio=audio, size="192*128"), TINY)  # another size: fitted anew
    assert len(decoded) == 2 and larger.pixels.shape == (larger.job.height, larger.job.width, 3) != first.pixels.shape
    assert np.array_equal(planner.prepare(req(image=portrait, audio=audio, size="192*128"), TINY).pixels, larger.pixels)
    planner.prepare(req(image=png_bytes(128, 128), audio=audio), TINY)  # a third: the oldest entry goes
    planner.prepare(req(image=portrait, audio=audio, size="96*64"), TINY)
    assert len(decoded) == 4
    for _ in range(2):  # what did not decode is refused every time, never kept
        with pytest.raises(InvalidInput, match="image"):
            planner.prepare(req(image=portrait[:200], audio=audio), TINY)
