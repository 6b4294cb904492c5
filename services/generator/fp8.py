"""FP8 (e4m3) linear layers for the DiT.

FP8 weights with their scales, activations quantised on the fly, products through torch._scaled_mm.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
GRANULARITIES = ("tensor", "row")

# Layers kept in bf16, as upstream does: the small embeddings and head (their inputs are not
# activations of the transformer trunk, and they cost nothing), and the audio encoder's last
# projection. Matched as whole dotted segments of a module name.
DEFAULT_SKIP = (
    "text_embedding",
    "time_embedding",
    "time_projection",
    "head",
    "final_linear",
)


class FP8Rows(NamedTuple):
    """Activations already quantised per row by a fused kernel (fused_norms.py): codes [..., K]
    e4m3 and scales [..., 1] float32. FP8Linear takes them as its input and skips its own step."""

    codes: torch.Tensor
    scale: torch.Tensor


class RowProduct(NamedTuple):
    """FP8Linear.product(): the codes' product z [..., N] bf16 before any scale, the input's row
    scales [..., 1], the weight's column scales [N] and the bias [N] or None; the layer's output is
    apply_scales() of it."""

    z: torch.Tensor
    row_scale: torch.Tensor
    col_scale: torch.Tensor
    bias: torch.Tensor | None


def apply_scales(p: RowProduct) -> torch.Tensor:
    """z * row scale * column scale + bias in float32, rounded to bf16 (in torch: under
    torch.compile it joins the consumer's kernel)."""
    y = p.z.float() * p.row_scale * p.col_scale
    return (y + p.bias if p.bias is not None else y).to(torch.bfloat16)


def quantize(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale float32) with x ~= q * scale.

    granularity "tensor": one scale (0-dim); "row": one scale per row ([M, 1]).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    if granularity == "tensor":
        amax = x.abs().amax().float()
    else:
        amax = x.abs().amax(dim=1, keepdim=True).float()
    # A zero row would give scale 0 and 0/0; any positive scale quantises it to exact zeros.
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    # Divide in float32, clamp: the cast to e4m3 does not saturate the same way on every device.
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


try:  # the fused row quantiser needs Triton (present with CUDA builds of torch)
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below is used
    triton = None

if triton is not None:

    @triton.jit
    def store_row_e4m3(x, q_ptr, s_ptr, row, K, offs, mask):
        # quantize(x, "row") of one float32 row held by a program (masked lanes 0): its scale
        # amax / 448 at s_ptr[row], its codes at q_ptr[row * K:]; shared with fused_norms.py
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK: tl.constexpr):
        # one program per row: read it once, write e4m3 + its scale (eager torch needs 5 passes)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        store_row_e4m3(x, q_ptr, s_ptr, row, K, offs, mask)


if triton is not None:

    @triton.jit
    def _quantize_scaled_kernel(x_ptr, q_ptr, amax_ptr, n, BLOCK: tl.constexpr):
        # per-tensor: the scale comes from a device scalar (no host sync), one pass over x
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.load(amax_ptr), 1e-12) / 448.0
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=mask)


def quantize_tensor_fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(x, "tensor") in two kernels (amax, then scale + cast) instead of five."""
    if not x.is_contiguous():
        raise ValueError("quantize_tensor_fused expects a contiguous tensor")
    amax = torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32)
    q = torch.empty(x.shape, dtype=E4M3, device=x.device)
    n = x.numel()
    if n:
        _quantize_scaled_kernel[(triton.cdiv(n, 4096),)](x, q, amax, n, BLOCK=4096, num_warps=8)
    return q, amax.clamp(min=1e-12) / E4M3_MAX


def quantize_rows_fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(x, "row") in one Triton kernel (CUDA only); same result as the torch path."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("quantize_rows_fused expects a 2-D tensor with contiguous rows")
    m, k = x.shape
    q = torch.empty(m, k, dtype=E4M3, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), BLOCK=block, num_warps=16 if block >= 16384 else 8)
    return q, s


def _fast_quantize(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel for rows on CUDA in eager mode; under torch.compile the torch path (inductor
    fuses it itself)."""
    if triton is not None and x.is_cuda and not torch.compiler.is_compiling():
        if granularity == "row" and x.stride(-1) == 1:
            return quantize_rows_fused(x)
        if granularity == "tensor" and x.is_contiguous():
            return quantize_tensor_fused(x)
    return quantize(x, granularity)


