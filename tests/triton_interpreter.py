"""Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) runs the GPU kernels on the CPU, but
its float downcasts drop the rounding carry (bf16 and e4m3 values that round up to the next power of
two come out halved) and its fp32 -> bf16 cast truncates. GPUs round to nearest even; so does
torch. `exact_downcasts()` makes the interpreter cast as torch does, so a kernel's output can be
compared with torch's arithmetic code for code."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

_BITS = {8: (np.int8, torch.int8), 16: (np.int16, torch.int16), 32: (np.int32, torch.int32)}


@contextlib.contextmanager
def exact_downcasts():
    import triton.language as tl
    from triton.runtime import interpreter

    dtypes = {
        tl.float32: torch.float32,
        tl.bfloat16: torch.bfloat16,
        tl.float16: torch.float16,
        tl.float8e4nv: torch.float8_e4m3fn,
        tl.float8e5: torch.float8_e5m2,
    }
    original = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        rtz = rounding_mode is not None and rounding_mode == interpreter._ir.ROUNDING_MODE.RTZ
        if rtz or src not in dtypes or dst not in dtypes or dst.primitive_bitwidth >= src.primitive_bitwidth:
            return original(data, src, dst, rounding_mode)
        np_int, _ = _BITS[src.primitive_bitwidth]
        values = torch.from_numpy(np.ascontiguousarray(data).view(np_int).copy()).view(dtypes[src])
        np_out, torch_out = _BITS[dst.primitive_bitwidth]
        return values.to(dtypes[dst]).view(torch_out).numpy().view(getattr(np, f"uint{dst.primitive_bitwidth}"))

    interpreter._convert_float = convert
    try:
        yield
    finally:
        interpreter._convert_float = original
