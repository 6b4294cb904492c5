"""The Triton FP8 attention kernel (--fp8-attention-kernel triton) in Triton's interpreter: its
arithmetic against the reference, both of its loaders, the cache's keys-last values, the model and
the flag."""

import argparse

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from ckpt_fixtures.dit import one_torch_thread  # noqa: F401 (autouse)
from test_fp8_attention import _blocks
from triton_interpreter import exact_downcasts

from avatar.errors import InvalidInput
from avatar.presets import GeneratorOptions, ModelSpec
from avatar.services.generator.engine import GeneratorEngine
from avatar.services.generator.fp8_attention import E4M3, reference
from avatar.services.generator.fp8_attention_triton import _exp2_fma, fp8_sdpa_triton, tma_ready
from avatar.services.generator.kv_cache import KVCache, KVCacheSpec


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _keys_last(v: torch.Tensor, spare: int = 16) -> torch.Tensor:
    """v [B, L, H, D] stored as [B, H, D, spare + L + spare] (a span of a longer buffer, as the
    cache's; rows padded to 16 bytes, as the cache's)."""
    b, n, h, d = v.shape
    buf = torch.zeros(b, h, d, -(-(n + 2 * spare) // 16) * 16, dtype=v.dtype)
    out = buf.permute(0, 3, 1, 2)[:, spare : spare + n]
    out.copy_(v)
    return out


def _case(seed: int, batch=2, queries=100, keys=300, heads=2, dim=32, sharpness=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=g) * sharpness
    k8 = torch.randn(batch, keys, heads, dim, generator=g).to(E4M3)
    v8 = torch.randn(batch, keys, heads, dim, generator=g).to(E4M3)
    descale = (q.abs().amax() / 448).reshape(1, 1, 1, 1)
    return (q / descale).to(E4M3), k8, v8, descale


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("config", [(64, 64, 4, 2), (32, 128, 4, 2)])
def test_the_kernel_computes_the_reference_arithmetic(tma, config):
    """Queries and keys not multiples of the tiles (the last tiles partial), two batches: the
    kernel's output is as close to exact attention as the reference's, and close to it."""
    q8, k8, v8, descale = _case(seed=config[1])
    values = _keys_last(v8) if tma else v8
    assert tma_ready(q8, k8, values) == tma
    with exact_downcasts():
        got = fp8_sdpa_triton(q8, k8, values, descale.reshape(1), config, tma=tma)
    ref = reference(q8, k8, v8, descale)
    assert got.shape == ref.shape and got.dtype == E4M3 and got.is_contiguous()
    exact = F.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q8.float() * descale, k8, v8))
    ).transpose(1, 2)
    # the running softmax rounds the probabilities against the running max, the reference against
    # the final one: the same error against exact attention, a few percent apart from each other
    assert _rel(got, exact) < 1.2 * _rel(ref, exact) < 0.06
    assert _rel(got, ref) < 0.04  # (a dropped tail tile or another batch's keys: ~1)


def test_values_as_cached_and_keys_last_give_the_same_codes():
    q8, k8, v8, descale = _case(seed=3, batch=1, queries=70, keys=200)
    with exact_downcasts():
        plain = fp8_sdpa_triton(q8, k8, v8, descale.reshape(1), (64, 64, 4, 2))
        keys_last = fp8_sdpa_triton(q8, k8, _keys_last(v8), descale.reshape(1), (64, 64, 4, 2))
        tma = fp8_sdpa_triton(q8, k8, _keys_last(v8), descale.reshape(1), (64, 64, 4, 2), tma=True)
        ws = fp8_sdpa_triton(q8, k8, _keys_last(v8), descale.reshape(1), (64, 64, 4, 2), warp_specialize=True)
    for other in (keys_last, tma, ws):  # (warp-specialised: the last tile masked inside the loop)
        assert torch.equal(plain.view(torch.uint8), other.view(torch.uint8))


def test_the_kernel_refuses_what_it_cannot_read():
    q8, k8, v8, descale = _case(seed=4, batch=1, dim=24)
    with pytest.raises(ValueError, match="power of two"):
        fp8_sdpa_triton(q8, k8, v8, descale.reshape(1))
    q8, k8, v8, descale = _case(seed=4, batch=1)
    with pytest.raises(ValueError, match="contiguous head dim"):
        fp8_sdpa_triton(q8, k8.transpose(-1, -2).contiguous().transpose(-1, -2), v8, descale.reshape(1))


