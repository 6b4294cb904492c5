"""Light latent decoder: TAEHV's tiny causal decoder for Wan 2.1 latents, loaded from `taew2_1.pth`.

TAEHV (github.com/madebyollin/taehv, MIT licence, by Ollin Boer Bohan) is a small convolutional
autoencoder distilled to the latent space of a video VAE; `taew2_1` is the one for the Wan 2.1 VAE,
the VAE Wan2.2-S2V-14B uses. Its decoder is 2D convolutions per frame, three nearest upsamplings
(8x in space) and two 2x temporal expansions (4x in time), with "memory blocks" that see the
previous frame's input as their only temporal context. This file is our implementation of that
decoder (the encoder is not needed); parameter names and shapes follow the published file exactly,
so `decoder.*` of taew2_1.pth loads strictly.

Contract, the same as the full VAE's StreamingDecoder (avatar/models/wan_vae.py): normalised latents
[B, 16, t, h, w] in (TAEHV decodes the DiT's latents directly, without the VAE's mean/std), pixels
[B, 3, n, 8h, 8w] float32 in [-1, 1] out, with n = 1 + 4(t-1) on a stream's first call and 4t
after. Each latent frame yields 4 frames; like TAEHV, the stream's first 3 are dropped, so the
first latent frame gives 1 frame as the Wan VAE's does, and frame k of either decoder shows the
same instant.

Streaming: one latent frame at a time through every layer, each memory block keeping the last
frame it saw, so decoding block after block gives the same pixels as decoding all at once
(bit-identical: the same kernels run on the same shapes whatever the split).
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from avatar.checkpoints import check_state_dict, load_pth
from avatar.errors import InvalidInput, WeightsError
from avatar.presets import ModelSpec

TIME_STRIDE = 4  # frames per latent frame
SPACE_STRIDE = 8
STARTUP_FRAMES = TIME_STRIDE - 1  # the first latent frame's 4 outputs: only the last is a video frame
WHAT = "TAEHV decoder for Wan 2.1 latents (taew2_1)"


@dataclasses.dataclass(frozen=True)
class LightDims:
    """Channel widths of the decoder's four stages (taew2_1: 256, 128, 64, 64) and the latent width."""

    widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    z_dim: int = 16


TAEW2_1 = LightDims()
TINY_LIGHT = LightDims(widths=(32, 16, 8, 8))  # the tiny model's: same layers at 1/8 of the width


