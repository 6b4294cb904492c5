"""Wan2.1 VAE: diffusers' AutoencoderKLWan loaded from upstream's Wan2.1_VAE.pth, with streaming decode.

Upstream (Wan2.1 `vae2_1.py`) and diffusers implement the same causal 3D VAE under different
parameter names; `upstream_key_map` renames one to the other, so `Wan2.1_VAE.pth` loads strictly
into diffusers' class. Latents are normalised per channel with Wan2.1's 16 means/stds, as upstream.

Decoding is causal: each latent frame is decoded with a cache of the last frames every causal
conv saw. `StreamingDecoder` keeps that cache between calls, so decoding block after block gives
the same pixels as decoding every latent at once.
"""

import copy
import dataclasses
import pathlib
import threading

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanCausalConv3d, WanResample

from avatar.checkpoints import check_state_dict, load_pth, resolve_ckpt_dir
from avatar.errors import InvalidInput, WeightsError
from avatar.presets import ModelSpec

# Per-channel statistics of Wan2.1 latents (upstream `WanVAE.mean/std`); the tiny VAE uses the same
# constants so that both presets share one normalisation code path and latent contract.
WAN21_LATENT_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENT_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)
TIME_STRIDE = 4  # pixel frames per latent frame after the first
SPACE_STRIDE = 8


@dataclasses.dataclass(frozen=True)
class VAEDims:
    """Constructor arguments of the Wan2.1 VAE (upstream `_video_vae` names them the same way)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    def build(self) -> AutoencoderKLWan:
        """The diffusers model (on the current default device: use `torch.device("meta")` to skip allocation)."""
        if self.z_dim != len(WAN21_LATENT_MEAN):
            raise ValueError(f"Wan2.1 latent statistics are for z_dim 16, not {self.z_dim}")
        return AutoencoderKLWan(
            base_dim=self.base_dim,
            z_dim=self.z_dim,
            dim_mult=list(self.dim_mult),
            num_res_blocks=self.num_res_blocks,
            attn_scales=[],
            temperal_downsample=list(self.temperal_downsample),
            latents_mean=list(WAN21_LATENT_MEAN),
            latents_std=list(WAN21_LATENT_STD),
        )


S2V_14B_VAE = VAEDims()  # Wan2.1_VAE.pth as shipped with Wan2.2-S2V-14B
TINY_VAE = VAEDims(base_dim=8, num_res_blocks=1)  # same classes, 1/12 of the width


def _upstream_name(name: str, dims: VAEDims) -> str:
    """diffusers parameter name -> upstream `WanVAE_` parameter name."""
    parts = name.split(".")
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    if parts[0] in top:
        return ".".join([top[parts[0]], *parts[1:]])
    side, rest = parts[0], parts[1:]
    if rest[0] == "conv_in":
        return ".".join([side, "conv1", *rest[1:]])
    if rest[0] == "norm_out":
        return ".".join([side, "head.0", *rest[1:]])
    if rest[0] == "conv_out":
        return ".".join([side, "head.2", *rest[1:]])
    if rest[0] == "mid_block":
        kind, i, leaf = rest[1], int(rest[2]), rest[3:]
        if kind == "attentions":
            return ".".join([side, "middle", str(2 * i + 1), *leaf])
        return ".".join([side, "middle", str(2 * i), *_upstream_resnet_leaf(leaf)])
    if rest[0] == "down_blocks":
        i, leaf = rest[1], rest[2:]
        return ".".join([side, "downsamples", i, *_upstream_resnet_leaf(leaf)])
    if rest[0] == "up_blocks":
        # upstream lists each level flat: (num_res_blocks + 1) residual blocks, then the upsampler
        level, kind, j, leaf = int(rest[1]), rest[2], int(rest[3]), rest[4:]
        per_level = dims.num_res_blocks + 2
        if kind == "upsamplers":
            return ".".join([side, "upsamples", str(level * per_level + dims.num_res_blocks + 1), *leaf])
        return ".".join([side, "upsamples", str(level * per_level + j), *_upstream_resnet_leaf(leaf)])
    raise ValueError(f"no upstream name for VAE parameter {name}")


def _upstream_resnet_leaf(leaf: list[str]) -> list[str]:
    # upstream residual blocks are one nn.Sequential: RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv
    renames = {
        "norm1": ["residual", "0"],
        "conv1": ["residual", "2"],
        "norm2": ["residual", "3"],
        "conv2": ["residual", "6"],
        "conv_shortcut": ["shortcut"],
    }
    return [*renames.get(leaf[0], [leaf[0]]), *leaf[1:]]


def upstream_key_map(model: AutoencoderKLWan, dims: VAEDims) -> dict[str, str]:
    """upstream name -> diffusers name for every parameter of `model` (one to one)."""
    out = {}
    for name in model.state_dict():
        up = _upstream_name(name, dims)
        if up in out:
            raise ValueError(f"VAE parameters {out[up]} and {name} both map to {up}")
        out[up] = name
    return out


def expected_upstream_shapes(dims: VAEDims = S2V_14B_VAE) -> dict[str, tuple[int, ...]]:
    """upstream name -> shape, from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = dims.build()
    sd = model.state_dict()
    return {up: tuple(sd[name].shape) for up, name in upstream_key_map(model, dims).items()}


