"""Checkpoint file access shared by every loader: safetensors headers, shard indexes, lazy loads.

Headers are read without touching tensor data, so `avatar check-weights` can inspect a 33 GB
checkpoint in milliseconds, and loads go shard by shard through mmap (never two copies in RAM).
"""

import collections
import dataclasses
import json
import pathlib
import pickle
import struct
import zipfile

from avatar.errors import WeightsError

SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
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


# --- torch .pth files (Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth) ---------------------------

_PTH_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


_ITEMSIZE = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


class _PthStorage:
    """Stands in for a tensor storage: only its dtype is known, no bytes are read."""

    def __init__(self, dtype: str):
        self.dtype = dtype


class _PthTensor(tuple):
    """(shape, dtype) recorded where torch would rebuild a tensor."""


def _rebuild_tensor(storage, _offset, size, *_rest):
    return _PthTensor((tuple(int(s) for s in size), storage.dtype))


def _rebuild_parameter(data, *_rest):
    return data


class _PthHeaderUnpickler(pickle.Unpickler):
    """Reads data.pkl of a torch.save zip file, refusing anything but tensors and plain containers."""

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _PTH_STORAGE_DTYPES:
            return _PTH_STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")

    storages: dict[str, int]  # storage key -> bytes the file must hold for it

    def persistent_load(self, pid):
        # torch.save writes ("storage", storage type, key, location, numel) for every storage
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], str)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        self.storages[str(key)] = int(numel) * _ITEMSIZE.get(dtype, 1)
        return _PthStorage(dtype)


def read_pth_header(path: str | pathlib.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, torch dtype name) of a torch.save'd state dict, without reading tensor bytes."""
    path = pathlib.Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise WeightsError(f"{path}: not a torch.save zip file (no single data.pkl)")
            with zf.open(pkl[0]) as f:
                unpickler = _PthHeaderUnpickler(f)
                unpickler.storages = {}
                obj = unpickler.load()
            # every storage's bytes must be in the archive: catches truncated or partial copies
            sizes = {i.filename: i.file_size for i in zf.infolist()}
            prefix = pkl[0][: -len("data.pkl")]
            short = [k for k, n in unpickler.storages.items() if sizes.get(f"{prefix}data/{k}", -1) < n]
            if short:
                raise WeightsError(
                    f"{path}: tensor data missing or truncated for {len(short)} of "
                    f"{len(unpickler.storages)} storages (incomplete copy?)"
                )
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: missing") from e
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from e
    except zipfile.BadZipFile as e:
        raise WeightsError(f"{path}: not a torch.save zip file ({e})") from e
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read the tensor index ({e})") from e
    if not isinstance(obj, dict) or not all(isinstance(v, _PthTensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a plain state dict of tensors")
    return {str(k): (v[0], v[1]) for k, v in obj.items()}


def load_pth(path: str | pathlib.Path) -> dict:
    """Loads a torch.save'd state dict memory-mapped (tensor bytes stay in the page cache) and safely."""
    import torch  # kept local: the header readers above must work without torch

    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: missing")
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/ValueError for bad files
        raise WeightsError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return sd


def shape_problems(have: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing keys, unexpected keys and wrong shapes between two name -> shape maps, worst first."""

    def few(items):
        return ", ".join(items[:6]) + (f" ... ({len(items)} in all)" if len(items) > 6 else "")

    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    wrong = [
        f"{k} {list(have[k])} (expected {list(expected[k])})"
        for k in sorted(set(have) & set(expected))
        if tuple(have[k]) != tuple(expected[k])
    ]
    return [
        f"{what}: {few(items)}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if items
    ]


def check_state_dict(path, what: str, have: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Raises WeightsError naming the file and the mismatching keys unless `have` equals `expected`."""
    problems = shape_problems(have, expected)
    if problems:
        raise WeightsError(f"{path}: does not match the {what} ({'; '.join(problems)})")


# --- the Wan2.2-S2V-14B folder (--ckpt_dir) -----------------------------------------------------------

S2V_FOLDER = "Wan2.2-S2V-14B"
DIT_CONFIG = "config.json"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """Where each component sits in a Wan2.2-S2V-14B folder (the layout of the HF repo)."""

    root: pathlib.Path

    @property
    def dit_config(self) -> pathlib.Path:
        return self.root / DIT_CONFIG

    @property
    def dit_index(self) -> pathlib.Path:
        return self.root / DIT_INDEX

    @property
    def vae(self) -> pathlib.Path:
        return self.root / VAE_FILE

    @property
    def t5(self) -> pathlib.Path:
        return self.root / T5_FILE

    @property
    def tokenizer(self) -> pathlib.Path:
        return self.root / TOKENIZER_DIR

    @property
    def wav2vec2(self) -> pathlib.Path:
        return self.root / WAV2VEC2_DIR


def resolve_ckpt_dir(ckpt_dir: str | pathlib.Path | None) -> CheckpointLayout:
    """--ckpt_dir may name the Wan2.2-S2V-14B folder itself or the folder above it (download-weights' DEST)."""
    if not ckpt_dir:
        raise WeightsError(
            "the s2v-14b model needs --ckpt_dir (a Wan2.2-S2V-14B folder; see `avatar download-weights`)"
        )
    root = pathlib.Path(ckpt_dir).expanduser()
    if not root.is_dir():
        raise WeightsError(f"{root}: checkpoint folder missing")
    if not (root / DIT_CONFIG).exists() and not (root / VAE_FILE).exists() and (root / S2V_FOLDER).is_dir():
        root = root / S2V_FOLDER
    return CheckpointLayout(root)