@torch.library.custom_op("avatar::quantize_rows", mutates_args=())
def _quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return quantize_rows_fused(x.contiguous())
    return quantize(x, "row")


@_quantize_rows_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def quantize_rows_kernel(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(x, "row") through the Triton row kernel also under torch.compile, as one opaque op
    (FP8Linear.compile_quantize; with --fused-norms, for the bf16 inputs that no fused kernel
    quantised: the attention outputs into the text and audio cross-attentions' projections).
    Inductor's own fused reduction for it took 34 us a call at 704*384 on an H100 (run Q3), at
    1.4 TB/s where the norm kernels of the same row width reach 2.5."""
    if granularity != "row":
        raise ValueError(f"quantize_rows_kernel scales per row, not per {granularity}")
    return torch.ops.avatar.quantize_rows(x)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


class FP8Linear(nn.Module):
    """A bias-optional linear layer whose weight is stored as e4m3 with float32 scales.

    "row" scales the weight per output channel and the input per token; "tensor" uses one scale
    for each. The output has the input's dtype (the product itself is written in bf16).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        granularity: str = "row",
        fast_accum: bool = True,
        device=None,
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if in_features % 16 or out_features % 16:
            raise ValueError(f"FP8 matmul needs sides divisible by 16, got {in_features}x{out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.granularity = granularity
        self.fast_accum = fast_accum
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=E4M3, device=device))
        scale_shape = (1, out_features) if granularity == "row" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        # product()'s tensorwise scales: one tensor kept, not one made (a kernel each) per call
        self.register_buffer("one", torch.ones((), device=device), persistent=False)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16, device=device))
        else:
            self.bias = None
        self._quantize = _fast_quantize

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, granularity: str = "row", fast_accum: bool = True) -> FP8Linear:
        w = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            granularity=granularity,
            fast_accum=fast_accum,
            device="meta",
        )
        q, s = quantize(w, granularity)  # per output row: s [out, 1]
        layer.weight_fp8 = q
        layer.one = torch.ones((), device=q.device)
        layer.weight_scale = s.reshape(1, -1) if granularity == "row" else s
        if linear.bias is not None:
            layer.bias = linear.bias.detach().to(torch.bfloat16)
        return layer

    def compile_quantize(self, fn) -> None:
        """Use a compiled quantiser (one fused kernel instead of five in eager mode), or the
        default again (None)."""
        self._quantize = fn if fn is not None else _fast_quantize

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(
            self.weight_fp8, self.weight_scale.reshape(-1, 1) if self.granularity == "row" else self.weight_scale
        )

    def _check_width(self, shape: torch.Size) -> None:
        if shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {tuple(shape)}")

    def forward(self, x: torch.Tensor | FP8Rows) -> torch.Tensor:
        rows = isinstance(x, FP8Rows)
        shape = x.codes.shape if rows else x.shape
        self._check_width(shape)
        if rows:
            if self.granularity != "row":
                raise ValueError("FP8Rows carry one scale per row: this layer scales per tensor")
            xq, xs = x.codes.reshape(-1, self.in_features), x.scale.reshape(-1, 1)
        else:
            xq, xs = self._quantize(x.reshape(-1, self.in_features), self.granularity)
        y = torch._scaled_mm(
            xq,
            self.weight_fp8.t(),
            scale_a=xs,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accum,
        )
        if not rows and y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def product(self, x: FP8Rows) -> RowProduct:
        """The product of x's codes and the weight's codes through cuBLAS's kernels for one scale a
        tensor (both 1), the row scales and the bias left to the consumer's kernel: at the DiT's
        shapes on an H100 those kernels (256x128 and 128x288 tiles) run 7-10% faster than the
        per-row-scaled ones (128x128 tiles only), alone and under the power cap (run Y3,
        docs/performance.md). apply_scales() finishes it as forward() would, rounded to bf16 once
        more: the product's own bf16 rounding now comes before the scales (same relative size)."""
        if self.granularity != "row":
            raise ValueError("product() leaves per-row scales to the consumer: this layer scales per tensor")
        self._check_width(x.codes.shape)
        codes = x.codes.reshape(-1, self.in_features)
        z = torch._scaled_mm(
            codes,
            self.weight_fp8.t(),
            scale_a=self.one,
            scale_b=self.one,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accum,
        )
        z = z.reshape(*x.codes.shape[:-1], self.out_features)
        return RowProduct(z, x.scale, self.weight_scale.reshape(-1), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, granularity={self.granularity}"
        )