def test_the_cache_stores_the_triton_kernels_values_keys_last():
    spec = KVCacheSpec(num_layers=2, num_heads=2, head_dim=16, frame_tokens=16, window_frames=3, sink_tokens=32)
    plain = KVCache(spec, E4M3, "cpu", fp8_attention=True)
    kv = KVCache(spec, E4M3, "cpu", fp8_attention=True, fp8_kernel="triton")
    assert kv.values.shape == plain.values.shape and kv.values.stride(-3) == 1  # tokens innermost
    assert kv.values.stride(-1) % 16 == 0  # rows padded to 16 bytes for TMA
    assert kv.nbytes >= plain.nbytes and kv.nbytes - plain.nbytes < 16 * 2 * 2 * 16  # < 16 tokens a row
    span = kv.block_span(0, 0, 1)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 16, 2, 16, generator=g)
    for cache in (plain, kv):  # the model's writes: a block's values, then the sink's round trip
        cache.values[span.group, 1][:, span.write : span.write + 16] = v.to(E4M3)
        cache.load_sink(cache.sink())
    assert torch.equal(kv.values.view(torch.uint8), plain.values.view(torch.uint8))
    values = kv.values[span.group, 1][:, span.lo : span.hi]
    q8 = torch.zeros(1, 16, 2, 16, dtype=E4M3)
    assert tma_ready(q8, kv.keys[span.group, 1][:, span.lo : span.hi], values)
    with pytest.raises(ValueError, match="fp8_kernel"):
        KVCache(spec, E4M3, "cpu", fp8_attention=True, fp8_kernel="flash")


def test_the_tiny_dit_with_the_triton_kernel_matches_it_with_the_reference(monkeypatch):
    """The same blocks through the model, the kernel (interpreter) against the reference that
    stands in for cuDNN on the CPU: the values come keys-last, and the blocks agree."""
    options = GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True)
    cudnn = GeneratorEngine(ModelSpec(name="tiny", seed=0, generator_options=options))
    triton_options = GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True, fp8_attention_kernel="triton")
    triton = GeneratorEngine(ModelSpec(name="tiny", seed=0, generator_options=triton_options), dit=cudnn.dit)
    calls = []
    real = torch.ops.avatar.fp8_sdpa
    monkeypatch.setattr(torch.ops.avatar, "fp8_sdpa", lambda *a: calls.append((a[2].stride(1), a[4])) or real(*a))
    with exact_downcasts():
        got = _blocks(triton, blocks=2)
    assert calls and set(calls) == {(1, "triton")}  # keys-last values, every call
    calls.clear()
    ref = _blocks(cudnn, blocks=2)
    assert calls and {kernel for _, kernel in calls} == {"cudnn"}
    assert torch.isfinite(got).all() and 0 < _rel(got, ref) < 0.05, _rel(got, ref)


def test_the_kernel_flag_and_its_bad_values():
    from avatar.app import cli

    parser = argparse.ArgumentParser()
    cli._add_model_flags(parser)
    triton = GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True, fp8_attention_kernel="triton")
    assert (
        cli.model_spec(parser.parse_args(["--fp8-attention", "--fp8-attention-kernel", "triton"])).generator_options
        == triton
    )
    # naming the kernel asks for FP8 attention (and so the FP8 cache), as --fp8-attention does
    assert cli.model_spec(parser.parse_args(["--fp8-attention-kernel", "triton"])).generator_options == triton
    assert cli.model_spec(parser.parse_args([])).generator_options == GeneratorOptions()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--fp8-attention-kernel", "flash"])
    assert e.value.code == 2
    with pytest.raises(InvalidInput, match="fp8_attention_kernel must be one of cudnn, triton"):
        GeneratorOptions(fp8_attention_kernel="flash")


def test_the_op_with_the_triton_kernel_returns_what_its_fake_promises():
    q8, k8, v8, descale = _case(seed=5, batch=1, queries=20, keys=40, dim=16)
    with exact_downcasts():
        checks = torch.library.opcheck(
            torch.ops.avatar.fp8_sdpa.default,
            (q8, k8, _keys_last(v8), descale, "triton"),
            test_utils=("test_faketensor", "test_aot_dispatch_dynamic"),
        )
    assert set(checks.values()) == {"SUCCESS"}, checks


@pytest.mark.parametrize("impl", ["cudnn", "triton"])
def test_the_op_compiles_with_either_kernel(impl):
    """Inductor lowers the op to a fallback kernel whose create() takes an argument named `kernel`:
    an op argument of that name failed the compiled DiT on the GPU (2026-12-06), so it is `impl`."""
    q8, k8, v8, descale = _case(seed=6, batch=1, queries=20, keys=40, dim=16)
    values = _keys_last(v8) if impl == "triton" else v8

    def attend(q8, k8, v8, descale):
        return torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale * 1.0, impl).float() * 2

    with exact_downcasts():
        compiled = torch.compile(attend, fullgraph=True)(q8, k8, values, descale)
        eager = attend(q8, k8, values, descale)
    assert torch.equal(compiled, eager)


