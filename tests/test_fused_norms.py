"""--fused-norms: the Triton kernels of services/generator/fused_norms.py against the block's own
torch arithmetic, run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, conftest.py) with
the interpreter's float casts made to round as a GPU does (tests/triton_interpreter.py)."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from ckpt_fixtures.dit import one_torch_thread  # noqa: F401 (autouse)
from test_generator_engine import _generate, _job
from triton_interpreter import exact_downcasts

from avatar.errors import InvalidInput
from avatar.presets import GeneratorOptions, ModelSpec
from avatar.services.generator import fused_norms
from avatar.services.generator.causal_s2v_dit import _gate, _modulate
from avatar.services.generator.engine import GeneratorEngine, build_generator_model
from avatar.services.generator.fp8 import E4M3_MAX, RowProduct, apply_scales, quantize, swap_linears_to_fp8
from avatar.services.generator.weights import random_dit

pytestmark = pytest.mark.skipif(fused_norms.triton is None, reason="needs triton (requirements-dev.txt)")

B, L, G, C = 2, 12, 3, 96  # C not a power of two: the kernels mask the row's tail


@pytest.fixture(autouse=True)
def _gpu_rounding():
    with exact_downcasts():
        yield


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, C, generator=g).bfloat16()
    y = torch.randn(B, L, C, generator=g).bfloat16()
    mod = torch.randn(B, G, 6, C, generator=g) * 0.3
    w, b = torch.randn(C, generator=g).bfloat16(), torch.randn(C, generator=g).bfloat16()
    return x, y, mod, w, b


def _assert_same_codes(rows, expected_bf16):
    q, s = quantize(expected_bf16.reshape(-1, expected_bf16.shape[-1]), "row")
    assert rows.codes.shape == expected_bf16.shape and rows.scale.shape == (*expected_bf16.shape[:-1], 1)
    assert torch.equal(rows.scale.reshape(-1, 1), s)
    assert torch.equal(rows.codes.reshape(q.shape).view(torch.uint8), q.view(torch.uint8))


def test_the_first_norm_is_the_blocks_layer_norm_modulation_and_row_quantisation():
    x, _, mod, _, _ = _inputs()
    x_out, rows = fused_norms.norm_quantize(x, mod, 1e-6, shift=0, scale=1, round_norm=True)
    assert x_out is None
    normed = F.layer_norm(x.float(), (C,), eps=1e-6).bfloat16()  # FP32LayerNorm: back to x's dtype
    _assert_same_codes(rows, _modulate(normed, mod[:, :, 0], mod[:, :, 1]).bfloat16())


def test_the_cross_attention_norm_adds_the_gated_residual_and_keeps_it_in_float32():
    x, y, mod, w, b = _inputs(1)
    x_out, rows = fused_norms.norm_quantize(x, mod, 1e-6, residual=y, gate=2, weight=w, bias=b, round_input=True)
    residual = x.float() + _gate(y, mod[:, :, 2])
    assert x_out.dtype == torch.float32 and torch.equal(x_out, residual)
    normed = F.layer_norm(residual.bfloat16().float(), (C,), w.float(), b.float(), eps=1e-6)
    _assert_same_codes(rows, normed.bfloat16())


def test_the_ffn_norm_adds_an_ungated_residual_to_a_float32_stream():
    x, y, mod, _, _ = _inputs(2)
    stream = x.float() * 3
    x_out, rows = fused_norms.norm_quantize(stream, mod, 1e-6, residual=y, shift=3, scale=4)
    residual = stream + y.float()
    assert torch.equal(x_out, residual)
    normed = F.layer_norm(residual, (C,), eps=1e-6)  # float32 in, float32 out: no rounding before modulation
    _assert_same_codes(rows, _modulate(normed, mod[:, :, 3], mod[:, :, 4]).bfloat16())


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy's exp in the interpreter; GPUs give inf
def test_gelu_quantize_is_the_tanh_gelu_then_row_quantisation_and_saturates():
    _, y, _, _, _ = _inputs(3)
    y = torch.cat([y, torch.full((1, L, C), 60.0).bfloat16(), torch.full((1, L, C), -60.0).bfloat16()])
    rows = fused_norms.gelu_quantize(y)
    expected = F.gelu(y, approximate="tanh")
    assert torch.isfinite(rows.codes.float()).all()
    q, s = quantize(expected.reshape(-1, C), "row")
    # tanh from exp() and torch's tanh may land on either side of a bf16 rounding step
    got = rows.codes.reshape(-1, C).float() * rows.scale.reshape(-1, 1)
    assert torch.allclose(rows.scale.reshape(-1, 1), s, rtol=1e-2)
    assert torch.allclose(got, q.float() * s, rtol=0.07, atol=float(s.max()) / 2)
    assert (rows.codes.reshape(-1, C).view(torch.uint8) != q.view(torch.uint8)).float().mean() < 0.01


@pytest.mark.parametrize("bias", [True, False])
def test_gelu_quantize_of_a_product_before_its_scales_is_gelu_quantize_of_the_layers_output(bias):
    """The FFN's first product from cuBLAS's tensorwise kernel (FP8Linear.product): the kernel
    applies the row and column scales and the bias, rounds to bf16 as the layer's output would be,
    then GELU and quantisation as before: the same codes as gelu_quantize(apply_scales(p))."""
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(B, L, C, generator=g) * 40).bfloat16()
    p = RowProduct(
        z,
        torch.rand(B, L, 1, generator=g) * 0.05 + 0.01,
        torch.rand(C, generator=g) * 0.05 + 0.01,
        torch.randn(C, generator=g).bfloat16() if bias else None,
    )
    rows, expected = fused_norms.gelu_quantize(p), fused_norms.gelu_quantize(apply_scales(p))
    assert torch.equal(rows.scale, expected.scale)
    assert torch.equal(rows.codes.view(torch.uint8), expected.codes.view(torch.uint8))
    unscaled = fused_norms.gelu_quantize(z)
    assert not torch.equal(rows.codes.view(torch.uint8), unscaled.codes.view(torch.uint8))
    with pytest.raises(ValueError, match="scales"):
        fused_norms.gelu_quantize(p._replace(col_scale=p.col_scale[:-1]))


@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_rms_rope_is_the_attentions_rms_norm_then_rope_as_the_cache_stores_it(cache):
    from avatar.services.generator.causal_s2v_dit import RMSNorm, apply_rope, rope_grid
    from avatar.services.generator.kv_cache import to_cache_dtype

    heads, head_dim = 4, 16
    rope = rope_grid(head_dim, range(5, 8), range(2), range(2), "cpu")  # 3 frames of 2 x 2 tokens
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(B, rope.cos.shape[0], heads * head_dim, generator=g) * 3).bfloat16()
    norm = RMSNorm(heads * head_dim, 1e-6).bfloat16()
    norm.weight.data = (torch.randn(heads * head_dim, generator=g) * 400).bfloat16()  # past e4m3's 448
    fp8 = cache == "fp8"
    got = fused_norms.rms_rope(x, norm.weight, rope.cos, rope.sin, 1e-6, fp8)
    expected = apply_rope(norm(x).unflatten(-1, (heads, -1)), rope).flatten(2)
    if fp8:
        assert expected.abs().max() > E4M3_MAX  # the clamp is exercised
        expected = to_cache_dtype(expected, torch.float8_e4m3fn)
    assert got.dtype == expected.dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    with pytest.raises(ValueError, match="cos/sin must be"):
        fused_norms.rms_rope(x[:, :-1], norm.weight, rope.cos, rope.sin, 1e-6)


def test_rms_rope_fp8_is_rms_rope_at_a_scale_fixed_by_the_norms_weight():
    """The FP8 attention's queries straight from the norm's kernel: rms_rope's bf16 values divided
    by descale = sqrt(C) * 1.02 * max|w| / 448 and cast, no reduction over the queries; the bound
    holds for the worst row (all of a row's energy in one channel of the largest weight)."""
    from avatar.services.generator.causal_s2v_dit import rope_grid

    rope = rope_grid(16, range(3), range(2), range(2), "cpu")
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(B, rope.cos.shape[0], 64, generator=g) * 3).bfloat16()
    w = (torch.randn(64, generator=g) * 5).bfloat16()
    x[0, 0] = 0
    x[0, 0, int(w.abs().argmax())] = 7  # one channel holds the row: |out| reaches the bound's sqrt(C) * max|w|
    q8, descale = fused_norms.rms_rope_fp8(x, w, rope.cos, rope.sin, 1e-6)
    q = fused_norms.rms_rope(x, w, rope.cos, rope.sin, 1e-6)
    expected_descale = torch.tensor(fused_norms.query_bound_per_weight(64)) * w.abs().max().float() / E4M3_MAX
    assert descale.shape == (1, 1, 1, 1) and descale.item() == expected_descale.item()
    expected = (q.float() / descale.reshape(())).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    assert q8.dtype == torch.float8_e4m3fn and torch.equal(q8.view(torch.uint8), expected.view(torch.uint8))
    assert q.abs().max() > 0.9 * 64**0.5 * w.abs().max()  # the worst row is near the bound ...
    assert (q.float() / descale.reshape(())).abs().max() <= E4M3_MAX  # ... and fits: nothing clamped
    assert (q8.float().abs() > 0).float().mean() > 0.95
    assert ((q8.float() * descale - q.float()).norm() / q.float().norm()).item() < 0.04  # e4m3's rounding
    with pytest.raises(ValueError, match="cos/sin must be"):
        fused_norms.rms_rope_fp8(x[:, :-1], w, rope.cos, rope.sin, 1e-6)


