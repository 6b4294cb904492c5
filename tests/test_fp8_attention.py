"""FP8 attention (--fp8-attention): the reference arithmetic, the model path on the tiny DiT, the flag."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from ckpt_fixtures.dit import one_torch_thread  # noqa: F401 (autouse)
from test_generator_engine import _inputs, _job

from avatar.errors import InvalidInput
from avatar.presets import GeneratorOptions, ModelSpec
from avatar.services.generator.engine import GeneratorEngine
from avatar.services.generator.fp8_attention import E4M3, fp8_attention, reference, unavailable_reason
from avatar.services.generator.kv_cache import KVCache, KVCacheSpec


def _exact(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("sharpness", [1.0, 4.0])
def test_fp8_attention_is_close_to_exact_attention_over_the_same_fp8_cache(sharpness):
    g = torch.Generator().manual_seed(int(sharpness))
    q = torch.randn(1, 96, 4, 32, generator=g) * sharpness
    k8 = torch.randn(1, 300, 4, 32, generator=g).to(E4M3)
    v8 = torch.randn(1, 300, 4, 32, generator=g).to(E4M3)
    exact = _exact(q, k8.float(), v8.float())  # what bf16 attention over the FP8 cache computes
    got = fp8_attention(q, k8, v8).unflatten(-1, (4, 32))
    assert got.shape == exact.shape and got.dtype == q.dtype and torch.isfinite(got).all()
    err = _rel(got, exact)
    # e4m3 queries, probabilities and output: a few percent on random data, never more than 8%
    assert 0 < err < 0.08, err
    # the probabilities' scale matters: without it, small ones round to zero in e4m3
    descale = q.abs().amax() / 448
    q8 = (q / descale).to(E4M3)
    assert _rel(reference(q8, k8, v8, descale.reshape(1, 1, 1, 1)).float(), exact) < 0.08


def test_the_model_attends_with_fp8_products_only_when_the_cache_says_so():
    spec = KVCacheSpec(num_layers=1, num_heads=2, head_dim=8, frame_tokens=4, window_frames=2, sink_tokens=4)
    assert KVCache(spec, E4M3, "cpu", fp8_attention=True).fp8_attention
    assert not KVCache(spec, E4M3, "cpu").fp8_attention
    with pytest.raises(ValueError, match="as FP8"):
        KVCache(spec, torch.bfloat16, "cpu", fp8_attention=True)


def _blocks(engine, blocks=3):
    text, ref, motion, audio = _inputs(blocks=blocks)
    session = engine.open_session(_job(seed=7), text, ref, motion)
    try:
        assert session.kv.fp8_attention == engine.fp8_attention
        return torch.stack([session.generate_block(a) for a in audio])
    finally:
        session.close()


def test_the_tiny_dit_with_fp8_attention_stays_close_to_bf16_attention_over_the_fp8_cache(monkeypatch):
    fp8kv = GeneratorEngine(
        ModelSpec(name="tiny", seed=0, generator_options=GeneratorOptions(kv_dtype="float8_e4m3fn"))
    )
    options = GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True)
    fp8attn = GeneratorEngine(ModelSpec(name="tiny", seed=0, generator_options=options), dit=fp8kv.dit)
    calls = []
    real = torch.ops.avatar.fp8_sdpa
    monkeypatch.setattr(torch.ops.avatar, "fp8_sdpa", lambda *a: calls.append(a[1].shape) or real(*a))
    got, ref = _blocks(fp8attn), _blocks(fp8kv)
    assert calls and all(c[2:] == (4, 16) for c in calls)  # every layer, every step, over the cache
    assert torch.isfinite(got).all()
    assert 0 < _rel(got, ref) < 0.05, _rel(got, ref)


def test_fp8_attention_needs_the_fp8_cache_and_the_cli_flag_implies_it():
    with pytest.raises(InvalidInput, match="kv_dtype float8_e4m3fn"):
        GeneratorOptions(fp8_attention=True)
    from avatar.app import cli

    parser = argparse.ArgumentParser()
    cli._add_model_flags(parser)
    spec = cli.model_spec(parser.parse_args(["--fp8-attention"]))
    assert spec.generator_options == GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True)
    assert unavailable_reason("cpu") is None  # the CPU runs the reference arithmetic


def test_fp8_attention_says_why_it_cannot_run_on_a_gpu(monkeypatch):
    import builtins
    import sys

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert "Hopper" in unavailable_reason("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real_import = builtins.__import__

    def no_cudnn(name, *a, **k):
        if name == "cudnn":
            raise ImportError("No module named 'cudnn'")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "cudnn", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_cudnn)
    assert "pip install nvidia-cudnn-frontend" in unavailable_reason("cuda:0")


def test_avatar_generate_with_fp8_attention_renders_a_video(tmp_path, env):
    """The flag through the embedded mesh (CPU: the reference arithmetic), real bytes out."""
    import json
    import subprocess

    from conftest import ASSETS, AVATAR, ROOT, check_video

    out = tmp_path / "fp8attn.mp4"
    args = ["generate", "--image", str(ASSETS / "astronaut.png"), "--audio", str(ASSETS / "speech.wav")]
    args += ["--size", "64*64", "--num_clip", "1", "--infer_frames", "24", "--sample_steps", "2", "--seed", "5"]
    args += ["--fp8-attention", "--out", str(out)]
    r = subprocess.run([*AVATAR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    check_video(out, 24 / 25)
    params = json.loads(out.with_suffix(".json").read_text())["parameters"]
    assert params["fp8_attention"] is True and params["kv_fp8"] is False  # implied, not asked
    # it reached the model: the same request over the same FP8 cache with bf16 attention differs
    plain = tmp_path / "kvfp8.mp4"
    args[-3:] = ["--kv-fp8", "--out", str(plain)]
    r = subprocess.run([*AVATAR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    check_video(plain, 24 / 25)
    assert plain.read_bytes() != out.read_bytes()


def test_the_op_returns_what_its_fake_promises():
    """torch.compile plans around the fake's output (shape, dtype, strides): the CPU reference's
    einsum gave other strides, and a compiled DiT with --fp8-attention failed on it."""
    import torch

    from avatar.services.generator import fp8_attention  # noqa: F401 (registers avatar::fp8_sdpa)

    g = torch.Generator().manual_seed(0)
    q8, k8, v8 = (torch.randn(1, n, 4, 16, generator=g).to(torch.float8_e4m3fn) for n in (6, 10, 10))
    checks = torch.library.opcheck(
        torch.ops.avatar.fp8_sdpa.default,
        (q8, k8, v8, torch.full((1, 1, 1, 1), 0.01)),
        test_utils=("test_faketensor", "test_aot_dispatch_dynamic"),
    )
    assert set(checks.values()) == {"SUCCESS"}, checks
