"""Flow-matching Euler sampling with shift 3, as upstream (diffusers FlowMatchEulerDiscreteScheduler).

The sigmas come from diffusers itself so that N steps reproduce upstream's schedule exactly; the
Euler step is stateless here, because with timestep forcing every block walks the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from avatar.dit_config import MAX_SAMPLE_STEPS

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class FlowMatchEuler:
    sigmas: tuple[float, ...]  # num_steps + 1 values, 1.0 ... 0.0
    timesteps: tuple[float, ...]  # num_steps values the model sees, sigma * 1000

    @classmethod
    def create(cls, num_steps: int, shift: float = 3.0) -> FlowMatchEuler:
        if not 1 <= num_steps <= MAX_SAMPLE_STEPS:
            raise ValueError(f"sample_steps must be between 1 and {MAX_SAMPLE_STEPS}, got {num_steps}")
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        sched.set_timesteps(num_steps)
        return cls(tuple(sched.sigmas.tolist()), tuple(sched.timesteps.tolist()))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step(self, sample: torch.Tensor, velocity: torch.Tensor, i: int) -> torch.Tensor:
        """One Euler step from sigma[i] to sigma[i+1], in float32, returned in velocity's dtype."""
        out = sample.float() + (self.sigmas[i + 1] - self.sigmas[i]) * velocity.float()
        return out.to(velocity.dtype)
