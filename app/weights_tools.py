"""`avatar check-weights` and `avatar download-weights`: inspect a checkpoint folder (headers only), fetch it.

check_weights reads safetensors headers and the pickled index of .pth files (no tensor bytes), so a
33 GB + 11 GB folder is checked in seconds, and compares every component with the names and
shapes our classes expect, built on the meta device.
"""

import dataclasses
import os
import pathlib
import re
import socket
import urllib.parse

from avatar.checkpoints import (
    S2V_FOLDER,
    CheckpointLayout,
    read_pth_header,
    read_safetensors_header,
    resolve_ckpt_dir,
    shape_problems,
)
from avatar.errors import WeightsError

S2V_REPO = "Wan-AI/Wan2.2-S2V-14B"
LORA_REPO = "Quark-Vision/Live-Avatar"
LORA_FILE = "liveavatar.safetensors"
LORA_FOLDER = "LiveAvatar"
# Only what --ckpt_dir needs from the S2V repo (it also holds examples and docs).
S2V_FILES = [
    "config.json",
    "diffusion_pytorch_model*.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "Wan2.1_VAE.pth",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "google/umt5-xxl/*",
    "wav2vec2-large-xlsr-53-english/*",
]
LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")  # LiveAvatar's lora_target_modules
MODELS = ("s2v-14b", "tiny")


@dataclasses.dataclass
class ComponentReport:
    """One component of the folder: what was found and what is wrong with it."""

    name: str
    path: pathlib.Path
    found: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class WeightsReport:
    ckpt_dir: pathlib.Path
    model: str
    components: list[ComponentReport]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.components)

    @property
    def problems(self) -> list[str]:
        return [f"{c.name}: {p}" for c in self.components for p in c.problems]

    def lines(self) -> list[str]:
        out = [f"checking {self.ckpt_dir} as {self.model}"]
        for c in self.components:
            out.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<9} {c.path}" + (f": {c.found}" if c.found else ""))
            out += [f"         - {p}" for p in c.problems]
        n = len(self.problems)
        out.append(
            "complete: every tensor present with the expected shape"
            if self.ok
            else f"{n} problem{'s' if n > 1 else ''} found"
        )
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def check_weights(
    ckpt_dir: str | pathlib.Path, lora_path: str | pathlib.Path | None = None, model: str = "s2v-14b"
) -> WeightsReport:
    """Checks every component of a Wan2.2-S2V-14B folder (and a LoRA file) against `model`'s shapes."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    folder = pathlib.Path(str(ckpt_dir)).expanduser()
    if not folder.is_dir() or not any(folder.iterdir()):
        # a newcomer's first run: say what to run rather than list five missing components
        what = "is empty" if folder.is_dir() else "does not exist"
        fetch = f"; fetch the weights with `avatar download-weights --ckpt_dir {folder}`" if model == "s2v-14b" else ""
        return WeightsReport(
            folder, model, [ComponentReport("folder", folder, problems=[f"{folder} {what}: nothing to check{fetch}"])]
        )
    try:
        layout = resolve_ckpt_dir(ckpt_dir)
    except WeightsError as e:
        return WeightsReport(
            pathlib.Path(str(ckpt_dir)),
            model,
            [ComponentReport("folder", pathlib.Path(str(ckpt_dir)), problems=[str(e)])],
        )
    dit = _check_dit(layout, model)
    components = [
        dit.report,
        _check_vae(layout, model),
        _check_t5(layout, model),
        _check_tokenizer(layout),
        _check_wav2vec2(layout, model),
    ]
    if lora_path:
        components.append(_check_lora(pathlib.Path(lora_path), dit.linear_shapes))
    return WeightsReport(layout.root, model, components)


# -- components -------------------------------------------------------------------------------


@dataclasses.dataclass
class _DitResult:
    report: ComponentReport
    linear_shapes: dict[str, tuple[int, ...]]  # module name -> [out, in] of the model's Linear layers


def _check_dit(layout: CheckpointLayout, model: str) -> _DitResult:
    import torch

    from avatar.services.generator.weights import build_dit, check_dit_files, checkpoint_files, read_dit_config

    rep = ComponentReport("DiT", layout.root)
    expected = build_dit(model, device="meta")
    linear = {n: tuple(m.weight.shape) for n, m in expected.named_modules() if isinstance(m, torch.nn.Linear)}
    try:
        files = checkpoint_files(layout.root)
    except WeightsError as e:
        rep.problems.append(str(e))
        return _DitResult(rep, linear)
    try:
        shapes, dtypes = {}, set()
        for shard in sorted(set(files.values())):
            for name, (shape, dtype) in read_safetensors_header(shard).items():
                shapes[name] = shape
                dtypes.add(dtype)
        rep.found = (
            f"{len(shapes)} tensors in {len(set(files.values()))} shard(s), {'/'.join(sorted(dtypes))}, "
            f"{_params(shapes)} parameters"
        )
        check_dit_files(expected, layout.root)
    except WeightsError as e:
        rep.problems.append(str(e))
    try:
        cfg = read_dit_config(layout.root)
        have = build_dit(cfg, device="meta").config
        differ = sorted(
            k
            for k in have
            if not k.startswith("_") and k in expected.config and _plain(have[k]) != _plain(expected.config[k])
        )
        if differ:
            rep.problems.append(
                "config.json describes another model: "
                + ", ".join(f"{k}={_plain(have[k])} (expected {_plain(expected.config[k])})" for k in differ[:6])
            )
    except WeightsError as e:
        rep.problems.append(str(e))
    return _DitResult(rep, linear)


def _check_vae(layout: CheckpointLayout, model: str) -> ComponentReport:
    from avatar.models import wan_vae

    dims = wan_vae.TINY_VAE if model == "tiny" else wan_vae.S2V_14B_VAE
    return _check_pth("VAE", layout.vae, wan_vae.expected_upstream_shapes(dims))


def _check_t5(layout: CheckpointLayout, model: str) -> ComponentReport:
    from avatar.services.encoder import text_encoder

    dims = text_encoder.TINY_T5 if model == "tiny" else text_encoder.UMT5_XXL
    return _check_pth("T5", layout.t5, text_encoder.expected_upstream_shapes(dims))


def _check_pth(name: str, path: pathlib.Path, expected: dict[str, tuple[int, ...]]) -> ComponentReport:
    rep = ComponentReport(name, path)
    try:
        header = read_pth_header(path)
    except WeightsError as e:
        rep.problems.append(str(e))
        return rep
    shapes = {k: s for k, (s, _) in header.items()}
    rep.found = (
        f"{len(shapes)} tensors, {'/'.join(sorted({d for _, d in header.values()}))}, {_params(shapes)} parameters"
    )
    rep.problems += shape_problems(shapes, expected)
    return rep


def _check_tokenizer(layout: CheckpointLayout) -> ComponentReport:
    rep = ComponentReport("tokenizer", layout.tokenizer)
    if not layout.tokenizer.is_dir():
        rep.problems.append("folder missing")
        return rep
    names = sorted(p.name for p in layout.tokenizer.iterdir())
    rep.found = ", ".join(names)
    if "tokenizer_config.json" not in names:
        rep.problems.append("tokenizer_config.json missing")
    if "tokenizer.json" not in names and "spiece.model" not in names:
        rep.problems.append("neither tokenizer.json nor spiece.model present")
    return rep


def _check_wav2vec2(layout: CheckpointLayout, model: str) -> ComponentReport:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from avatar.presets import MODEL_DIMS

    rep = ComponentReport("wav2vec2", layout.wav2vec2)
    folder = layout.wav2vec2
    if not folder.is_dir():
        rep.problems.append("folder missing")
        return rep
    for required in ("config.json", "preprocessor_config.json"):
        if not (folder / required).is_file():
            rep.problems.append(f"{required} missing")
    if not (folder / "config.json").is_file():
        return rep
    try:
        cfg = Wav2Vec2Config.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        rep.problems.append(f"config.json unreadable ({e})")
        return rep
    dims = MODEL_DIMS[model]
    if (cfg.hidden_size, cfg.num_hidden_layers + 1) != (dims.audio_dim, dims.audio_layers):
        rep.problems.append(
            f"config has {cfg.num_hidden_layers + 1} hidden states x {cfg.hidden_size}; "
            f"the {model} DiT needs {dims.audio_layers} x {dims.audio_dim}"
        )
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        rep.problems.append("no weights (model.safetensors or pytorch_model.bin)")
        return rep
    try:
        header = read_safetensors_header(weights) if weights.suffix == ".safetensors" else read_pth_header(weights)
    except WeightsError as e:
        rep.problems.append(str(e))
        return rep
    shapes = {_hf_weight_norm_name(k): s for k, (s, _) in header.items()}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Wav2Vec2ForCTC(cfg).state_dict().items()}
    # masked_spec_embed only serves training-time masking; checkpoints may omit it
    expected = {k: v for k, v in expected.items() if not k.endswith("masked_spec_embed") or k in shapes}
    rep.found = (
        f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}, {weights.name}: {len(shapes)} tensors, "
        f"{_params(shapes)} parameters"
    )
    rep.problems += shape_problems(shapes, expected)
    return rep


def _hf_weight_norm_name(name: str) -> str:
    # older transformers checkpoints store the positional conv's weight norm as weight_g / weight_v
    return name.replace(".weight_g", ".parametrizations.weight.original0").replace(
        ".weight_v", ".parametrizations.weight.original1"
    )


_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")


def _check_lora(path: pathlib.Path, linear: dict[str, tuple[int, ...]]) -> ComponentReport:
    rep = ComponentReport("LoRA", path)
    try:
        header = read_safetensors_header(path)
    except WeightsError as e:
        rep.problems.append(str(e))
        return rep
    targets = {n for n in linear if n.split(".")[-1] in LORA_TARGETS or n.endswith((".ffn.0", ".ffn.2"))}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    other, unknown, bad = [], [], []
    for key, (shape, _) in header.items():
        m = _LORA_KEY.fullmatch(key)
        if not m:
            other.append(key)
            continue
        module, ab = m.group(1), m.group(2)
        if module not in targets:
            unknown.append(key)
            continue
        pairs.setdefault(module, {})[ab] = shape
    ranks = set()
    for module, ab in sorted(pairs.items()):
        out_f, in_f = linear[module]
        if set(ab) != {"A", "B"}:
            bad.append(f"{module} has only lora_{''.join(ab)}")
            continue
        (ra, ia), (ob, rb) = ab["A"], ab["B"]
        ranks.add(ra)
        if ia != in_f or ob != out_f or ra != rb:
            bad.append(f"{module}: A {list(ab['A'])}, B {list(ab['B'])} do not fit a [{out_f}, {in_f}] layer")
    rep.found = f"{len(pairs)} of {len(targets)} target layers, rank {'/'.join(map(str, sorted(ranks))) or '-'}" + (
        f", {len(other)} non-LoRA tensors (ignored)" if other else ""
    )
    if not pairs:
        rep.problems.append(
            "no LoRA tensor matches a layer of the DiT (expected names like "
            "base_model.model.blocks.0.self_attn.q.lora_A.default.weight)"
        )
    if unknown:
        rep.problems.append(
            f"{len(unknown)} LoRA tensor(s) for layers the DiT does not have: " + ", ".join(sorted(unknown)[:5])
        )
    rep.problems += bad[:5] + ([f"... {len(bad) - 5} more"] if len(bad) > 5 else [])
    return rep


def _params(shapes: dict[str, tuple[int, ...]]) -> str:
    n = 0
    for s in shapes.values():
        k = 1
        for d in s:
            k *= d
        n += k
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


# -- download ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Downloaded:
    ckpt_dir: pathlib.Path  # pass as --ckpt_dir
    lora_path: pathlib.Path | None  # pass as --lora_path


def manual_commands(dest_dir: str | pathlib.Path) -> str:
    dest = pathlib.Path(dest_dir)
    includes = " ".join(f'--include "{p}"' for p in S2V_FILES)
    return (
        f"  hf download {S2V_REPO} {includes} --local-dir {dest / S2V_FOLDER}\n"
        f"  hf download {LORA_REPO} {LORA_FILE} --local-dir {dest / LORA_FOLDER}\n"
        f"(`hf` comes with huggingface_hub >= 1.0, as pinned in requirements.txt)"
    )


def download_weights(dest_dir: str | pathlib.Path, lora: bool = True, timeout_s: float = 10.0) -> Downloaded:
    """Fetches Wan2.2-S2V-14B (only the files --ckpt_dir needs) and the LiveAvatar LoRA into
    DEST/Wan2.2-S2V-14B and DEST/LiveAvatar/liveavatar.safetensors. Resumable (run it again after an
    interruption); progress bars from huggingface_hub. Offline it fails at once with the manual commands."""
    dest = pathlib.Path(dest_dir).expanduser()
    _require_hub(dest, timeout_s)
    from huggingface_hub import hf_hub_download, snapshot_download

    dest.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(repo_id=S2V_REPO, local_dir=str(dest / S2V_FOLDER), allow_patterns=S2V_FILES)
        lora_path = (
            pathlib.Path(hf_hub_download(repo_id=LORA_REPO, filename=LORA_FILE, local_dir=str(dest / LORA_FOLDER)))
            if lora
            else None
        )
    except Exception as e:  # network, auth, disk: huggingface_hub raises many types
        raise WeightsError(
            f"download interrupted ({type(e).__name__}: {e}); run the same command again to resume, "
            f"or fetch by hand:\n{manual_commands(dest)}"
        ) from e
    return Downloaded(dest / S2V_FOLDER, lora_path)


def _require_hub(dest: pathlib.Path, timeout_s: float) -> None:
    """Fails fast, with the manual commands, when the Hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise WeightsError(
            f"HF_HUB_OFFLINE is set, so nothing can be downloaded. On a machine with internet run:\n"
            f"{manual_commands(dest)}\nthen copy {dest} here."
        )
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise WeightsError(
            f"cannot reach {endpoint} ({e.strerror or e}); this machine looks offline. "
            f"On a machine with internet run:\n{manual_commands(dest)}\nthen copy {dest} here."
        ) from e
