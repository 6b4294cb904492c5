"""Tensor wire format: every dtype round-trips bit-exactly through the proto bytes, bad messages are refused."""

import numpy as np
import pytest
import torch

from avatar import wire
from avatar.v1 import tensor_pb2


def _sample(dtype: torch.dtype, shape=(2, 3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g) * 3
        return t.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


@pytest.mark.parametrize("name", sorted(wire.DTYPES))
def test_round_trip_every_dtype(name):
    t = _sample(wire.DTYPES[name])
    msg = wire.to_proto(t)
    assert msg.dtype == name and list(msg.shape) == [2, 3, 5]
    assert len(msg.data) == t.numel() * t.element_size()
    # Through serialised bytes, as on a real channel.
    back = wire.from_proto(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))  # bit-exact, NaN-safe


def test_bfloat16_keeps_raw_bits():
    t = torch.tensor([1.0, -2.5, 3.140625, 1e-30], dtype=torch.bfloat16)
    msg = wire.to_proto(t)
    assert msg.data == t.view(torch.int16).numpy().astype("<i2").tobytes()
    assert torch.equal(wire.from_proto(msg), t)


def test_non_contiguous_and_numpy_and_empty():
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()  # transposed view
    assert torch.equal(wire.from_proto(wire.to_proto(t)), t)
    a = np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2]
    assert np.array_equal(wire.from_proto(wire.to_proto(a)).numpy(), a)
    e = torch.empty(0, 16, dtype=torch.bfloat16)
    back = wire.from_proto(wire.to_proto(e))
    assert back.shape == (0, 16) and back.dtype == torch.bfloat16
    s = torch.tensor(7, dtype=torch.int64)  # 0-d
    assert wire.from_proto(wire.to_proto(s)).item() == 7


@pytest.mark.parametrize(
    "msg, match",
    [
        (tensor_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8), "unknown tensor dtype"),
        (tensor_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 15), "needs 16 bytes, got 15"),
        (tensor_pb2.Tensor(dtype="int16", shape=[-1], data=b""), "negative"),
    ],
)
def test_bad_messages_are_refused(msg, match):
    with pytest.raises(ValueError, match=match):
        wire.from_proto(msg)
