"""Wan2.1 VAE: diffusers' AutoencoderKLWan loaded from upstream's Wan2.1_VAE.pth, with streaming decode.

Upstream (Wan2.1 `vae2_1.py`) and diffusers implement the same causal 3D VAE under different
parameter names; `upstream_key_map` renames one to the other, so `Wan2.1_VAE.pth` loads strictly
into diffusers' class. Latents are normalised per channel with Wan2.1's 16 means/stds, as upstream.

Decoding is causal: each latent frame is decoded with a cache of the last frames every causal
conv saw. `StreamingDecoder` keeps that cache between calls, so decoding block after block gives
the same pixels as decoding every latent at once.

Tiling (`stream_decoder(tile_px)`) bounds the decoder's activation memory by one tile instead of the
whole frame: the latent is cut into overlapping square tiles, each decoded alone and blended into the
frame with linear ramps over the overlap. A causal conv's cache holds that conv's input of the last
frames, which for a tile is the tile's own activations (near its edges they differ from the whole
frame's: the tile is zero-padded there), so every tile keeps its own cache across calls. That makes a
tiled stream exactly equal to a tiled one-shot decode; sharing one cache would mix tiles up. The
caches, unlike the activations, add up: they cover the tiles' total area, overlaps included (at
704x384 in bf16 about 1.2 GiB untiled, 2.3 GiB in 256-pixel tiles).
"""
import dataclasses
import pathlib

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanCausalConv3d

from avatar.checkpoints import check_state_dict, load_pth, resolve_ckpt_dir
from avatar.errors import InvalidInput, WeightsError
from avatar.presets import ModelSpec

# Per-channel statistics of Wan2.1 latents (upstream `WanVAE.mean/std`); the tiny VAE uses the same
# constants so that both presets share one normalisation code path and latent contract.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
TIME_STRIDE = 4      # pixel frames per latent frame after the first
SPACE_STRIDE = 8
TILE_MULTIPLE, MIN_TILE = 64, 128   # tile sides in pixels (stream_decoder)


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
            base_dim=self.base_dim, z_dim=self.z_dim, dim_mult=list(self.dim_mult),
            num_res_blocks=self.num_res_blocks, attn_scales=[],
            temperal_downsample=list(self.temperal_downsample),
            latents_mean=list(WAN21_LATENT_MEAN), latents_std=list(WAN21_LATENT_STD),
        )