@pytest.mark.parametrize("values_layout", ["rows", "keys-last"])
@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_kv_into_cache_writes_the_blocks_keys_and_values_into_their_rows_only(cache, values_layout):
    """One kernel for a block's keys (rms_rope) and values, written into rows [write, write + L)
    of a layer's cache buffers as the unfused code's rms_rope + to_cache_dtype + slice copies;
    the values also into a keys-last cache (the Triton FP8 attention's), whose rows are columns."""
    from avatar.services.generator.causal_s2v_dit import rope_grid
    from avatar.services.generator.kv_cache import to_cache_dtype

    heads, head_dim, rows, write = 4, 16, 30, 7
    dtype = torch.float8_e4m3fn if cache == "fp8" else torch.bfloat16
    rope = rope_grid(head_dim, range(5, 8), range(2), range(2), "cpu")
    n = rope.cos.shape[0]
    g = torch.Generator().manual_seed(9)
    k, v = ((torch.randn(B, n, heads * head_dim, generator=g) * 300).bfloat16() for _ in range(2))  # past 448
    w = torch.randn(heads * head_dim, generator=g).bfloat16()
    keys, values = ((torch.randn(B, rows, heads, head_dim, generator=g) * 3).to(dtype) for _ in range(2))
    if values_layout == "keys-last":  # [B, H, D, T] in memory, a span of a longer buffer
        values = torch.cat([values, values[:, :3]], 1).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[:, :rows]
        assert values.stride(1) == 1 and not values.is_contiguous()
    before_k, before_v = keys.clone(), values.clone()
    fused_norms.kv_into_cache(k, v, w, rope.cos, rope.sin, 1e-6, keys, values, write)
    expected_k = fused_norms.rms_rope(k, w, rope.cos, rope.sin, 1e-6, cache == "fp8").unflatten(-1, (heads, -1))
    expected_v = to_cache_dtype(v, dtype).unflatten(-1, (heads, -1))
    for got, expected, before in ((keys, expected_k, before_k), (values, expected_v, before_v)):
        assert torch.equal(
            got[:, write : write + n].contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8)
        )
        got[:, write : write + n] = before[:, write : write + n]
        assert torch.equal(
            got.contiguous().view(torch.uint8), before.contiguous().view(torch.uint8)
        )  # nothing else written
    with pytest.raises(ValueError, match="outside keys"):
        fused_norms.kv_into_cache(k, v, w, rope.cos, rope.sin, 1e-6, keys, values, rows - n + 1)
    heads_last = values.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).transpose(2, 3)  # [B, D, H, T]
    with pytest.raises(ValueError, match="values must be"):
        fused_norms.kv_into_cache(k, v, w, rope.cos, rope.sin, 1e-6, keys, heads_last, write)
    with pytest.raises(ValueError, match="keys must be"):  # keys-last keys: not what attention reads
        fused_norms.kv_into_cache(k, v, w, rope.cos, rope.sin, 1e-6, keys.transpose(2, 3), values, write)
    with pytest.raises(ValueError, match="v must be"):
        fused_norms.kv_into_cache(k, v[:, :, :-1], w, rope.cos, rope.sin, 1e-6, keys, values, write)


