"""Encoders: umT5 from upstream names, audio features bucketed per video frame, the EncoderEngine contract."""

import json
import pathlib

import numpy as np
import pytest
import torch
from ckpt_fixtures.encoders import write_encoder_files, write_t5, write_tokenizer, write_wav2vec2

from avatar.errors import InvalidInput, WeightsError
from avatar.presets import MODEL_DIMS, EncoderOptions, ModelSpec
from avatar.services.encoder.audio_encoder import AudioEncoder, bucket_features, frame_indices, resample_features
from avatar.services.encoder.engine import REF_REPEAT, EncoderEngine
from avatar.services.encoder.text_encoder import (
    TEXT_LEN,
    TINY_T5,
    UMT5_XXL,
    TextEncoder,
    expected_upstream_shapes,
    infer_dims,
    upstream_key_map,
)

KEYS = pathlib.Path(__file__).parent / "data" / "keys"
SR = 16000


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (
        0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2 + 0.05 * rng.standard_normal(t.size)
    ).astype(np.float32)


@pytest.fixture(scope="module")
def engine() -> EncoderEngine:
    return EncoderEngine(ModelSpec(name="tiny", seed=0, encoder_options=EncoderOptions(clip_image=True)))


# -- umT5 ---------------------------------------------------------------------------------------


def test_full_size_t5_names_and_shapes_equal_upstream_manifest():
    manifest = {name: tuple(shape) for name, shape, _ in json.loads((KEYS / "umt5_xxl_enc.json").read_text())}
    assert expected_upstream_shapes(UMT5_XXL) == manifest
    assert infer_dims(manifest) == UMT5_XXL  # 24 layers, 64 heads (from pos_embedding), ffn 10240
    with torch.device("meta"):
        model = UMT5_XXL.build()
    mapped = set(upstream_key_map(model).values())
    assert set(model.state_dict()) - mapped == {"encoder.embed_tokens.weight"}  # the tied copy of shared


def test_tiny_t5_checkpoint_loads_strictly_and_runs(tmp_path):
    ckpt, tok = write_t5(tmp_path, seed=5), write_tokenizer(tmp_path)
    source = torch.load(ckpt, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in source.values())
    enc = TextEncoder.from_upstream(ckpt, tok, dtype=torch.float32)
    assert enc.dims == TINY_T5
    loaded = enc.model.state_dict()
    for up, name in upstream_key_map(enc.model).items():
        assert torch.equal(loaded[name], source[up].float()), up
    assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight
    ids = enc.token_ids("A person  talking &amp; smiling")
    assert ids[-1] == 1 and ids == enc.token_ids("A person talking & smiling")
    out = enc.encode("A person talking & smiling")
    assert out.shape == (len(ids), TINY_T5.dim) and torch.isfinite(out).all()
    # every layer has its own relative position bias: zeroing layer 1's changes the output
    enc.model.encoder.block[1].layer[0].SelfAttention.relative_attention_bias.weight.data.zero_()
    assert not torch.allclose(enc.encode("A person talking & smiling"), out)


def test_prompt_lengths():
    enc = TextEncoder.tiny(0)
    assert enc.encode("").shape == (1, TINY_T5.dim)  # just </s>
    assert enc.encode("word " * 400).shape == (MODEL_DIMS["tiny"].text_len, TINY_T5.dim)  # the tiny DiT's text_len
    assert TextEncoder(enc.model, enc.tokenizer, enc.dims).encode("word " * 400).shape == (TEXT_LEN, TINY_T5.dim)
    with pytest.raises(InvalidInput):
        enc.encode(None)


