"""ParallelConfig: how the ranks of a multi-GPU generator split the work, validated against the world size.

`avatar serve --role generator --parallel tpp=2,fsdp=2` under `torchrun --nproc-per-node 4`:

- tpp:  timestep-forcing pipeline parallelism (distributed/tpp.py): stages that each hold a DiT and
        run their share of the sampling steps, blocks overlapping across stages;
- fsdp: FSDP2 weight sharding (distributed/sharding.py): ranks that each hold 1/fsdp of the DiT's
        block weights and step in lockstep on the same inputs (memory, not speed).

The degrees multiply to the world size. Rank r is TPP stage r // fsdp, shard r % fsdp: the ranks
of one stage are neighbours (one host, NVLink), which is where FSDP's all-gathers belong. No
--parallel under torchrun means tpp=WORLD_SIZE (the one layout before this existed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEGREES = ("tpp", "fsdp")
# Known names that are refused with a reason rather than as typos.
NOT_BUILT = {
    "ulysses": "Ulysses sequence parallelism is not built (it would keep a full DiT per rank and split "
    "the cache by heads; docs/operations.md, 'Memory per rank'); use fsdp to fit small cards"
}


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of each kind of parallelism; 1 means not used."""

    tpp: int = 1
    fsdp: int = 1

    def __post_init__(self):
        for name in DEGREES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--parallel {name}={value!r}: degrees are whole numbers of at least 1")

    @classmethod
    def parse(cls, text: str) -> ParallelConfig:
        """ "tpp=2,fsdp=2" -> ParallelConfig(tpp=2, fsdp=2); a name left out is 1."""
        degrees: dict[str, int] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            name, sep, value = (s.strip() for s in item.partition("="))
            if name in NOT_BUILT:
                raise ValueError(f"--parallel {name}: {NOT_BUILT[name]}")
            if name not in DEGREES:
                raise ValueError(
                    f"--parallel {text!r}: unknown name {name!r}; use {', '.join(DEGREES)} (e.g. tpp=2,fsdp=2)"
                )
            if not sep or not value.isascii() or not value.isdigit():
                raise ValueError(f"--parallel {text!r}: {name} needs a whole number, e.g. {name}=2")
            if name in degrees:
                raise ValueError(f"--parallel {text!r}: {name} is given twice")
            degrees[name] = int(value)
        if not degrees:
            raise ValueError(f"--parallel {text!r}: name at least one degree, e.g. tpp=2 or fsdp=2")
        return cls(**degrees)

    @classmethod
    def for_world(cls, text: str | None, world_size: int) -> ParallelConfig:
        """The layout of a group of world_size processes: --parallel as given (checked against it),
        or without it tpp over every rank (1 process: no parallelism)."""
        config = cls.parse(text) if text else cls(tpp=world_size)
        config.check_world(world_size)
        return config

    @property
    def world_size(self) -> int:
        return math.prod(getattr(self, name) for name in DEGREES)

    @property
    def sharded(self) -> bool:
        return self.fsdp > 1

    def describe(self) -> str:
        return ",".join(f"{name}={getattr(self, name)}" for name in DEGREES)

    def check_world(self, world_size: int) -> None:
        """ValueError naming the degrees unless they multiply to the processes started."""
        if self.world_size != world_size:
            product = " x ".join(f"{name} {getattr(self, name)}" for name in DEGREES)
            started = (
                "1 process (start it with torchrun --nproc-per-node N)"
                if world_size == 1
                else f"{world_size} processes (torchrun --nproc-per-node)"
            )
            raise ValueError(f"--parallel {self.describe()}: {product} = {self.world_size} ranks, but {started}")

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(TPP stage, shard index) of a global rank: the shards of a stage are consecutive ranks."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for {self.world_size} ranks")
        return divmod(rank, self.fsdp)

    def shard_ranks(self, stage: int) -> list[int]:
        """The global ranks that hold the shards of one TPP stage's DiT."""
        return list(range(stage * self.fsdp, (stage + 1) * self.fsdp))
