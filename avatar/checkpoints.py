"""Checkpoint file access shared by every loader: safetensors headers, shard indexes, lazy loads.

Headers are read without touching tensor data, so `avatar check-weights` can inspect a 33 GB
checkpoint in milliseconds, and loads go shard by shard through mmap (never two copies in RAM).
"""
import json
import pathlib
import struct

from avatar.errors import WeightsError

SAFETENSORS_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "I64": "int64", "I32": "int32", "I16": "int16",
    "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def read_safetensors_header(path: str | pathlib.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, torch dtype name), from the file's JSON header alone."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise WeightsError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw_len)
            if n > 100 * 1024 * 1024:
                raise WeightsError(f"{path}: safetensors header of {n} bytes is not plausible")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    return {k: (tuple(v["shape"]), SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"])) for k, v in header.items()}


def read_shard_index(index_path: str | pathlib.Path) -> dict[str, str]:
    """tensor name -> shard file name, from a diffusers/transformers *.safetensors.index.json."""
    index_path = pathlib.Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except FileNotFoundError as e:
        raise WeightsError(f"{index_path}: missing") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index_path}: not a shard index ({e})") from e
    return dict(weight_map)