@pytest.mark.parametrize("values_layout", ["rows", "keys-last"])
def test_the_kernels_read_q_k_and_v_in_place_as_column_slices_of_one_product(values_layout):
    """q, k and v of one GEMM (use_fused_norms(qkv_gemm=True)) are column slices of its [B, L, 3C]
    output: rms_rope, rms_rope_fp8 and kv_into_cache read their rows where they are (no copy) and
    give what they give for contiguous tensors."""
    from avatar.services.generator.causal_s2v_dit import rope_grid

    heads, head_dim, rows, write = 4, 16, 20, 5
    c = heads * head_dim
    rope = rope_grid(head_dim, range(2, 5), range(2), range(2), "cpu")
    n = rope.cos.shape[0]
    g = torch.Generator().manual_seed(12)
    qkv = (torch.randn(B, n, 3 * c, generator=g) * 3).bfloat16()
    q, k, v = qkv.chunk(3, dim=-1)
    assert not k.is_contiguous() and fused_norms._rows(k) == (k, 3 * c)
    transposed = k.transpose(0, 1).contiguous().transpose(0, 1)  # rows not evenly spaced: copied
    assert fused_norms._rows(transposed)[0].is_contiguous() and fused_norms._rows(transposed)[1] == c
    w = torch.randn(c, generator=g).bfloat16()
    for fp8 in (False, True):
        got, expected = (fused_norms.rms_rope(t, w, rope.cos, rope.sin, 1e-6, fp8) for t in (q, q.contiguous()))
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    fp8_queries = (fused_norms.rms_rope_fp8(t, w, rope.cos, rope.sin, 1e-6) for t in (q, q.clone()))
    (got, got_s), (expected, expected_s) = fp8_queries
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)) and torch.equal(got_s, expected_s)
    caches = []
    for kk, vv in ((k, v), (k.contiguous(), v.contiguous())):
        keys, values = (torch.zeros(B, rows, heads, head_dim, dtype=torch.float8_e4m3fn) for _ in range(2))
        if values_layout == "keys-last":
            values = values.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        fused_norms.kv_into_cache(kk, vv, w, rope.cos, rope.sin, 1e-6, keys, values, write)
        caches.append([t.contiguous().view(torch.uint8) for t in (keys, values)])
    assert all(torch.equal(a, b) for a, b in zip(*caches)) and caches[0][1].any()