class _Conv3(nn.Conv2d):
    """3x3 convolution, same size."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__(n_in, n_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """Squashes latents smoothly into (-3, 3): out-of-range values cannot blow up the small decoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemoryBlock(nn.Module):
    """Residual block over [this frame, the previous frame's input] (zeros before the first frame)."""

    def __init__(self, n: int):
        super().__init__()
        # indices 0, 2, 4: the published names (ReLUs between the convolutions hold no weights)
        self.conv = nn.Sequential(_Conv3(2 * n, n), nn.ReLU(), _Conv3(n, n), nn.ReLU(), _Conv3(n, n))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TimeExpand(nn.Module):
    """One frame -> `stride` frames: a 1x1 convolution to stride x channels, split in time order."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, channels, h, w = x.shape
        return self.conv(x).reshape(frames * self.stride, channels, h, w)


class LightDecoderNet(nn.Module):
    """The decoder layers, at the published indices `decoder.0` .. `decoder.22`.

    Frames travel as [B * r, C, H, W], batch-major, where r (frames per latent frame) is 1 up to
    the first time expansion, then 2, then 4.
    """

    def __init__(self, dims: LightDims = TAEW2_1):
        super().__init__()
        w0, w1, w2, w3 = dims.widths
        self.dims = dims
        self.decoder = nn.ModuleList(
            [
                SoftClamp(),
                _Conv3(dims.z_dim, w0),
                nn.ReLU(),
                *(MemoryBlock(w0) for _ in range(3)),
                nn.Upsample(scale_factor=2),
                TimeExpand(w0, 1),  # taew2_1 leaves the first stage's time expansion off
                _Conv3(w0, w1, bias=False),
                *(MemoryBlock(w1) for _ in range(3)),
                nn.Upsample(scale_factor=2),
                TimeExpand(w1, 2),
                _Conv3(w1, w2, bias=False),
                *(MemoryBlock(w2) for _ in range(3)),
                nn.Upsample(scale_factor=2),
                TimeExpand(w2, 2),
                _Conv3(w2, w3, bias=False),
                nn.ReLU(),
                _Conv3(w3, 3),
            ]
        )
        self.memory_slots = [i for i, layer in enumerate(self.decoder) if isinstance(layer, MemoryBlock)]

    def forward(self, z: torch.Tensor, memory: list) -> torch.Tensor:
        """z [B, 16, h, w], one latent frame per stream -> [B, 4, 3, 8h, 8w] in about [0, 1].

        memory: one entry per memory block, the last frame that block saw ([B, C, H, W]) or None at
        a stream's start; updated in place (the stream's causal state)."""
        batch = z.shape[0]
        x = z
        slot = 0
        for layer in self.decoder:
            if isinstance(layer, MemoryBlock):
                frames = x.unflatten(0, (batch, -1))  # [B, r, C, H, W]
                last = memory[slot]
                first = torch.zeros_like(frames[:, 0]) if last is None else last
                past = torch.cat([first[:, None], frames[:, :-1]], dim=1).flatten(0, 1)
                memory[slot] = frames[:, -1]
                slot += 1
                x = layer(x, past)
            else:
                x = layer(x)
        return x.unflatten(0, (batch, -1))


def expected_shapes(dims: LightDims = TAEW2_1) -> dict[str, tuple[int, ...]]:
    """Published name -> shape of every decoder tensor (from the model on the meta device)."""
    with torch.device("meta"):
        net = LightDecoderNet(dims)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _load_file(path: pathlib.Path) -> dict:
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise WeightsError(f"{path}: missing")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return load_pth(path)


def infer_dims(shapes: dict[str, tuple[int, ...]], source: str) -> LightDims:
    """Widths read back from the four stage convolutions (decoder.1, .8, .14, .20)."""
    try:
        widths = tuple(shapes[f"decoder.{i}.weight"][0] for i in (1, 8, 14, 20))
        z_dim = shapes["decoder.1.weight"][1]
    except (KeyError, IndexError) as e:
        raise WeightsError(
            f"{source}: not a {WHAT} checkpoint (no decoder.{{1,8,14,20}}.weight tensors: "
            f"{'missing ' + str(e.args[0]) if isinstance(e, KeyError) else 'wrong rank'})"
        ) from None
    if z_dim != 16:
        raise WeightsError(
            f"{source}: decodes {z_dim}-channel latents; Wan2.2-S2V-14B uses the Wan 2.1 VAE's 16 "
            f"(taew2_1.pth; taew2_2 is for Wan 2.2 5B's 48-channel VAE)"
        )
    return LightDims(widths=widths, z_dim=z_dim)


def load_state_dict(path: str | pathlib.Path) -> tuple[LightDims, dict[str, torch.Tensor]]:
    """(dims, decoder tensors) of a TAEHV checkpoint for Wan 2.1 (.pth or .safetensors), checked
    strictly against the published layout. `encoder.*` tensors are read and left out."""
    path = pathlib.Path(path).expanduser()
    sd = _load_file(path)
    stray = sorted(str(k) for k in sd if not str(k).startswith(("decoder.", "encoder.")))
    if stray:
        raise WeightsError(f"{path}: not a {WHAT} checkpoint (unexpected tensors {', '.join(stray[:4])})")
    sd = {k: v for k, v in sd.items() if str(k).startswith("decoder.")}
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: holds non-tensor values under decoder.*")
    dims = infer_dims({k: tuple(v.shape) for k, v in sd.items()}, str(path))
    # Checkpoints trained with the first time expansion on hold 2x its channels; with it off (as
    # here) TAEHV keeps the later frame's half, the last channels. Either layout loads.
    key, w0 = "decoder.7.conv.weight", dims.widths[0]
    if key in sd and sd[key].ndim == 4 and sd[key].shape[0] == 2 * w0:
        sd[key] = sd[key][-w0:]
    check_state_dict(path, WHAT, {k: tuple(v.shape) for k, v in sd.items()}, expected_shapes(dims))
    return dims, sd


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class LightDecoder:
    """The light decoder with the full VAE's streaming interface (WanVAE.stream_decoder / decode).
    Re-entrant: every stream keeps its own memory, so one instance serves concurrent streams."""

    def __init__(self, net: LightDecoderNet, source: str):
        self.model = net.eval().requires_grad_(False)
        self.dims = net.dims
        self.z_dim = net.dims.z_dim
        self.source = source  # the file, or "random weights"
        p = next(net.parameters())
        self.device, self.dtype = p.device, p.dtype

    @classmethod
    def from_file(
        cls, path: str | pathlib.Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
    ) -> LightDecoder:
        dims, sd = load_state_dict(path)
        with torch.device("meta"):
            net = LightDecoderNet(dims)
        net.load_state_dict(sd, strict=True, assign=True)
        return cls(net.to(device=device, dtype=_dtype(dtype)), str(path))

    @classmethod
    def random(
        cls,
        dims: LightDims = TAEW2_1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ) -> LightDecoder:
        """Random weights (seeded on CPU): benchmarks and the tiny model. Scaled so that the signal
        survives the 20 layers (PyTorch's default init shrinks it to a flat frame): the output is
        coloured noise around mid-grey, whose every pixel depends on the latents."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = LightDecoderNet(dims)
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            for block in net.decoder:
                if isinstance(block, MemoryBlock):  # residual branches start small, as in trained nets
                    block.conv[4].weight.data.mul_(0.2)
            last = net.decoder[-1]
            last.weight.data.mul_(0.08)
            last.bias.data.fill_(0.5)
        return cls(net.to(device=device, dtype=_dtype(dtype)), "random weights")

    @classmethod
    def from_spec(cls, spec: ModelSpec, device: str | torch.device | None = None) -> LightDecoder:
        """The file from --light-decoder-path when given; else random weights, taew2_1's shapes
        (tiny: 1/8 of the width). ModelSpec refuses random weights beside a real checkpoint."""
        device = torch.device(device or spec.device)
        dtype = torch.float32 if spec.is_tiny or device.type == "cpu" else _dtype(spec.dtype)
        path = spec.decoder_options.light_path
        if path:
            return cls.from_file(path, device, dtype)
        return cls.random(TINY_LIGHT if spec.is_tiny else TAEW2_1, spec.seed, device, dtype)

    def describe(self) -> str:
        return f"light (TAEHV taew2_1, {self.source})"

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, 16, t, h, w] -> pixels [B, 3, 1 + 4(t-1), 8h, 8w] in [-1, 1]."""
        return self.stream_decoder().decode(latents)

    def stream_decoder(self, net: torch.nn.Module | None = None) -> LightStreamingDecoder:
        """net: the module to run (e.g. a compiled wrapper of self.model); default eager."""
        return LightStreamingDecoder(self, net)


class LightStreamingDecoder:
    """Decodes one stream's latents block after block, carrying each memory block's last frame."""

    def __init__(self, decoder: LightDecoder, net: torch.nn.Module | None = None):
        self.decoder = decoder
        self._net = net if net is not None else decoder.model
        self._memory: list | None = [None] * len(decoder.model.memory_slots)
        self._to_drop = STARTUP_FRAMES
        self.frames_in = 0  # latent frames decoded so far

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, t, h, w] (normalised) -> pixels [B, 3, n, 8h, 8w] in [-1, 1], float32, where
        n = 1 + 4(t-1) for the stream's first call and 4t afterwards."""
        dec = self.decoder
        if self._memory is None:
            raise RuntimeError("LightStreamingDecoder is closed")
        if latents.ndim != 5 or latents.shape[1] != dec.z_dim:
            raise InvalidInput(f"latents must be [B, {dec.z_dim}, t, h, w], got {list(latents.shape)}")
        if latents.shape[2] == 0:
            raise InvalidInput("latents hold no frame")
        z = latents.to(device=dec.device, dtype=dec.dtype)
        outs = [self._net(z[:, :, i], self._memory) for i in range(z.shape[2])]  # each [B, 4, 3, H, W]
        frames = torch.cat(outs, dim=1)[:, self._to_drop :]
        self._to_drop = 0
        self.frames_in += z.shape[2]
        return frames.permute(0, 2, 1, 3, 4).float().clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)

    def close(self) -> None:
        """Frees the memory blocks' frames; the decoder is unusable after."""
        self._memory = None