def test_concurrent_prompts_match_sequential_ones():
    from concurrent.futures import ThreadPoolExecutor

    enc = TextEncoder.tiny(0)
    prompts = [f"speaker {i} " * (i % 5 + 1) for i in range(24)]
    expected = [enc.encode(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(enc.encode, prompts))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_t5_missing_key_is_named(tmp_path):
    ckpt, tok = write_t5(tmp_path), write_tokenizer(tmp_path)
    sd = torch.load(ckpt, weights_only=True)
    del sd["blocks.1.pos_embedding.embedding.weight"]
    torch.save(sd, ckpt)
    with pytest.raises(WeightsError, match=r"missing keys: blocks\.1\.pos_embedding\.embedding\.weight") as err:
        TextEncoder.from_upstream(ckpt, tok)
    assert str(ckpt) in str(err.value)


# -- audio --------------------------------------------------------------------------------------


def test_frame_indices_follow_upstream_rounding():
    assert frame_indices(0, 9, 25).tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 10]
    # upstream Wan2.2-S2V at 16 fps: round-half-to-even gives 8 (not 7) for frame 4
    assert frame_indices(0, 12, 16).tolist() == [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19, 21]
    assert frame_indices(12, 3, 25).tolist() == frame_indices(0, 15, 25)[12:].tolist()


def test_resampling_is_linear_with_aligned_corners():
    t50 = 101
    z = torch.arange(t50, dtype=torch.float32).view(1, t50, 1).repeat(2, 1, 3)
    z30 = resample_features(z)
    n = int(t50 / 50 * 30)
    assert z30.shape == (2, n, 3)
    expected = torch.arange(n, dtype=torch.float32) * (t50 - 1) / (n - 1)
    assert torch.allclose(z30[0, :, 0], expected, atol=1e-4)


def test_ten_seconds_of_audio_at_25_fps():
    enc = AudioEncoder.tiny(0)
    pcm = _speech_like(10.0)
    z = enc.hidden_states(pcm)
    assert z.shape == (5, 499, 32)  # 5 hidden states, 50 Hz (upstream's worked example: 499)
    chunks = list(enc.encode(pcm, fps=25, total_frames=260, chunk_frames=12))
    assert [f for f, _ in chunks] == list(range(0, 260, 12))
    assert [c.shape[0] for _, c in chunks] == [12] * 21 + [8]
    feats = torch.cat([c for _, c in chunks])
    z30 = resample_features(z)
    assert z30.shape[1] == 299
    # frame i takes 30 Hz frame round(1.2 i); 1.2 * 249 = 298.8 -> 299 is past the end: zeros from there
    assert torch.allclose(feats[248], z30[:, 298], atol=1e-5)
    assert feats[249:].abs().sum() == 0 and feats[:249].abs().sum(dim=(1, 2)).min() > 0
    # streamed chunk by chunk = resampling and bucketing the whole audio at once
    assert torch.allclose(feats, bucket_features(z30, 0, 260, 25), atol=1e-5)


def test_chunks_gathered_in_the_model_dtype_equal_interpolating_float32_copies():
    # On a GPU the hidden states stay there in bf16 and each chunk gathers its frames before
    # widening them; the features must be exactly those of widening the whole states first.
    from avatar.services.encoder.audio_encoder import TINY_AUDIO

    enc = AudioEncoder.random(TINY_AUDIO, seed=3, dtype=torch.bfloat16)
    pcm = _speech_like(3.0)
    states = enc.device_hidden_states(pcm)
    assert states.dtype == torch.bfloat16
    whole = enc.hidden_states(pcm)
    assert whole.dtype == torch.float32 and torch.equal(whole, states.float())
    t50, fps = whole.shape[1], 25
    t30 = int(t50 / 50 * 30)
    scale = torch.tensor((t50 - 1) / (t30 - 1), dtype=torch.float32)
    chunks = list(enc.encode(pcm, fps=fps, total_frames=72, chunk_frames=12))
    assert [f for f, _ in chunks] == list(range(0, 72, 12))
    for first, feats in chunks:
        src = torch.from_numpy(frame_indices(first, feats.shape[0], fps)).float() * scale
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=t50 - 1)
        lam = (src - lo.float()).view(1, -1, 1)
        expected = (whole[:, lo] * (1 - lam) + whole[:, hi] * lam).transpose(0, 1)
        assert feats.dtype == torch.float32 and torch.equal(feats, expected), first