@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_rope_into_writes_the_rotated_reference_keys_into_the_sink_rows_only(cache):
    """The reference keys of every layer at this call's RoPE frame, written into one cache set's
    sink rows (a strided view of the buffer) as rotated_reference_keys computes them; the rows
    around them untouched."""
    from avatar.services.generator.causal_s2v_dit import rope_grid, rotated_reference_keys

    layers, heads, head_dim, s0, buffer = 3, 4, 16, 5, 20
    dtype = torch.float8_e4m3fn if cache == "fp8" else torch.bfloat16
    rope = rope_grid(head_dim, range(9, 10), range(2), range(3), "cpu")  # one frame of 2 x 3 tokens
    n = rope.cos.shape[0]
    g = torch.Generator().manual_seed(8)
    ref_k = (torch.randn(layers, B, n, heads, head_dim, generator=g) * 300).to(dtype)
    keys = (torch.randn(2, layers, B, buffer, heads, head_dim, generator=g) * 3).to(dtype)
    before = keys.clone()
    fused_norms.rope_into(ref_k, rope.cos, rope.sin, keys[1, :, :, s0 : s0 + n])
    expected = rotated_reference_keys(ref_k, rope.cos, rope.sin, torch.bfloat16)
    if cache == "fp8":
        assert rotated_reference_keys(ref_k.bfloat16(), rope.cos, rope.sin, torch.bfloat16).abs().max() > E4M3_MAX
    got = keys[1, :, :, s0 : s0 + n]
    assert got.dtype == expected.dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    keys[1, :, :, s0 : s0 + n] = before[1, :, :, s0 : s0 + n]
    assert torch.equal(keys.view(torch.uint8), before.view(torch.uint8))  # nothing else written
    with pytest.raises(ValueError, match="out must be"):
        fused_norms.rope_into(ref_k, rope.cos, rope.sin, keys[1, :, :, s0 : s0 + n - 1])
    with pytest.raises(ValueError, match="cos/sin must be"):
        fused_norms.rope_into(ref_k[:, :, :-1], rope.cos, rope.sin, keys[1, :, :, s0 : s0 + n - 1])


def test_each_op_returns_what_its_fake_promises():
    """torch.compile plans around the fakes' outputs (shapes, dtypes, strides) and traces the ops
    with dynamic shapes; opcheck runs both against the kernels."""
    from avatar.services.generator.causal_s2v_dit import rope_grid

    x, y, mod, w, b = _inputs(5)
    rope = rope_grid(16, range(3), range(2), range(2), "cpu")
    calls = {
        torch.ops.avatar.norm_quantize.default: [
            (x, mod, None, None, None, 1e-6, 0, 1, -1, False, True),
            (x, mod, y, w, b, 1e-6, -1, -1, 2, True, False),
        ],
        torch.ops.avatar.gelu_quantize.default: [(y,)],
        torch.ops.avatar.rms_rope.default: [(x, w, rope.cos, rope.sin, 1e-6, fp8) for fp8 in (False, True)],
        torch.ops.avatar.rms_rope_fp8.default: [(x, w, rope.cos, rope.sin, 1e-6)],
        torch.ops.avatar.kv_into_cache.default: [
            (x, y, w, rope.cos, rope.sin, 1e-6, *(torch.zeros(B, 20, 4, 24, dtype=dtype) for _ in "kv"), 3)
            for dtype in (torch.bfloat16, torch.float8_e4m3fn)
        ]
        + [  # keys-last values (the Triton FP8 attention's cache)
            (
                x,
                y,
                w,
                rope.cos,
                rope.sin,
                1e-6,
                torch.zeros(B, 20, 4, 24, dtype=torch.float8_e4m3fn),
                torch.zeros(B, 4, 24, 20, dtype=torch.float8_e4m3fn).permute(0, 3, 1, 2),
                3,
            )
        ],
    }
    for op, arg_sets in calls.items():
        for args in arg_sets:
            checks = torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
            assert set(checks.values()) == {"SUCCESS"}, (op, checks)


