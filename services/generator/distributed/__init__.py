"""Multi-GPU generator: timestep-forcing pipeline parallelism (TPP) under torchrun.

All torch.distributed code lives in this package. `avatar serve --role generator` started by
torchrun with N processes runs N ranks, one sampling step each (sample_steps must equal N):
rank 0 serves GeneratorService, ranks 1..N-1 run `run_worker`. See tpp.py and docs/model.md.
"""

import os


def launched() -> bool:
    """True in a process torchrun started as one rank of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))
