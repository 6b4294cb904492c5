"""FP8 linear layers: quantise/dequantise math, the scaled matmul's scale plumbing, and the swap rules."""

import pytest
import torch
from torch import nn

from avatar.services.generator.fp8 import (
    E4M3,
    E4M3_MAX,
    FP8Linear,
    FP8Rows,
    apply_scales,
    dequantize,
    quantize,
    side_by_side,
    swap_linears_to_fp8,
)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_quantize_roundtrip_within_e4m3_precision(granularity):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-2, 2, 64).unsqueeze(1)
    q, s = quantize(x, granularity)
    assert q.dtype == E4M3 and s.dtype == torch.float32
    assert s.shape == (() if granularity == "tensor" else (64, 1))
    assert q.float().abs().max() <= E4M3_MAX
    # the largest element of each scaled group lands on the top of the e4m3 range
    top = q.float().abs().amax() if granularity == "tensor" else q.float().abs().amax(dim=1)
    assert torch.all(top == E4M3_MAX)
    back = dequantize(q, s)
    # 3 mantissa bits: every value that is not flushed is within half an ulp (2^-4 relative)
    big = x.abs() > (s * 2**-6)  # above the e4m3 normal range of its group
    err = ((back - x).abs() / x.abs())[big]
    assert err.max() <= 2**-4 + 1e-6


def test_row_scaling_beats_tensor_scaling_on_rows_of_different_magnitude():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 128, generator=g) * torch.logspace(-6, 1, 32).unsqueeze(1)
    per_row = rel(dequantize(*quantize(x, "row")), x)
    per_tensor_small_rows = rel(dequantize(*quantize(x, "tensor"))[:8], x[:8])
    assert per_row < 0.05
    assert per_tensor_small_rows > 4 * per_row  # small rows underflow with one scale


def test_zero_input_quantizes_to_zero_without_nan():
    q, s = quantize(torch.zeros(4, 32), "row")
    assert torch.all(q.float() == 0) and torch.all(torch.isfinite(s))
    q, s = quantize(torch.zeros(4, 32), "tensor")
    assert torch.all(q.float() == 0) and torch.isfinite(s)


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="granularity"):
        quantize(torch.ones(2, 16), "block")
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(2, 2, 16), "row")
    with pytest.raises(ValueError, match="divisible by 16"):
        FP8Linear(24, 32)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_matches_the_dequantised_product_and_the_bf16_layer(granularity, bias):
    torch.manual_seed(3)
    lin = nn.Linear(128, 96, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-1, 1, 96).unsqueeze(1).to(torch.bfloat16))
    f8 = FP8Linear.from_linear(lin, granularity=granularity)
    x = torch.randn(2, 40, 128, dtype=torch.bfloat16)
    y = f8(x)
    assert y.shape == (2, 40, 96) and y.dtype == torch.bfloat16
    # exactly what the scales say: dequantised input times dequantised weight (+ bias)
    xq, xs = quantize(x.reshape(-1, 128), granularity)
    ref = dequantize(xq, xs) @ f8.dequantized_weight().t()
    if bias:
        ref = ref + lin.bias.float()
    assert rel(y.reshape(-1, 96), ref) < 1e-2
    # and close to the bf16 layer it replaces (e4m3 noise: a few percent)
    assert rel(y, lin(x)) < 0.08
    # a wrong weight scale would be caught: dropping it changes the output completely
    assert rel(dequantize(xq, xs) @ f8.weight_fp8.float().t(), ref) > 0.5


@pytest.mark.parametrize("bias", [True, False])
def test_the_product_before_its_scales_finishes_as_the_layer(bias):
    """product() + apply_scales() is forward() with one more bf16 rounding, of the product before
    its scales: within three bf16 rounding errors (2^-8 each) of it; a dropped scale would show."""
    torch.manual_seed(5)
    lin = nn.Linear(128, 96, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, 96).unsqueeze(1).to(torch.bfloat16))
    f8 = FP8Linear.from_linear(lin)
    x = torch.randn(2, 40, 128, dtype=torch.bfloat16) * torch.logspace(-2, 2, 40).reshape(1, 40, 1)
    codes, scale = quantize(x.reshape(-1, 128))
    rows = FP8Rows(codes.reshape(2, 40, 128), scale.reshape(2, 40, 1))
    p = f8.product(rows)
    assert p.z.shape == (2, 40, 96) and p.z.dtype == torch.bfloat16
    assert p.row_scale.shape == (2, 40, 1) and p.col_scale.shape == (96,)
    y, expected = apply_scales(p), f8(rows)
    assert y.dtype == torch.bfloat16 and y.shape == expected.shape
    # relative to the scaled product and the bias apart (the bias may cancel the product)
    size = (p.z.float() * p.row_scale * p.col_scale).abs() + (lin.bias.float().abs() if bias else 0)
    assert ((y.float() - expected.float()).abs() <= 3 * 2**-8 * size).all()
    assert rel(p.z.float() * p.row_scale + (lin.bias.float() if bias else 0), expected) > 0.5
    with pytest.raises(ValueError, match="per tensor"):
        FP8Linear.from_linear(lin, granularity="tensor").product(rows)
    with pytest.raises(ValueError, match="expected last dim 128"):
        f8.product(rows._replace(codes=rows.codes[..., :-1]))