def test_zero_rows_get_zero_codes_and_the_smallest_scale():
    x = torch.zeros(1, 3, C).bfloat16()
    _, rows = fused_norms.norm_quantize(x, torch.zeros(1, 1, 6, C), 1e-6, shift=0, scale=1, round_norm=True)
    assert (rows.codes.float() == 0).all() and torch.equal(rows.scale, torch.full((1, 3, 1), 1e-12 / E4M3_MAX))


def test_bad_modulation_shapes_are_refused():
    x, _, mod, _, _ = _inputs()
    with pytest.raises(ValueError, match="mod has 2 vectors per group: shift/scale/gate 0/1/2"):
        fused_norms.norm_quantize(x, mod[:, :, :2].contiguous(), 1e-6, shift=0, scale=1, residual=x, gate=2)
    with pytest.raises(ValueError, match="mod must be float32"):
        fused_norms.norm_quantize(x, mod[:, :, :, :-1].contiguous(), 1e-6)
    with pytest.raises(ValueError, match="mod must be float32"):
        fused_norms.norm_quantize(x, mod.bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="mod must be float32"):
        fused_norms.norm_quantize(x[:, :10], mod, 1e-6)  # 3 groups do not divide 10 tokens


def test_a_transposed_input_gives_the_same_codes():
    x, _, mod, _, _ = _inputs()
    channel_major = x.transpose(1, 2).contiguous().transpose(1, 2)  # the first layer's input is laid out so
    _, expected = fused_norms.norm_quantize(x, mod, 1e-6, shift=0, scale=1, round_norm=True)
    _, got = fused_norms.norm_quantize(channel_major, mod, 1e-6, shift=0, scale=1, round_norm=True)
    assert torch.equal(got.codes.view(torch.uint8), expected.codes.view(torch.uint8))


def _blocks(dit, n=3):
    """n blocks of test_generator_engine's session (its job and seeded inputs) on `dit`."""
    return [b.float() for b in _generate(GeneratorEngine(ModelSpec(), dit=dit), _job(), blocks=n)]


def _fp8_dit():
    dit = random_dit("tiny", "cpu", torch.bfloat16, seed=0)
    swap_linears_to_fp8(dit)
    return dit


def test_every_block_and_injection_call_of_a_session_matches_the_unfused_one(monkeypatch):
    """A whole session (sink prefill, ring, the second clip's sink refresh) where each block (its
    self-attention's q/k norms and RoPE included) and audio injection call runs both ways on the
    same inputs. Only the LayerNorm's summation order
    differs: nearly every call is bit-identical, the rest differ by a rounding step in the block."""
    from avatar.services.generator.causal_s2v_dit import AudioInjection, CausalS2VBlock

    errors = {CausalS2VBlock: [], AudioInjection: []}

    def both_ways(cls):
        forward = cls.forward

        def run(module, *args):
            module.fused_norms = False
            expected = forward(module, *args).float()
            module.fused_norms = True  # runs last: a block's keys and values stay in the cache
            got = forward(module, *args)
            errors[cls].append(((got.float() - expected).norm() / expected.norm()).item())
            return got

        monkeypatch.setattr(cls, "forward", run)

    both_ways(CausalS2VBlock)
    both_ways(AudioInjection)
    rotations = []
    rope_into = fused_norms.rope_into
    monkeypatch.setattr(fused_norms, "rope_into", lambda *a: rotations.append(rope_into(*a)))
    dit = _fp8_dit()
    dit.use_fused_norms(ffn_products=False)  # the same products: the test below compares those
    assert all(block.fused_norms for block in dit.blocks)
    assert all(injection.fused_norms for injection in dit.audio_injector.injections)
    out = _blocks(dit)
    assert len(rotations) == 3 * 4  # the reference keys into the sink: every step of every block
    assert all(torch.isfinite(b).all() for b in out)
    blocks, injections = errors[CausalS2VBlock], errors[AudioInjection]
    assert len(blocks) == 4 * (2 + 3 * 4)  # layers x (2 sink prefills, 3 blocks of 4 steps)
    assert len(injections) == 3 * 3 * 4  # injections (after layers 0, 2, 3) x 3 blocks x 4 steps
    for calls in (blocks, injections):
        assert sum(e == 0 for e in calls) >= 0.9 * len(calls), calls
        assert max(calls) < 5e-3, calls  # one rounding step in one layer measured 0.16%