def infer_dims(shapes: dict[str, tuple[int, ...]], source: str = "VAE checkpoint") -> VAEDims:
    """Reads the constructor arguments back from the tensor shapes of an upstream-layout state dict."""
    try:
        base = shapes["encoder.conv1.weight"][0]
        z_dim = shapes["conv2.weight"][0]
        layers: dict[int, set[str]] = {}
        for k in shapes:
            if k.startswith("encoder.downsamples."):
                idx, leaf = k.split(".", 3)[2:4]
                layers.setdefault(int(idx), set()).add(leaf)
        mult, temporal, res_in_level, per_level = [], [], 0, []
        for i in sorted(layers):
            leaves = layers[i]
            if "resample.1.weight" in leaves:
                temporal.append("time_conv.weight" in leaves)
                per_level.append(res_in_level)
                res_in_level = 0
            elif "residual.2.weight" in leaves:
                if res_in_level == 0:
                    mult.append(shapes[f"encoder.downsamples.{i}.residual.2.weight"][0] // base)
                res_in_level += 1
            else:
                raise WeightsError(
                    f"{source}: encoder.downsamples.{i} is neither a residual block nor a "
                    f"resample (attention inside the encoder is not supported)"
                )
        per_level.append(res_in_level)
    except KeyError as e:
        raise WeightsError(f"{source}: not a Wan2.1 VAE state dict (no {e.args[0]})") from e
    if len(set(per_level)) != 1 or len(mult) != len(temporal) + 1:
        raise WeightsError(f"{source}: irregular encoder layout (residual blocks per level {per_level})")
    return VAEDims(
        base_dim=base,
        z_dim=z_dim,
        dim_mult=tuple(mult),
        num_res_blocks=per_level[0],
        temperal_downsample=tuple(temporal),
    )


def _place(model: AutoencoderKLWan, device, dtype) -> AutoencoderKLWan:
    # nn.Module.to: diffusers' override only adds a warning about fp32-pinned modules (this VAE has none)
    return torch.nn.Module.to(model, device=device, dtype=_dtype(dtype))


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class WanVAE:
    """The Wan2.1 VAE with Wan latent normalisation. Calls are re-entrant: every encode/decode and
    every StreamingDecoder has its own causal cache, so one instance serves concurrent streams."""

    def __init__(self, model: AutoencoderKLWan, dims: VAEDims):
        self.model = model.eval().requires_grad_(False)
        self.dims = dims
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.mean = torch.tensor(WAN21_LATENT_MEAN, device=self.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(WAN21_LATENT_STD, device=self.device, dtype=torch.float32).view(
            1, -1, 1, 1, 1
        )
        self._dec_convs = sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())
        self._enc_convs = sum(isinstance(m, WanCausalConv3d) for m in model.encoder.modules())
        self._steady_encoder: torch.nn.Module | None = None
        self._steady_lock = threading.Lock()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_upstream(
        cls, path: str | pathlib.Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
    ) -> "WanVAE":
        """Loads upstream's Wan2.1_VAE.pth (any size: dims are read from the tensor shapes), strictly."""
        sd = load_pth(path)
        dims = infer_dims({k: tuple(v.shape) for k, v in sd.items()}, str(path))
        with torch.device("meta"):
            model = dims.build()
        key_map = upstream_key_map(model, dims)
        target = model.state_dict()
        check_state_dict(
            path,
            "Wan2.1 VAE",
            {k: tuple(v.shape) for k, v in sd.items()},
            {up: tuple(target[name].shape) for up, name in key_map.items()},
        )
        model.load_state_dict({key_map[k]: v for k, v in sd.items()}, strict=True, assign=True)
        return cls(_place(model, device, dtype), dims)

    @classmethod
    def tiny(
        cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
    ) -> "WanVAE":
        """Same classes at small width, random weights from `seed` (reproducible across machines)."""
        return cls.random(TINY_VAE, seed, device, dtype)

    @classmethod
    def random(
        cls,
        dims: VAEDims = S2V_14B_VAE,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ) -> "WanVAE":
        """Random weights (seeded on CPU), e.g. the full-size VAE for benchmarks without the files."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = dims.build()
        return cls(_place(model, device, dtype), dims)

    @classmethod
    def from_spec(cls, spec: ModelSpec, device: str | torch.device | None = None) -> "WanVAE":
        """The VAE a service runs for a ModelSpec: tiny (seeded), full-size random, or from ckpt_dir."""
        device = torch.device(device or spec.device)
        dtype = torch.float32 if spec.is_tiny or device.type == "cpu" else _dtype(spec.dtype)
        if spec.from_files:
            return cls.from_upstream(resolve_ckpt_dir(spec.ckpt_dir).vae, device, dtype)
        if spec.is_tiny:
            return cls.tiny(spec.seed, device, dtype)
        if spec.random_weights:
            return cls.random(S2V_14B_VAE, spec.seed, device, dtype)
        raise WeightsError("s2v-14b needs --ckpt_dir (or --random-weights for benchmarks)")

    @staticmethod
    def build_meta(dims: VAEDims = S2V_14B_VAE) -> AutoencoderKLWan:
        """The diffusers model on the meta device: names and shapes without memory."""
        with torch.device("meta"):
            return dims.build()

    # -- encode / decode -----------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + (T-1)//4, H/8, W/8] (float32).

        Like upstream, the first frame is encoded alone and then 4 frames at a time; trailing frames
        that do not fill a group of 4 are ignored."""
        self._check_pixels(pixels)
        x = pixels.to(device=self.device, dtype=self.dtype)
        cache: list = [None] * self._enc_convs
        chunks = [x[:, :, :1]] + [
            x[:, :, 1 + TIME_STRIDE * i : 1 + TIME_STRIDE * (i + 1)] for i in range((x.shape[2] - 1) // TIME_STRIDE)
        ]
        out = torch.cat([self.model.encoder(c, feat_cache=cache, feat_idx=[0]) for c in chunks], dim=2)
        return self._normalise(self.model.quant_conv(out))

    @torch.no_grad()
    def encode_still(self, image: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Latents of `image` [B, 3, 1, H, W] repeated `num_frames` times, = encode(image.repeat(...)).

        A still input drives every causal cache to a fixed point after a few groups of 4 frames
        (the receptive field in time is finite); from then on every latent frame is identical, so
        the rest are copies. Exact, and much cheaper for upstream's 365-frame motion context."""
        self._check_pixels(image)
        if image.shape[2] != 1 or num_frames < 1:
            raise ValueError("encode_still takes one frame [B, 3, 1, H, W] and num_frames >= 1")
        x = image.to(device=self.device, dtype=self.dtype)
        cache: list = [None] * self._enc_convs
        groups = (num_frames - 1) // TIME_STRIDE
        outs = [self.model.encoder(x, feat_cache=cache, feat_idx=[0])]
        group = x.expand(-1, -1, TIME_STRIDE, -1, -1)
        prev = None
        while len(outs) < 1 + groups:
            outs.append(self.model.encoder(group, feat_cache=cache, feat_idx=[0]))
            state = list(cache)  # the encoder replaces cache entries, never writes into them
            if prev is not None and _same_state(prev, state):
                outs.extend([outs[-1]] * (1 + groups - len(outs)))
                break
            prev = state
        return self._normalise(self.model.quant_conv(torch.cat(outs, dim=2)))

    @torch.no_grad()
    def encode_steady(self, image: torch.Tensor) -> torch.Tensor:
        """The latent every frame of a still video of `image` [B, 3, 1, H, W] settles to: [B, 16, 1, h, w].

        On a constant input each causal conv sees the same frame at every tap once the zero padding
        of the first frame has left its temporal receptive field (112 frames, 28 groups of 4, for
        the Wan2.1 encoder: measured 29 in bf16, docs/performance.md), so the steady state is the
        encoder with every temporal kernel summed over time, run on one frame: one pass instead of
        the ~30 groups encode_still iterates. Equal to encode_still's tail up to float rounding."""
        self._check_pixels(image)
        if image.shape[2] != 1:
            raise ValueError("encode_steady takes one frame [B, 3, 1, H, W]")
        with self._steady_lock:
            if self._steady_encoder is None:
                self._steady_encoder = _steady_state_encoder(self.model.encoder)
        out = self._steady_encoder(image.to(device=self.device, dtype=self.dtype))
        return self._normalise(self.model.quant_conv(out))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, 16, t, h, w] -> pixels [B, 3, 1 + 4(t-1), 8h, 8w] in [-1, 1] (float32)."""
        return self.stream_decoder().decode(latents)

    def stream_decoder(self, decoder: torch.nn.Module | None = None) -> "StreamingDecoder":
        """decoder: the module to run (e.g. a compiled wrapper of self.model.decoder); default eager."""
        return StreamingDecoder(self, decoder)

    # -- helpers -------------------------------------------------------------------------------

    def _normalise(self, moments: torch.Tensor) -> torch.Tensor:
        mu = moments[:, : self.dims.z_dim].float()
        return (mu - self.mean) * self.inv_std

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise InvalidInput(f"VAE input must be [B, 3, T, H, W], got {list(pixels.shape)}")
        if pixels.shape[3] % SPACE_STRIDE or pixels.shape[4] % SPACE_STRIDE:
            raise InvalidInput(
                f"VAE input height and width must be multiples of {SPACE_STRIDE}, "
                f"got {pixels.shape[3]}x{pixels.shape[4]}"
            )


class StreamingDecoder:
    """Decodes one stream's latents block after block, carrying the causal conv cache between calls."""

    def __init__(self, vae: WanVAE, decoder: torch.nn.Module | None = None):
        self.vae = vae
        self._decoder = decoder if decoder is not None else vae.model.decoder
        self._cache: list = [None] * vae._dec_convs
        self._first = True
        self.frames_in = 0  # latent frames decoded so far

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, t, h, w] (normalised) -> pixels [B, 3, n, 8h, 8w] in [-1, 1], float32, where
        n = 1 + 4(t-1) for the stream's first call and 4t afterwards."""
        vae = self.vae
        if self._cache is None:
            raise RuntimeError("StreamingDecoder is closed")
        if latents.ndim != 5 or latents.shape[1] != vae.dims.z_dim:
            raise InvalidInput(f"latents must be [B, {vae.dims.z_dim}, t, h, w], got {list(latents.shape)}")
        if latents.shape[2] == 0:
            raise InvalidInput("latents hold no frame")
        z = (latents.to(device=vae.device, dtype=torch.float32) / vae.inv_std + vae.mean).to(vae.dtype)
        outs = []
        for i in range(z.shape[2]):
            # one latent frame at a time through every layer: the same kernels run on the same shapes
            # whatever the block split, so streamed pixels are bit-identical to a one-shot decode
            x = vae.model.post_quant_conv(z[:, :, i : i + 1])
            outs.append(self._decoder(x, feat_cache=self._cache, feat_idx=[0], first_chunk=self._first))
            self._first = False
        self.frames_in += z.shape[2]
        return torch.cat(outs, dim=2).float().clamp_(-1.0, 1.0)

    def close(self) -> None:
        """Frees the cache (a few frames of activations per causal conv); the decoder is unusable after."""
        self._cache = None


class _SteadyTimeDownsample(torch.nn.Module):
    """A downsample3d WanResample on a constant video: the spatial downsample, then its (summed)
    temporal conv, which diffusers applies only when it holds a cache."""

    def __init__(self, resample: WanResample):
        super().__init__()
        resample.mode = "downsample2d"  # the spatial part only
        self.resample = resample

    def forward(self, x, feat_cache=None, feat_idx=(0,)):
        return self.resample.time_conv(self.resample(x))


def _steady_state_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of the Wan2.1 encoder that maps one frame to the steady state of a still video of it:
    every causal conv's temporal kernel summed over time (the taps all see the same frame)."""
    steady = copy.deepcopy(encoder)
    for module in steady.modules():  # a forward patched onto an instance would still run the original
        module.__dict__.pop("forward", None)
    for name, module in list(steady.named_modules()):
        if isinstance(module, WanResample) and module.mode == "downsample3d":
            parent_name, _, child = name.rpartition(".")
            setattr(steady.get_submodule(parent_name), child, _SteadyTimeDownsample(module))
        elif isinstance(module, WanResample) and module.mode != "downsample2d":
            raise ValueError(f"steady-state encoding does not handle WanResample mode {module.mode!r}")
    for module in steady.modules():
        if isinstance(module, WanCausalConv3d) and module.kernel_size[0] > 1:
            module.weight = torch.nn.Parameter(module.weight.sum(2, keepdim=True), requires_grad=False)
            module.kernel_size = (1, *module.kernel_size[1:])
            module.stride = (1, *module.stride[1:])
            module._padding = (*module._padding[:4], 0, 0)
    return steady


def _same_state(a: list, b: list) -> bool:
    return all(
        (x is y)
        or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y))
        or (x == y if isinstance(x, str) else False)
        for x, y in zip(a, b)
    )