def test_long_audio_is_encoded_in_windows_and_streamed(monkeypatch):
    base = AudioEncoder.tiny(0)
    enc = AudioEncoder(base.backend, base.model, base.feature_extractor, window_s=4.0, context_s=1.0)
    pcm = _speech_like(12.0)
    whole = base.hidden_states(pcm)  # 12 s < base's 60 s window: one pass, as upstream
    seen = []
    run = enc._wav2vec2
    monkeypatch.setattr(enc, "_wav2vec2", lambda v: (seen.append(len(v)), run(v))[1])
    windowed = enc.hidden_states(pcm)
    assert windowed.shape == whole.shape == (5, 599, 32)
    assert max(seen) == 199 * 320 + 400 and len(seen) == 6  # 200 frames (4 s) per window, 100 new: ceil(599 / 100)
    # away from nothing but attention context, windows agree closely with the single pass
    assert (windowed - whole).abs().max() < 0.05 * whole.abs().max()
    seen.clear()
    chunks = enc.encode(pcm, fps=25, total_frames=300)
    first, feats = next(chunks)
    assert first == 0 and feats.shape == (12, 5, 32) and len(seen) == 1  # the first chunk needs one window
    assert sum(c.shape[0] for _, c in chunks) == 300 - 12 and len(seen) == 6


def test_wav2vec2_folder_loads_like_the_model_it_holds(tmp_path):
    folder = write_wav2vec2(tmp_path, seed=2)
    for name in ("config.json", "preprocessor_config.json", "vocab.json", "model.safetensors"):
        assert (folder / name).is_file(), name
    pcm = _speech_like(1.0)
    loaded = AudioEncoder.from_pretrained(folder)
    assert torch.allclose(loaded.hidden_states(pcm), AudioEncoder.tiny(2).hidden_states(pcm), atol=1e-6)


def test_whisper_backend_windows_long_audio():
    enc = AudioEncoder.tiny(0, backend="whisper")
    z = enc.hidden_states(_speech_like(31.0))
    assert z.shape == (5, 31 * 50, 32)
    first, feats = next(enc.encode(_speech_like(2.0), fps=25, total_frames=12))
    assert first == 0 and feats.shape == (12, 5, 32)


@pytest.mark.parametrize(
    "pcm, why",
    [
        (np.zeros((100, 2), np.float32), "mono"),
        (np.zeros(16000, np.int16), "float"),
        (np.zeros(100, np.float32), "too short"),
        (np.full(16000, np.nan, np.float32), "NaN"),
    ],
)
def test_bad_audio_is_rejected(pcm, why):
    with pytest.raises(InvalidInput, match=why):
        AudioEncoder.tiny(0).hidden_states(pcm)


# -- engine -------------------------------------------------------------------------------------


def test_engine_image_latents_follow_upstream(engine):
    img = np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    ref, motion = engine.encode_image(img)
    assert ref.shape == (16, 1, 2, 4) and motion.shape == (16, 1, 2, 4)  # one latent stands for all 19
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None, :, None] / 255 * 2 - 1
    assert torch.allclose(ref, engine.vae.encode(x.repeat(1, 1, REF_REPEAT, 1, 1))[0, :, 1:], atol=1e-6)
    # the motion context: the last 19 latents of upstream's 365-frame still video, all at the
    # causal fixed point (encode_still iterates the groups until it; encode_steady is one pass)
    still = engine.vae.encode_still(x, REF_REPEAT * 73)[0, :, -19:]
    assert torch.allclose(motion.expand_as(still), still, atol=1e-5)
    assert not torch.allclose(motion, ref)