def test_the_ffns_products_before_their_scales_change_a_block_by_a_rounding_step(monkeypatch):
    """use_fused_norms()'s default: the FFN's products come from cuBLAS's tensorwise kernels and
    gelu_quantize / the residual's kernel apply their scales. Over a session each block call differs
    from the same block with the layer's own products by the product's extra bf16 rounding only."""
    from avatar.services.generator.causal_s2v_dit import CausalS2VBlock

    errors, forward = [], CausalS2VBlock.forward

    def run(module, *args):
        module.ffn_products = False
        expected = forward(module, *args).float()
        module.ffn_products = True
        got = forward(module, *args)
        errors.append(((got.float() - expected).norm() / expected.norm()).item())
        return got

    monkeypatch.setattr(CausalS2VBlock, "forward", run)
    dit = _fp8_dit()
    dit.use_fused_norms()
    assert all(block.ffn_products for block in dit.blocks)
    out = _blocks(dit)
    assert all(torch.isfinite(b).all() for b in out)
    assert len(errors) == 4 * (2 + 3 * 4)  # layers x (2 sink prefills, 3 blocks of 4 steps)
    assert max(errors) < 5e-3, errors
    assert sum(e > 0 for e in errors) >= len(errors) // 2, errors  # it is on
    dit.use_fused_norms(False)
    assert not any(block.ffn_products for block in dit.blocks)


@pytest.mark.parametrize("fp8_attention", [False, True])
def test_q_k_and_v_from_one_gemm_change_no_bit_of_the_self_attention(monkeypatch, fp8_attention):
    """use_fused_norms(qkv_gemm=True): the self-attention's q, k and v come from one GEMM over their
    weights side by side, read in place by the norm kernels. Every call of a block, run both ways on
    the same inputs, gives the same bits (its cache rows too: the second run writes them again)."""
    from avatar.services.generator.causal_s2v_dit import SelfAttention

    same, forward = [], SelfAttention._forward_fused

    def run(module, x, rope, kv):
        joined, module.qkv = module.qkv, ()
        expected = forward(module, x, rope, kv)
        keys = kv.keys[:, kv.write : kv.write + x.codes.shape[1]].clone()
        module.qkv = joined
        got = forward(module, x, rope, kv)
        written = kv.keys[:, kv.write : kv.write + x.codes.shape[1]]
        same.append(torch.equal(got, expected) and torch.equal(written.view(torch.uint8), keys.view(torch.uint8)))
        return got

    monkeypatch.setattr(SelfAttention, "_forward_fused", run)
    dit = _fp8_dit()
    dit.use_fused_norms(qkv_gemm=True)
    assert all(len(block.self_attn.qkv) == 1 for block in dit.blocks)
    options = GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True) if fp8_attention else GeneratorOptions()
    spec = ModelSpec(name="tiny", seed=0, generator_options=options)
    out = _generate(GeneratorEngine(spec, dit=dit), _job(), blocks=1)
    assert torch.isfinite(out[0].float()).all()
    assert len(same) == 4 * 4 and all(same), same  # layers x the block's steps
    dit.use_fused_norms(False)
    assert not any(block.self_attn.qkv for block in dit.blocks)


def test_with_fp8_attention_the_projection_multiplies_the_attentions_codes_as_they_are():
    """--fused-norms --fp8-attention: cuDNN's e4m3 output (scale 1) goes into the FP8 output
    projection with scales of 1, so it computes codes @ W up to the bf16 result; re-quantising those
    codes to per-row scales (what the projection did with a bf16 input) rounds them a second time."""
    from avatar.services.generator.fp8 import FP8Rows

    dit = _fp8_dit()
    dit.use_fused_norms()
    o = dit.blocks[0].self_attn.o
    seen = []
    handle = o.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    options = GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True)
    try:
        _generate(GeneratorEngine(ModelSpec(name="tiny", seed=0, generator_options=options), dit=dit), _job(), blocks=1)
    finally:
        handle.remove()
    rows, out = seen[-1]  # the block's last step
    assert isinstance(rows, FP8Rows) and rows.codes.dtype == torch.float8_e4m3fn
    assert torch.equal(rows.scale, torch.ones_like(rows.scale))
    weight = o.weight_fp8.float() * o.weight_scale.reshape(-1, 1)
    exact = rows.codes.float() @ weight.t() + o.bias.float()
    err = ((out.float() - exact).norm() / exact.norm()).item()
    twice = o(rows.codes.to(torch.bfloat16)).float()  # bf16 in: quantised per row again
    err_twice = ((twice - exact).norm() / exact.norm()).item()
    assert err < 0.01 and err_twice > 2 * err, (err, err_twice)


