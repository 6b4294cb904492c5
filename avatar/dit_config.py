"""The causal S2V DiT's geometry and limits per preset: one source for the model, the memory planner, the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from avatar.presets import MODEL_DIMS

MAX_SAMPLE_STEPS = 50  # most Euler steps per block a job may ask for (the scheduler's and the engine's limit)

FRAMEPACK_SCALES = (1, 2, 4)  # FramePack's spatial compression of its 1st, 2nd and 3rd bucket

_S2V = MODEL_DIMS["s2v-14b"]
_TINY = MODEL_DIMS["tiny"]


def framepack_tokens(latent_h: int, latent_w: int, buckets: tuple[int, ...]) -> int:
    """Tokens of the FramePack motion context: bucket i holds buckets[i] latent frames compressed
    FRAMEPACK_SCALES[i] times along each side, after the 2x2 patch."""
    return sum(
        (frames // s) * (latent_h // (2 * s)) * (latent_w // (2 * s)) for frames, s in zip(buckets, FRAMEPACK_SCALES)
    )


@dataclass(frozen=True)
class DiTConfig:
    """CausalS2VDiT's constructor arguments; the defaults are Wan2.2-S2V-14B's (upstream's config)."""

    patch_size: tuple[int, int, int] = _S2V.patch
    in_dim: int = _S2V.latent_channels
    out_dim: int = _S2V.latent_channels
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = _S2V.text_dim
    text_len: int = _S2V.text_len
    num_heads: int = 40
    num_layers: int = 40
    eps: float = 1e-6
    cond_dim: int = _S2V.latent_channels
    audio_dim: int = _S2V.audio_dim
    audio_layers: int = _S2V.audio_layers
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    motion_frames: int = _S2V.motion_frames
    framepack_buckets: tuple[int, ...] = (1, 2, 16)

    def kwargs(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def frame_tokens(self, latent_h: int, latent_w: int) -> int:
        """Tokens of one latent frame of latent_h x latent_w (one per patch)."""
        return (latent_h // self.patch_size[1]) * (latent_w // self.patch_size[2])

    def sink_tokens(self, latent_h: int, latent_w: int) -> int:
        """Tokens in the sink: the reference frame plus the FramePack motion context."""
        return self.frame_tokens(latent_h, latent_w) + framepack_tokens(latent_h, latent_w, self.framepack_buckets)


DIT_CONFIGS: dict[str, DiTConfig] = {
    "s2v-14b": DiTConfig(),
    # same classes at small size; the dims other services share come from MODEL_DIMS["tiny"]
    "tiny": DiTConfig(
        dim=64,
        ffn_dim=128,
        num_heads=4,
        num_layers=4,
        freq_dim=32,
        audio_inject_layers=(0, 2, 3),
        text_dim=_TINY.text_dim,
        text_len=_TINY.text_len,
        audio_dim=_TINY.audio_dim,
        audio_layers=_TINY.audio_layers,
    ),
}