def test_the_triton_kernel_runs_where_fp8_tensor_cores_are(monkeypatch):
    """cuDNN's FP8 attention is Hopper's; the Triton kernel's FP8 dot runs from Ada (8.9: the
    24 GB cards) without the cuDNN frontend. Each says why it cannot run."""
    from avatar.services.generator.fp8_attention import unavailable_reason

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert unavailable_reason("cuda:0", "triton") is None
    assert "--fp8-attention-kernel triton runs from 8.9" in unavailable_reason("cuda:0", "cudnn")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "8.9" in unavailable_reason("cuda:0", "triton")


def test_warp_specialisation_is_refused_where_it_was_wrong_or_cannot_run():
    q8, k8, v8, descale = _case(seed=7, batch=1)
    with pytest.raises(ValueError, match="more than 2 stages"):
        fp8_sdpa_triton(q8, k8, _keys_last(v8), descale.reshape(1), (64, 64, 4, 3), warp_specialize=True)
    with pytest.raises(ValueError, match="TMA kernel's"):
        fp8_sdpa_triton(q8, k8, v8, descale.reshape(1), (64, 64, 4, 2), warp_specialize=True)


def test_avatar_generate_with_the_triton_kernel_renders_a_video(tmp_path, env):
    """The flag through the embedded mesh: on the CPU the kernel runs in Triton's interpreter
    (TRITON_INTERPRET=1, as the tests set it), real bytes out, the choice in the sidecar."""
    import json
    import subprocess

    from conftest import ASSETS, AVATAR, ROOT, check_video

    out = tmp_path / "triton.mp4"
    args = ["generate", "--image", str(ASSETS / "astronaut.png"), "--audio", str(ASSETS / "speech.wav")]
    args += ["--size", "64*64", "--num_clip", "1", "--infer_frames", "24", "--sample_steps", "2", "--seed", "5"]
    args += ["--fp8-attention-kernel", "triton", "--out", str(out)]
    r = subprocess.run(
        [*AVATAR, *args], cwd=ROOT, env={**env, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    check_video(out, 24 / 25)
    assert json.loads(out.with_suffix(".json").read_text())["parameters"]["fp8_attention_kernel"] == "triton"
    bad_out = tmp_path / "bad.mp4"
    bad_args = [*args[:-4], "--fp8-attention-kernel", "flash", "--out", str(bad_out)]
    bad = subprocess.run([*AVATAR, *bad_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'flash'" in bad.stderr and "Traceback" not in bad.stderr
    assert not bad_out.exists()


@triton.jit
def _exp2_fma_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _exp2_fma(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_the_polynomial_exp2_is_within_its_bound_and_underflows_to_zero():
    """_exp2_fma over the range the softmax feeds it (scores minus the running max, plus 8)."""
    x = torch.cat([torch.linspace(-120.0, 8.0, 4001), torch.tensor([-200.0, -1e30, 0.0, 0.5, -0.5, 7.99])])
    y = torch.empty_like(x)
    _exp2_fma_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    exact = torch.exp2(x.double())
    normal = exact > 2.0**-125
    assert ((y.double()[normal] - exact[normal]).abs() / exact[normal]).max() < 1.2e-4
    assert (y[~normal].abs() < 2.0**-120).all()  # far below e4m3's smallest step: rounds to 0


@pytest.mark.parametrize("every", [1, 2])
def test_exponentials_on_the_fma_pipe_change_few_probability_codes(every):
    """Keys spanning an odd number of full tiles and a partial one: the same attention as the
    special-function unit's exp2 up to a few probabilities rounded to the next e4m3 code."""
    q8, k8, v8, descale = _case(seed=5, batch=2, queries=70, keys=64 * 5 + 20)
    with exact_downcasts():
        sfu = fp8_sdpa_triton(q8, k8, _keys_last(v8), descale.reshape(1), (64, 64, 4, 2), tma=True)
        fma = fp8_sdpa_triton(q8, k8, _keys_last(v8), descale.reshape(1), (64, 64, 4, 2), tma=True, fma_exp_every=every)
    ref = reference(q8, k8, v8, descale)
    assert _rel(fma, sfu) < 0.01 and _rel(fma, ref) < 0.04
    assert not torch.equal(fma.view(torch.uint8), sfu.view(torch.uint8)) or every == 0


def test_exponentials_on_the_fma_pipe_need_the_tma_kernel():
    q8, k8, v8, descale = _case(seed=6, batch=1, queries=16, keys=64)
    for kwargs in (
        {"tma": False, "fma_exp_every": 2},
        {"warp_specialize": True, "fma_exp_every": 1},
        {"fma_exp_every": 3},
    ):
        with pytest.raises(ValueError, match="fma_exp_every"):
            fp8_sdpa_triton(q8, k8, _keys_last(v8), descale.reshape(1), (64, 64, 4, 2), **kwargs)