def test_fused_norms_are_refused_where_they_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="needs --fp8"):
        random_dit("tiny", "cpu", torch.bfloat16, seed=0).use_fused_norms()
    float32_fp8 = random_dit("tiny", "cpu", torch.float32, seed=0)
    swap_linears_to_fp8(float32_fp8)
    with pytest.raises(ValueError, match="bf16"):
        float32_fp8.use_fused_norms()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fused_norms.unavailable_reason("cpu") == "--fused-norms runs on a CUDA GPU, not on cpu"
    with pytest.raises(InvalidInput, match="CUDA GPU"):
        build_generator_model(ModelSpec(name="tiny", fp8=True, generator_options=GeneratorOptions(fused_norms=True)))


def test_the_flag_reaches_the_spec_and_is_checked_against_fp8_and_avatar_loras():
    from avatar.app import cli

    parser = argparse.ArgumentParser()
    cli._add_model_flags(parser)
    assert cli.model_spec(parser.parse_args(["--fp8", "--fused-norms"])).generator_options.fused_norms
    assert cli.model_spec(parser.parse_args(["--fp8"])).generator_options.fused_norms is None  # the default
    assert cli.model_spec(parser.parse_args(["--fp8", "--no-fused-norms"])).generator_options.fused_norms is False
    with pytest.raises(cli.UserError, match="needs --fp8"):
        cli.model_spec(parser.parse_args(["--fused-norms"]))
    with pytest.raises(InvalidInput, match="per-avatar LoRAs"):
        ModelSpec(fp8=True, generator_options=GeneratorOptions(fused_norms=True), avatar_loras=(("a", "/x"),))


def test_fused_norms_are_the_default_with_fp8_where_they_run_as_measured():
    from avatar.services.generator.engine import fused_norms_wanted

    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16

    def wanted(device=cuda, dtype=bf16, sharded=False, **spec):
        return fused_norms_wanted(ModelSpec(**{"fp8": True, **spec}), device, dtype, sharded=sharded)

    assert wanted()
    assert not wanted(fp8=False)
    assert not wanted(device=cpu)
    assert not wanted(dtype=torch.float32)
    assert not wanted(sharded=True)
    assert not wanted(generator_options=GeneratorOptions(cuda_graphs=False))
    assert not wanted(avatar_loras=(("a", "/x"),))
    assert not wanted(generator_options=GeneratorOptions(fused_norms=False))
    assert wanted(device=cpu, generator_options=GeneratorOptions(fused_norms=True))  # asked: checked when applied
    # a tiny FP8 model on the CPU is built without them (the kernels run there only in the interpreter)
    dit = build_generator_model(ModelSpec(name="tiny", fp8=True))
    assert not any(block.fused_norms for block in dit.blocks)


def test_compiled_blocks_call_the_kernels_and_follow_the_eager_ones(monkeypatch):
    """torch.compile (dynamic shapes, as --compile) keeps each kernel as one custom op call."""
    from avatar.services.generator.engine import compile_blocks

    eager = _fp8_dit()
    eager.use_fused_norms()
    expected = _blocks(eager, 1)
    launches = {"norm": 0, "gelu": 0, "rope": 0, "kv": 0}

    def counted(name, kernel):
        class Launcher:
            def __getitem__(self, grid):
                launches[name] += 1
                return kernel[grid]

        return Launcher()

    monkeypatch.setattr(fused_norms, "_norm_quantize_kernel", counted("norm", fused_norms._norm_quantize_kernel))
    monkeypatch.setattr(fused_norms, "_gelu_quantize_kernel", counted("gelu", fused_norms._gelu_quantize_kernel))
    monkeypatch.setattr(fused_norms, "_rms_rope_kernel", counted("rope", fused_norms._rms_rope_kernel))
    monkeypatch.setattr(fused_norms, "_kv_into_cache_kernel", counted("kv", fused_norms._kv_into_cache_kernel))
    compiled = _fp8_dit()
    compiled.use_fused_norms()
    compile_blocks(compiled)
    got = _blocks(compiled, 1)
    # norms: 3 per layer x 4 layers (sink and steps) + 1 per injection x 3 (steps only); q, and k
    # with v into the cache, of each layer in the 4 steps (the sink's prefill keeps its own code)
    assert launches == {"norm": 3 * 4 * 5 + 3 * 4, "gelu": 4 * 5, "rope": 4 * 4, "kv": 4 * 4}
    rel = ((got[0] - expected[0]).norm() / expected[0].norm()).item()
    assert rel < 0.03, rel  # inductor rounds the rest of the block its own way (1.1% measured)