@torch.no_grad()
def side_by_side(layers: list[FP8Linear]) -> FP8Linear:
    """One FP8Linear whose output is the layers' outputs side by side, for layers that read the same
    input (the self-attention's q, k and v): one GEMM instead of several. Row scales only (each
    output channel keeps its own). The layers' weights, scales and biases become views into the
    new layer's: no second copy, and the layers still compute what they did."""
    first = layers[0]
    if not all(isinstance(m, FP8Linear) and m.granularity == "row" for m in layers):
        raise ValueError("side_by_side joins FP8Linear layers with row scales")
    if {(m.in_features, m.fast_accum, m.bias is not None, m.weight_fp8.device) for m in layers} != {
        (first.in_features, first.fast_accum, first.bias is not None, first.weight_fp8.device)
    }:
        raise ValueError("side_by_side needs one input width, device, accumulation and bias-or-not for all")
    widths = [m.out_features for m in layers]
    joined = FP8Linear(first.in_features, sum(widths), first.bias is not None, "row", first.fast_accum, "meta")
    joined.weight_fp8 = torch.cat([m.weight_fp8 for m in layers])
    joined.weight_scale = torch.cat([m.weight_scale for m in layers], dim=1)
    joined.one = first.one
    if first.bias is not None:
        joined.bias = torch.cat([m.bias for m in layers])
    joined.compile_quantize(first._quantize)
    for m, w, s in zip(layers, joined.weight_fp8.split(widths), joined.weight_scale.split(widths, dim=1)):
        m.weight_fp8, m.weight_scale = w, s
    if first.bias is not None:
        for m, b in zip(layers, joined.bias.split(widths)):
            m.bias = b
    return joined


def _matches(name: str, pattern: str) -> bool:
    """True when the dotted pattern is a run of whole segments of name ("head" skips "head.head"
    but not "heads")."""
    return f".{pattern}." in f".{name}."


def swap_linears_to_fp8(
    model: nn.Module,
    skip: tuple[str, ...] = DEFAULT_SKIP,
    granularity: str = "row",
    fast_accum: bool = True,
    compiled_quantize: bool = False,
) -> list[str]:
    """Replace every nn.Linear of model (except skipped ones and sides not divisible by 16) with an
    FP8Linear, in place, one layer at a time so that the bf16 weight of a layer is freed before
    the next is converted (peak = FP8 model + one bf16 layer). Returns the swapped names."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and not any(_matches(n, p) for p in skip)
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
    ]
    qfn = torch.compile(quantize, dynamic=True) if compiled_quantize else None
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = FP8Linear.from_linear(getattr(parent, child), granularity=granularity, fast_accum=fast_accum)
        if qfn is not None:
            layer.compile_quantize(qfn)
        setattr(parent, child, layer)  # the old nn.Linear (and its bf16 weight) is dropped here
    return names


def fp8_supported(device: torch.device | str) -> bool:
    """FP8 matmuls run on CUDA cards of compute capability >= 8.9 (Ada, Hopper) and on CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return hasattr(torch, "_scaled_mm")
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)