S2V_14B_VAE = VAEDims()                         # Wan2.1_VAE.pth as shipped with Wan2.2-S2V-14B
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
    renames = {"norm1": ["residual", "0"], "conv1": ["residual", "2"], "norm2": ["residual", "3"],
               "conv2": ["residual", "6"], "conv_shortcut": ["shortcut"]}
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
                raise WeightsError(f"{source}: encoder.downsamples.{i} is neither a residual block nor a "
                                   f"resample (attention inside the encoder is not supported)")
        per_level.append(res_in_level)
    except KeyError as e:
        raise WeightsError(f"{source}: not a Wan2.1 VAE state dict (no {e.args[0]})") from e
    if len(set(per_level)) != 1 or len(mult) != len(temporal) + 1:
        raise WeightsError(f"{source}: irregular encoder layout (residual blocks per level {per_level})")
    return VAEDims(base_dim=base, z_dim=z_dim, dim_mult=tuple(mult), num_res_blocks=per_level[0],
                   temperal_downsample=tuple(temporal))


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
        self.inv_std = 1.0 / torch.tensor(WAN21_LATENT_STD, device=self.device,
                                          dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._dec_convs = sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())
        self._enc_convs = sum(isinstance(m, WanCausalConv3d) for m in model.encoder.modules())

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_upstream(cls, path: str | pathlib.Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | str = torch.float32) -> "WanVAE":
        """Loads upstream's Wan2.1_VAE.pth (any size: dims are read from the tensor shapes), strictly."""
        sd = load_pth(path)
        dims = infer_dims({k: tuple(v.shape) for k, v in sd.items()}, str(path))
        with torch.device("meta"):
            model = dims.build()
        key_map = upstream_key_map(model, dims)
        target = model.state_dict()
        check_state_dict(path, "Wan2.1 VAE", {k: tuple(v.shape) for k, v in sd.items()},
                         {up: tuple(target[name].shape) for up, name in key_map.items()})
        model.load_state_dict({key_map[k]: v for k, v in sd.items()}, strict=True, assign=True)
        return cls(_place(model, device, dtype), dims)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu",
             dtype: torch.dtype | str = torch.float32) -> "WanVAE":
        """Same classes at small width, random weights from `seed` (reproducible across machines)."""
        return cls.random(TINY_VAE, seed, device, dtype)

    @classmethod
    def random(cls, dims: VAEDims = S2V_14B_VAE, seed: int = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32) -> "WanVAE":
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
        chunks = [x[:, :, :1]] + [x[:, :, 1 + TIME_STRIDE * i: 1 + TIME_STRIDE * (i + 1)]
                                  for i in range((x.shape[2] - 1) // TIME_STRIDE)]
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
            state = list(cache)   # the encoder replaces cache entries, never writes into them
            if prev is not None and _same_state(prev, state):
                outs.extend([outs[-1]] * (1 + groups - len(outs)))
                break
            prev = state
        return self._normalise(self.model.quant_conv(torch.cat(outs, dim=2)))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, 16, t, h, w] -> pixels [B, 3, 1 + 4(t-1), 8h, 8w] in [-1, 1] (float32)."""
        return self.stream_decoder().decode(latents)

    def stream_decoder(self, tile_px: int = 0) -> "StreamingDecoder":
        """A decoder for one stream; tile_px > 0 decodes in tile_px x tile_px pixel tiles (see module doc)."""
        return StreamingDecoder(self, tile_px)

    # -- helpers -------------------------------------------------------------------------------

    def _normalise(self, moments: torch.Tensor) -> torch.Tensor:
        mu = moments[:, : self.dims.z_dim].float()
        return (mu - self.mean) * self.inv_std

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise InvalidInput(f"VAE input must be [B, 3, T, H, W], got {list(pixels.shape)}")
        if pixels.shape[3] % SPACE_STRIDE or pixels.shape[4] % SPACE_STRIDE:
            raise InvalidInput(f"VAE input height and width must be multiples of {SPACE_STRIDE}, "
                               f"got {pixels.shape[3]}x{pixels.shape[4]}")


def check_tile_px(tile_px) -> int:
    """tile_px for `WanVAE.stream_decoder`: 0 (whole frame) or a multiple of 64 pixels >= 128."""
    if isinstance(tile_px, bool) or not isinstance(tile_px, int):
        raise InvalidInput(f"VAE tile size must be an integer number of pixels, got {tile_px!r}")
    if tile_px and (tile_px < MIN_TILE or tile_px % TILE_MULTIPLE):
        raise InvalidInput(f"VAE tile size must be 0 (off) or a multiple of {TILE_MULTIPLE} pixels that is at "
                           f"least {MIN_TILE}, got {tile_px}")
    return tile_px


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts of the fewest full-size tiles that cover `length` with strides of at most `stride`,
    spread evenly. Full-size rather than cut short at the edge (as diffusers does): a sliver tile
    would be mostly zero padding and decode badly; even spreading keeps every overlap alike."""
    if length <= tile:
        return [0]
    gaps = -(-(length - tile) // stride)      # ceil
    return [round(i * (length - tile) / gaps) for i in range(gaps + 1)]


def _axis_weights(starts: list[int], tile: int, ramp: int) -> list[torch.Tensor]:
    """Per tile, its blend weight along one axis ([tile] values, pixels; starts in pixels).

    Neighbours cross-fade with a linear ramp of `ramp` pixels centred in their overlap: the whole
    overlap at the nominal stride (as diffusers); where tiles were spread closer and overlap more,
    centring keeps both tiles' edges, which zero padding distorts, out of the blend. The two sides'
    ramps sum to 1, so the tiles' weights sum to 1 at every pixel."""
    up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
    weights = []
    for k, start in enumerate(starts):
        w = torch.ones(tile)
        if k > 0:          # fade in over the middle of the overlap with the previous tile
            lo = (start + starts[k - 1] + tile - ramp) // 2 - start
            w[:lo] = 0.0
            w[lo:lo + ramp] = up
        if k < len(starts) - 1:
            lo = (starts[k + 1] + start + tile - ramp) // 2 - start
            w[lo:lo + ramp] = 1.0 - up
            w[lo + ramp:] = 0.0
        weights.append(w)
    return weights


@dataclasses.dataclass
class _Tile:
    y: int                    # top-left corner and side lengths, in latents
    x: int
    h: int
    w: int
    weight: torch.Tensor      # [8h, 8w] blend weight (float32, on the VAE's device)
    cache: list               # this tile's causal conv cache


class StreamingDecoder:
    """Decodes one stream's latents block after block, carrying the causal conv cache between calls.

    tile_px > 0: the frame is decoded in tiles of tile_px x tile_px pixels overlapping by a quarter
    of a tile (as diffusers' tiled decode), each with its own cache; a frame within one tile is
    decoded whole, bit-identical to tile_px = 0."""

    def __init__(self, vae: WanVAE, tile_px: int = 0):
        self.vae = vae
        self.tile = check_tile_px(tile_px) // SPACE_STRIDE    # tile side in latents (0: off)
        self._cache: list | None = [None] * vae._dec_convs    # the whole frame's cache (untiled)
        self._tiles: list[_Tile] | None = None                 # set by the first call when tiled
        self._hw: tuple[int, int] | None = None
        self._first = True
        self._closed = False
        self.frames_in = 0   # latent frames decoded so far

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, t, h, w] (normalised) -> pixels [B, 3, n, 8h, 8w] in [-1, 1], float32, where
        n = 1 + 4(t-1) for the stream's first call and 4t afterwards."""
        vae = self.vae
        if self._closed:
            raise RuntimeError("StreamingDecoder is closed")
        if latents.ndim != 5 or latents.shape[1] != vae.dims.z_dim:
            raise InvalidInput(f"latents must be [B, {vae.dims.z_dim}, t, h, w], got {list(latents.shape)}")
        if latents.shape[2] == 0:
            raise InvalidInput("latents hold no frame")
        hw = tuple(latents.shape[3:])
        if self._hw is None:
            self._hw = hw
            if self.tile and (hw[0] > self.tile or hw[1] > self.tile):
                self._tiles = self._layout(*hw)
                self._cache = None
        elif hw != self._hw:
            raise InvalidInput(f"latents are {hw[0]}x{hw[1]}, but this stream started at "
                               f"{self._hw[0]}x{self._hw[1]} (the causal cache is per size)")
        z = (latents.to(device=vae.device, dtype=torch.float32) / vae.inv_std + vae.mean).to(vae.dtype)
        first = self._first
        if self._tiles is None:
            out = self._decode_frames(z, self._cache, first).float()
        else:
            b, _, t, h, w = z.shape
            frames = 1 + TIME_STRIDE * (t - 1) if first else TIME_STRIDE * t
            out = torch.zeros(b, 3, frames, h * SPACE_STRIDE, w * SPACE_STRIDE, device=vae.device)
            for tile in self._tiles:
                # one tile at a time: only this tile's activations are alive besides `out`
                pix = self._decode_frames(z[:, :, :, tile.y:tile.y + tile.h, tile.x:tile.x + tile.w],
                                          tile.cache, first)
                y, x = tile.y * SPACE_STRIDE, tile.x * SPACE_STRIDE
                out[:, :, :, y:y + pix.shape[3], x:x + pix.shape[4]].addcmul_(pix.float(), tile.weight)
                del pix
        self._first = False
        self.frames_in += z.shape[2]
        return out.clamp_(-1.0, 1.0)

    def close(self) -> None:
        """Frees the caches (a few frames of activations per causal conv); the decoder is unusable after."""
        self._cache = None
        self._tiles = None
        self._closed = True

    def _decode_frames(self, z: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
        outs = []
        for i in range(z.shape[2]):
            # one latent frame at a time through every layer: the same kernels run on the same shapes
            # whatever the block split, so streamed pixels are bit-identical to a one-shot decode
            x = self.vae.model.post_quant_conv(z[:, :, i:i + 1])
            outs.append(self.vae.model.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first))
            first = False
        return torch.cat(outs, dim=2)

    def _layout(self, h: int, w: int) -> list[_Tile]:
        """The tiles of an h x w latent (stride = tile - tile // 4, as diffusers' 256 / 192 pixels)."""
        overlap = self.tile // 4
        stride = self.tile - overlap
        th, tw = min(self.tile, h), min(self.tile, w)
        ys, xs = _tile_starts(h, self.tile, stride), _tile_starts(w, self.tile, stride)
        ramp = overlap * SPACE_STRIDE
        wy = _axis_weights([y * SPACE_STRIDE for y in ys], th * SPACE_STRIDE, ramp)
        wx = _axis_weights([x * SPACE_STRIDE for x in xs], tw * SPACE_STRIDE, ramp)
        dev = self.vae.device
        return [_Tile(y, x, th, tw, torch.outer(ay, ax).to(dev), [None] * self.vae._dec_convs)
                for y, ay in zip(ys, wy) for x, ax in zip(xs, wx)]


def _same_state(a: list, b: list) -> bool:
    return all((x is y) or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y))
               or (x == y if isinstance(x, str) else False) for x, y in zip(a, b))