def test_the_eager_row_quantiser_kernel_shares_the_row_arithmetic():
    """fp8.py's Triton row quantiser (eager mode on a GPU) stores its rows through the same
    store_row_e4m3 as the fused kernels: the same codes and scales as quantize(x, "row")."""
    from avatar.services.generator.fp8 import quantize_rows_fused

    x = torch.cat([torch.randn(5, C) * 7, torch.zeros(1, C)]).bfloat16()
    q, s = quantize_rows_fused(x)
    q_ref, s_ref = quantize(x, "row")
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_the_cross_attentions_bf16_outputs_are_quantised_by_the_row_kernel_op():
    """With --fused-norms the FP8 projections whose inputs no fused kernel quantised (the text and
    audio cross-attentions' outputs) quantise through avatar::quantize_rows, one opaque op under
    torch.compile (the Triton row kernel, not inductor's reduction); same codes as quantize(x, "row")."""
    from avatar.services.generator.fp8 import FP8Linear, quantize_rows_kernel

    x = torch.cat([torch.randn(5, C) * 7, torch.zeros(1, C)]).bfloat16()
    q, s = quantize_rows_kernel(x)
    q_ref, s_ref = quantize(x, "row")
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    checks = torch.library.opcheck(
        torch.ops.avatar.quantize_rows.default, (x,), test_utils=("test_faketensor", "test_aot_dispatch_dynamic")
    )
    assert set(checks.values()) == {"SUCCESS"}, checks
    with pytest.raises(ValueError, match="per row"):
        quantize_rows_kernel(x, "tensor")
    dit = _fp8_dit()
    o = dit.blocks[0].cross_attn.o
    dit.use_fused_norms()
    assert isinstance(o, FP8Linear) and o._quantize is quantize_rows_kernel
    assert dit.audio_injector.injections[0].attn.o._quantize is quantize_rows_kernel
    assert dit.audio_injector.injections[0].attn.k._quantize is not quantize_rows_kernel  # small: inductor's
    dit.use_fused_norms(False)
    assert o._quantize is not quantize_rows_kernel  # the default again


@pytest.mark.parametrize("kernel,qkv_gemm", [("cudnn", False), ("triton", False), ("cudnn", True)])
def test_compiled_blocks_write_the_fp8_cache_in_place_and_quantise_the_queries_in_their_kernel(kernel, qkv_gemm):
    """--compile --fused-norms --fp8-attention: Inductor's code calls kv_into_cache on the cache
    buffers the block was given (no clone of the cache and copy back: 78 MB a layer at 704*384) and
    takes the queries' codes from rms_rope_fp8 (no reduction over them); the session's latents
    follow the eager fused model's. With the Triton kernel the values are keys-last, in place too.
    With q, k and v from one GEMM, both kernels read its output's column slices in place."""
    from torch._inductor.utils import run_and_get_code

    from avatar.services.generator.engine import compile_blocks

    options = GeneratorOptions(kv_dtype="float8_e4m3fn", fp8_attention=True, fp8_attention_kernel=kernel)
    spec = ModelSpec(name="tiny", seed=0, generator_options=options)
    eager = _fp8_dit()
    eager.use_fused_norms(qkv_gemm=qkv_gemm)
    expected = _generate(GeneratorEngine(spec, dit=eager), _job(), blocks=1)[0].float()
    compiled = _fp8_dit()
    compiled.use_fused_norms(qkv_gemm=qkv_gemm)
    compile_blocks(compiled)
    out, codes = run_and_get_code(lambda: _generate(GeneratorEngine(spec, dit=compiled), _job(), blocks=1))
    block_codes = [c for c in codes if "avatar.kv_into_cache" in c]
    assert block_codes, "no compiled block calls kv_into_cache"
    for code in block_codes:
        calls = [line for line in code.splitlines() if "torch.ops.avatar.kv_into_cache.default(" in line]
        assert len(calls) == 1
        *_, keys, values, _write = (a.strip(" )") for a in calls[0].split(","))
        assert keys.startswith("arg") and values.startswith("arg"), calls[0]  # the graph's inputs themselves
        assert "clone" not in code and "rms_rope_fp8" in code
        assert "amax" not in code.split("torch.ops.avatar.rms_rope_fp8")[1].split("fp8_sdpa")[0]
        if qkv_gemm:  # k, v and q: views at columns C, 2C and 0 of one product, rows 3C apart
            queries = next(line for line in code.splitlines() if "torch.ops.avatar.rms_rope_fp8.default(" in line)
            views = [call.split("reinterpret_tensor(")[1:] for call in (calls[0], queries)]
            product = {v.split(",")[0] for vs in views for v in vs}
            assert len(product) == 1 and [len(vs) for vs in views] == [2, 1], (calls[0], queries)
            assert all(v.split(")")[1].split(",")[-1] == " 1" for vs in views for v in vs)  # unit column stride
    rel = ((out[0].float() - expected).norm() / expected.norm()).item()
    assert rel < 0.05, rel
