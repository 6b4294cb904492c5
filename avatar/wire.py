"""Tensor wire format: torch.Tensor <-> avatar.v1.Tensor, every dtype including bfloat16."""

import numpy as np
import torch

from avatar.v1 import tensor_pb2

# dtype name on the wire -> torch dtype. Names are torch's, without the "torch." prefix.
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def to_proto(t: torch.Tensor | np.ndarray) -> tensor_pb2.Tensor:
    """Serialises a tensor (any device) as raw C-contiguous little-endian bytes."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    if t.dtype not in _NAMES:
        raise ValueError(f"dtype {t.dtype} has no wire name")
    t = t.detach().to("cpu").contiguous()
    # bytes via a uint8 view: numpy has no bfloat16/float8, a byte view works for every dtype.
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tensor_pb2.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape), data=raw)


def tensor_arg(msg: tensor_pb2.Tensor, what: str) -> torch.Tensor:
    """from_proto for a request field: a malformed tensor is the caller's error (InvalidInput)."""
    from avatar.errors import InvalidInput  # local: errors is tiny, but wire stays import-light

    try:
        return from_proto(msg)
    except ValueError as exc:
        raise InvalidInput(f"{what}: {exc}") from exc


def from_proto(msg: tensor_pb2.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Rebuilds the tensor; raises ValueError when dtype, shape and byte count disagree."""
    if msg.dtype not in DTYPES:
        raise ValueError(f"unknown tensor dtype {msg.dtype!r}")
    dtype = DTYPES[msg.dtype]
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative tensor dimension in {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = int(np.prod(shape, dtype=np.int64)) * itemsize
    if len(msg.data) != expected:
        raise ValueError(f"tensor {msg.dtype}{list(shape)} needs {expected} bytes, got {len(msg.data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    flat = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape).to(device)