@pytest.mark.parametrize(
    "bad", [np.zeros((32, 32, 3), np.float32), np.zeros((32, 32), np.uint8), np.zeros((40, 32, 3), np.uint8)]
)
def test_engine_rejects_bad_images(engine, bad):
    with pytest.raises(InvalidInput):
        engine.encode_image(bad)


def test_engine_text_audio_and_clip(engine):
    assert engine.encode_text("hello").shape == (6, 32)
    chunks = list(engine.encode_audio(_speech_like(1.0), fps=25, total_frames=30))
    assert [(f, c.shape) for f, c in chunks] == [(0, (12, 5, 32)), (12, (12, 5, 32)), (24, (6, 5, 32))]
    assert engine.clip_embedding(np.zeros((64, 48, 3), np.uint8)).shape == (32,)
    with pytest.raises(InvalidInput, match="--clip-image"):
        EncoderEngine(ModelSpec()).clip_embedding(np.zeros((32, 32, 3), np.uint8))


def test_engine_whisper_backend():
    eng = EncoderEngine(ModelSpec(encoder_options=EncoderOptions(audio_encoders=("whisper",))))
    ((_, feats),) = list(eng.encode_audio(_speech_like(0.5), fps=25, total_frames=12, backend="whisper"))
    assert feats.shape == (12, 5, 32)


def test_engine_from_folder_checks_dims(tmp_path):
    write_encoder_files(tmp_path)
    with pytest.raises(WeightsError, match="text encoder width 32 != the model's text_dim 4096"):
        EncoderEngine(ModelSpec(name="s2v-14b", ckpt_dir=str(tmp_path)))
    with pytest.raises(WeightsError, match="needs --ckpt_dir"):
        EncoderEngine(ModelSpec(name="s2v-14b"))


def test_random_t5_filled_on_its_device_is_finite_and_tied():
    """The path `--random-weights` takes on a GPU (allocated and filled on the device), run on CPU."""
    from avatar.services.encoder.text_encoder import TINY_T5, TextEncoder, filled_on_device

    model = filled_on_device(TINY_T5, 3, "cpu", torch.float32)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert all(p.device.type == "cpu" for p in model.parameters())
    enc = TextEncoder(model, TextEncoder.tiny().tokenizer, TINY_T5, 16)
    out = enc.encode("a talking astronaut")
    assert out.shape[1] == TINY_T5.dim and torch.isfinite(out).all()
    again = TextEncoder(filled_on_device(TINY_T5, 3, "cpu", torch.float32), enc.tokenizer, TINY_T5, 16)
    assert torch.equal(again.encode("a talking astronaut"), out)  # seeded


def test_repeated_portraits_and_prompts_come_from_the_cache(engine, monkeypatch):
    rng = np.random.default_rng(7)
    img, other = (rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for _ in range(2))
    calls = []
    real = engine.vae.encode_steady
    monkeypatch.setattr(engine.vae, "encode_steady", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = engine.encode_image(img)
    n = len(calls)
    again = engine.encode_image(img.copy())  # same pixels, another array: no VAE work
    assert len(calls) == n and all(torch.equal(a, b) for a, b in zip(first, again))
    different = engine.encode_image(other)  # one pixel set apart is another image
    assert len(calls) == 2 * n and not torch.equal(different[0], first[0])
    flipped = img.copy()
    flipped[0, 0, 0] ^= 1
    engine.encode_image(flipped)
    assert len(calls) == 3 * n
    # the same bytes as a 32x16 image are another input
    assert engine.encode_image(img.reshape(32, 16, 3))[0].shape == (16, 1, 4, 2) and len(calls) == 4 * n
    text_calls = []
    real_text = engine.text.encode
    monkeypatch.setattr(engine.text, "encode", lambda p: text_calls.append(p) or real_text(p))
    a, b = engine.encode_text("a calm host"), engine.encode_text("a calm host")
    assert text_calls == ["a calm host"] and torch.equal(a, b)
    engine.encode_text("an angry host")
    assert text_calls == ["a calm host", "an angry host"]