@pytest.mark.parametrize("bias", [True, False])
def test_layers_side_by_side_are_one_product_of_their_outputs_and_keep_their_weights(bias):
    """q, k and v as one GEMM: the joined layer's output is the three outputs side by side, for bf16
    input and for codes; each layer's weights are views of the joined ones (no second copy) and it
    still computes what it did."""
    torch.manual_seed(7)
    layers = [FP8Linear.from_linear(nn.Linear(64, 32, bias=bias).to(torch.bfloat16)) for _ in range(3)]
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    codes, scale = quantize(x.reshape(-1, 64))
    rows = FP8Rows(codes.reshape(2, 5, 64), scale.reshape(2, 5, 1))
    before = [(m(x), m(rows)) for m in layers]
    joined = side_by_side(layers)
    assert joined.out_features == 96 and (joined.bias is not None) == bias
    for got, i in ((joined(x), 0), (joined(rows), 1)):
        assert got.shape == (2, 5, 96)
        assert torch.equal(got, torch.cat([b[i] for b in before], dim=-1))
    storage = joined.weight_fp8.untyped_storage().data_ptr()
    for m, (bf16_out, rows_out) in zip(layers, before):
        assert m.weight_fp8.untyped_storage().data_ptr() == storage
        assert m.weight_scale.untyped_storage().data_ptr() == joined.weight_scale.untyped_storage().data_ptr()
        assert torch.equal(m(x), bf16_out) and torch.equal(m(rows), rows_out)
    assert joined.state_dict().keys() == layers[0].state_dict().keys()


def test_side_by_side_refuses_layers_that_cannot_share_a_product():
    row = [FP8Linear.from_linear(nn.Linear(64, 32)) for _ in range(2)]
    with pytest.raises(ValueError, match="row scales"):
        side_by_side([*row, FP8Linear.from_linear(nn.Linear(64, 32), granularity="tensor")])
    with pytest.raises(ValueError, match="row scales"):
        side_by_side([*row, nn.Linear(64, 32)])
    with pytest.raises(ValueError, match="one input width"):
        side_by_side([*row, FP8Linear.from_linear(nn.Linear(48, 32))])
    with pytest.raises(ValueError, match="bias-or-not"):
        side_by_side([*row, FP8Linear.from_linear(nn.Linear(64, 32, bias=False))])


def test_fp8_linear_keeps_float32_inputs_float32():
    torch.manual_seed(5)
    lin = nn.Linear(32, 16)
    x = torch.randn(5, 32)
    y = FP8Linear.from_linear(lin)(x)
    assert y.dtype == torch.float32
    assert rel(y, lin(x)) < 0.08


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class _TinyDiT(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.text_embedding = nn.Sequential(nn.Linear(48, d), nn.GELU(), nn.Linear(d, d))
        self.time_projection = nn.Linear(d, 6 * d)
        self.blocks = nn.ModuleList([_Block(d) for _ in range(2)])
        self.heads = nn.Linear(d, d)  # "heads" must not match the "head" skip entry
        self.odd = nn.Linear(d, 20)  # 20 is not divisible by 16: stays bf16
        self.head = nn.Module()
        self.head.head = nn.Linear(d, 64)

    def forward(self, x):
        for b in self.blocks:
            x = x + b.q(x)
            x = x + b.ffn(x)
        return self.head.head(self.heads(x))


def test_swap_converts_the_trunk_and_skips_embeddings_head_and_odd_sides():
    torch.manual_seed(4)
    model = _TinyDiT().to(torch.bfloat16)
    x = torch.randn(3, 10, 32, dtype=torch.bfloat16)
    before = model(x)
    swapped = swap_linears_to_fp8(model)
    assert swapped == [
        "blocks.0.q",
        "blocks.0.ffn.0",
        "blocks.0.ffn.2",
        "blocks.1.q",
        "blocks.1.ffn.0",
        "blocks.1.ffn.2",
        "heads",
    ]
    for name in swapped:
        assert isinstance(model.get_submodule(name), FP8Linear)
    for name in ["text_embedding.0", "text_embedding.2", "time_projection", "odd", "head.head"]:
        m = model.get_submodule(name)
        assert type(m) is nn.Linear and m.weight.dtype == torch.bfloat16
    assert not any(
        isinstance(p, torch.Tensor) and p.dtype == torch.bfloat16 and p.dim() == 2
        for n, p in model.blocks.named_parameters()
    )  # no bf16 trunk weight left
    after = model(x)
    assert rel(after, before) < 0.1
    # buffers travel with the module (state_dict holds the FP8 weight and its scales)
    sd = model.state_dict()
    assert sd["blocks.0.q.weight_fp8"].dtype == E4M3 and sd["blocks.0.q.weight_scale"].shape == (1, 32)


def test_swap_honours_a_custom_skip_list():
    model = _TinyDiT()
    swapped = swap_linears_to_fp8(model, skip=("blocks.1", "head"), granularity="tensor")
    assert sorted(swapped) == [
        "blocks.0.ffn.0",
        "blocks.0.ffn.2",
        "blocks.0.q",
        "heads",
        "text_embedding.0",
        "text_embedding.2",
        "time_projection",
    ]
    assert model.get_submodule("blocks.0.q").weight_scale.shape == ()
