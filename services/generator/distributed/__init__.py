"""Multi-GPU generator: timestep-forcing pipeline parallelism (TPP) under torchrun.

All torch.distributed code lives in this package. `avatar serve --role generator` started by
torchrun with N processes runs N ranks: TPP (tpp.py: step k of a block on rank k mod N) or FSDP2
shards (sharding.py). Rank 0 serves GeneratorService. See docs/architecture.md.
"""

import os


def launched() -> bool:
    """True in a process torchrun started as one rank of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def join_group(device_name: str, local_rank: int, timeout, what: str):
    """This rank's device (cuda:LOCAL_RANK, or the CPU) and the default process group on it:
    NCCL on GPUs, gloo on the CPU. Returns (device, backend)."""
    import torch
    import torch.distributed as dist

    device = torch.device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank with LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"{what} runs on cuda or cpu, not {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, **({"device_id": device} if backend == "nccl" else {}))
    return device, backend


def leave_group(control=None) -> None:
    """Leaves every process group, after a barrier on `control` (a gloo group) so no rank tears
    down its group while another still has a collective in flight: gloo's worker threads then
    hold no work when the interpreter exits (an abort at exit otherwise, seen once in CI)."""
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.barrier(group=control)
    except Exception:  # a peer already gone: still leave
        pass
    dist.destroy_process_group()
    gc.collect()  # drop finished Work objects (and their tensors) while Python is fully alive


def torchrun_env(index: int, world: int, port: int, address: str = "127.0.0.1") -> dict[str, str]:
    """The variables torchrun sets for rank `index` of a one-host group (env rendezvous at
    address:port), for launchers that start the ranks themselves (a Ray replica, the benches)."""
    return {
        "RANK": str(index),
        "LOCAL_RANK": str(index),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": address,
        "MASTER_PORT": str(port),
    }
