"""FSDP2 weight sharding of the DiT: F ranks each hold 1/F of its weights and step in lockstep.

For cards that cannot hold a whole DiT with its KV cache (24 GiB at 704*384): `fully_shard`
(torch.distributed.fsdp) puts every transformer block, audio injector and the text projections
in a unit of its own over a device mesh of F ranks. A unit's weights are all-gathered just before
it runs and freed right after, so a rank holds its 1/F share plus about two blocks in full.

Every rank runs the same GeneratorSession on the same inputs (the all-gathers are collectives:
all ranks must call the same units in the same order), so the latents equal one process's, bit
for bit on CPU float32 (tests/test_sharding.py). Sharding buys memory, not speed: the F ranks
compute the same block. Rank 0 serves gRPC with ShardedEngine; each call it gets (open, block,
close) is broadcast to ranks 1..F-1 (`run_shard_worker`) on a gloo group before rank 0 runs it.

Failures: InvalidInput and a refused session (ResourceExhausted: the session-opening memory check
uses the smallest free memory of the group) are decided alike on every rank and end only that
session. Anything else, running out of memory inside a forward included, can leave the other
ranks inside an all-gather, so the rank exits and torchrun takes the group down (the
orchestrator restarts it), as with TPP.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import datetime
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from avatar import errors, telemetry
from avatar.errors import InvalidInput, ResourceExhausted
from avatar.jobs import Job
from avatar.presets import ModelSpec
from avatar.services.generator.causal_s2v_dit import CausalS2VDiT
from avatar.services.generator.distributed import join_group, leave_group
from avatar.services.generator.distributed.parallel_config import ParallelConfig
from avatar.services.generator.engine import GeneratorEngine, GeneratorSession, build_generator_model
from avatar.services.generator.fp8 import FP8Linear

log = logging.getLogger(__name__)

GROUP_TIMEOUT = datetime.timedelta(minutes=30)
PING_S = 60.0  # an idle rank 0 pings the workers, so their broadcast never reaches the timeout
EXIT_DELAY_S = 2.0  # a broken group: rank 0 lets the failed RPCs reach their clients, then exits
AGREED = (InvalidInput, ResourceExhausted)  # errors every rank raises alike, before any collective
# DiT methods that touch weights: FSDP2 runs its all-gather hooks around these like around forward.
FORWARD_METHODS = ("embed_text", "embed_time", "encode_audio", "prefill_sink", "denoise")


# ---------------------------------------------------------------- the model


def shard_dit(dit: CausalS2VDiT, mesh) -> int:
    """Shards `dit` in place over `mesh` (a 1-D DeviceMesh); its tensors move to the mesh's device.
    Returns the number of FSDP units. The model file knows nothing of this: the units are its own
    submodules and the methods that run them are registered as forward methods."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in dit.modules():
        if isinstance(module, FP8Linear):
            # FSDP2 shards parameters only: an FP8 layer's buffers become frozen parameters. With
            # its scales and bias beside it, a unit never holds float8 alone, so FSDP2 gathers
            # it as bytes (gloo has no float8 type).
            for name in ("weight_fp8", "weight_scale", "bias"):
                if module._buffers.get(name) is not None:
                    setattr(module, name, nn.Parameter(module._buffers.pop(name), requires_grad=False))
    for p in dit.parameters():
        p.requires_grad_(False)
    units = 0
    for block in dit.blocks:
        # The text projections run once per session (embed_text), outside the block's forward:
        # units of their own, so the block's all-gather never carries them.
        for proj in (block.cross_attn.k, block.cross_attn.v, block.cross_attn.norm_k):
            fully_shard(proj, mesh=mesh)
        fully_shard(block, mesh=mesh)
        units += 4
    injector = dit.audio_injector
    for attn, adain in zip(injector.injector, injector.injector_adain_layers):
        fully_shard(attn, mesh=mesh)
        fully_shard(adain, mesh=mesh)
        units += 2
    fully_shard(dit, mesh=mesh)  # the rest (embeddings, head, audio encoder): the root, kept gathered
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(dit, name)
    # Gather block i+1 while block i computes (no autograd: FSDP2 prefetches only when told).
    for block, following in zip(dit.blocks, dit.blocks[1:]):
        block.set_modules_to_forward_prefetch([following])
    return units + 1


def local_weight_bytes(dit: nn.Module) -> int:
    """Bytes of weights this rank holds at rest: its shards, plus whatever is not sharded."""
    total = 0
    for t in (*dit.parameters(), *dit.buffers()):
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def check_sharding(model: ModelSpec) -> None:
    """InvalidInput for options that do not combine with FSDP2 (yet), with the reason."""
    if model.compile:
        raise InvalidInput("--compile with --parallel fsdp is not measured yet: leave out --compile")
    if model.generator_options.offload_text_projections:
        raise InvalidInput("--offload-text-kv with --parallel fsdp: the text projections are already sharded")
    if model.generator_options.fused_norms:
        raise InvalidInput("--fused-norms with --parallel fsdp is not measured yet: leave out --fused-norms")


def build_sharded_engine(model: ModelSpec, mesh, load_device: str = "cpu") -> GeneratorEngine:
    """The DiT built in host memory (in the GPU's dtype, FP8-swapped when asked), then sharded
    onto the mesh's device unit by unit: no rank ever holds the whole model on its GPU (the host
    holds one copy while it builds: build_in_turn; load_device=model.device builds on the GPU
    instead, faster where a whole copy fits). CUDA graphs are off: a graph cannot hold FSDP's
    all-gathers."""
    check_sharding(model)
    device = torch.device(model.device)
    dit = build_generator_model(model, load_device=torch.device(load_device))
    shard_dit(dit, mesh)
    options = replace(model.generator_options, cuda_graphs=False)
    engine = GeneratorEngine(model.with_(generator_options=options), dit)
    log.info(
        "FSDP2: %.2f GiB of weights on %s (1/%d of the blocks)", local_weight_bytes(dit) / 2**30, device, mesh.size()
    )
    return engine


def build_in_turn(group: ShardGroup, model: ModelSpec, load_device: str = "cpu") -> GeneratorEngine:
    """build_sharded_engine on every rank, one rank after another when building in host memory:
    the host then holds one unsharded copy at a time (32.6 GB in bf16), not one per rank."""
    if torch.device(load_device).type != "cpu":
        return build_sharded_engine(model, group.mesh, load_device)
    engine = None
    for turn in range(group.size):
        if turn == group.rank:
            engine = build_sharded_engine(model, group.mesh, load_device)
        dist.barrier(group=group.control)
    return engine


# ---------------------------------------------------------------- process group


@dataclass(frozen=True)
class ShardGroup:
    rank: int  # in the shard group (0 serves gRPC)
    size: int
    device: torch.device
    mesh: Any  # DeviceMesh the DiT is sharded over
    control: Any  # gloo group for the commands rank 0 broadcasts


def init_shard_group(model: ModelSpec, config: ParallelConfig) -> tuple[ShardGroup, ModelSpec]:
    """Joins the torchrun group (NCCL on cuda:LOCAL_RANK, gloo on the CPU) as one shard of a
    tpp=1 layout. Returns the group and the ModelSpec with this rank's device."""
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    config.check_world(world)
    if config.tpp != 1:
        raise ValueError(
            f"--parallel {config.describe()}: TPP stages of sharded DiTs are not wired yet; "
            f"use tpp={config.world_size} (full copies) or fsdp={config.world_size}"
        )
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast reserves memory per communicator (docs/operations.md)
    device, backend = join_group(model.device, int(os.environ.get("LOCAL_RANK", "0")), GROUP_TIMEOUT, "FSDP")
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
    control = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    group = ShardGroup(dist.get_rank(), world, device, mesh, control)
    return group, model.with_(device=str(device))


# ---------------------------------------------------------------- commands (rank 0 -> every rank)


@dataclass(frozen=True)
class Open:
    sid: int
    job: Job
    text: torch.Tensor  # [L, text_dim] (CPU)
    ref_latent: torch.Tensor  # [16, 1, h, w]
    motion_latents: torch.Tensor  # [16, T, h, w]


@dataclass(frozen=True)
class Step:
    """One block of session `sid`."""

    sid: int
    audio: torch.Tensor  # [frames_per_block, audio_layers, audio_dim] (CPU)


@dataclass(frozen=True)
class Close:
    sid: int


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Stop:
    pass


Command = Open | Step | Close | Ping | Stop


def _broadcast(group: ShardGroup, command: Command | None) -> Command:
    box = [command]
    dist.broadcast_object_list(box, src=0, group=group.control)
    return box[0]


def _agreed_free_memory(group: ShardGroup, engine: GeneratorEngine) -> int | None:
    """The smallest free memory of the group (every rank then refuses or opens alike)."""
    if engine.free_memory is None:
        return None
    free = torch.tensor([engine.free_memory()], dtype=torch.int64)
    dist.all_reduce(free, op=dist.ReduceOp.MIN, group=group.control)
    return int(free.item())


def _apply(group: ShardGroup, engine: GeneratorEngine, sessions: dict, command: Command):
    """What every rank does for one command, in the same order everywhere."""
    if isinstance(command, Open):
        free = _agreed_free_memory(group, engine)
        own = engine.free_memory
        engine.free_memory = None if own is None else (lambda: free)
        try:
            sessions[command.sid] = engine.open_session(
                command.job, command.text, command.ref_latent, command.motion_latents
            )
        finally:
            engine.free_memory = own
        return sessions[command.sid]
    if isinstance(command, Step):
        session = sessions.get(command.sid)
        if session is None:
            raise InvalidInput(f"no generator session {command.sid}")
        return session.generate_block(command.audio)
    if isinstance(command, Close):
        session = sessions.pop(command.sid, None)
        if session is not None:
            session.close()
            if group.device.type == "cuda":
                torch.cuda.empty_cache()
    return None


def _agree(group: ShardGroup, error: BaseException | None) -> None:
    """Every rank says whether the command failed; ranks that disagree cannot go on in lockstep."""
    verdicts: list = [None] * group.size
    dist.all_gather_object(verdicts, None if error is None else type(error).__name__, group=group.control)
    if len(set(verdicts)) > 1:
        raise _Broken(f"generator shards disagree on the last command: {verdicts}")


class _Broken(RuntimeError):
    """The group cannot go on: a rank must exit."""


def _agreed(exc: BaseException) -> bool:
    """An error every rank raises alike before any collective: a refused input or a refused session.
    Running out of memory inside a forward (GeneratorSession reports it as ResourceExhausted) may
    strike one rank only, while the others wait in an all-gather: not agreed."""
    return isinstance(exc, AGREED) and not isinstance(exc.__cause__, torch.OutOfMemoryError)


# ---------------------------------------------------------------- ranks 1..F-1


def run_shard_worker(group: ShardGroup, engine: GeneratorEngine) -> None:
    """Rank i > 0: every command rank 0 broadcasts, until Stop. A failure that is not an agreed
    one exits the process: the other ranks may be waiting inside an all-gather."""
    sessions: dict[int, GeneratorSession] = {}
    log.info("FSDP shard %d/%d ready on %s", group.rank, group.size, group.device)
    while True:
        command = _broadcast(group, None)
        error = None
        try:
            _apply(group, engine, sessions, command)
        except Exception as exc:
            if not _agreed(exc):
                log.critical("FSDP shard %d failed; exiting so the group restarts", group.rank, exc_info=True)
                os._exit(1)
            error = exc
            if isinstance(command, Step):  # the session freed itself; rank 0 closes it everywhere
                log.info("shard %d: session %d block failed: %s", group.rank, command.sid, exc)
        try:
            _agree(group, error)
        except _Broken as exc:
            log.critical("FSDP shard %d: %s; exiting", group.rank, exc)
            os._exit(1)
        if isinstance(command, Stop):
            log.info("FSDP shard %d: stop", group.rank)
            return


def worker_main(model: ModelSpec, config: ParallelConfig) -> None:
    """Entry of ranks 1..F-1 under `avatar serve --role generator --parallel fsdp=F`."""
    group, spec = init_shard_group(model, config)
    try:
        run_shard_worker(group, build_in_turn(group, spec))
    except BaseException:
        dist.destroy_process_group()  # no barrier: the peers may be gone
        raise
    leave_group(group.control)


def start_rank0(model: ModelSpec, config: ParallelConfig) -> ShardedEngine:
    """Rank 0's engine for GeneratorServicer (app/serve.py)."""
    group, spec = init_shard_group(model, config)
    return ShardedEngine(group, build_in_turn(group, spec))


# ---------------------------------------------------------------- rank 0


class ShardedEngine:
    """GeneratorEngine's interface on rank 0 of a shard group. One driver thread runs every
    command, in order: broadcast, run it here, agree. Sessions interleave block by block."""

    def __init__(self, group: ShardGroup, engine: GeneratorEngine):
        if group.rank != 0:
            raise ValueError("ShardedEngine runs on rank 0; other ranks run run_shard_worker")
        self.group, self.engine = group, engine
        self.dit, self.spec = engine.dit, engine.spec
        self._sessions: dict[int, GeneratorSession] = {}
        self._commands: queue.Queue = queue.Queue()
        self._sids = itertools.count(1)
        self.broken: str | None = None
        self._driver = threading.Thread(target=self._drive, name="fsdp-driver", daemon=True)
        self._driver.start()
        from avatar.metrics import GENERATOR_PARALLEL

        GENERATOR_PARALLEL.labels("fsdp").set(group.size)
        GENERATOR_PARALLEL.labels("tpp").set(1)

    def open_session(
        self, job: Job, text: torch.Tensor, ref_latent: torch.Tensor, motion_latents: torch.Tensor
    ) -> ShardedSession:
        sid = next(self._sids)
        command = Open(sid, job, text.detach().cpu(), ref_latent.detach().cpu(), motion_latents.detach().cpu())
        return ShardedSession(self, sid, self._call(command).result())

    def close(self, timeout: float = 30.0) -> None:
        """Stops every shard and leaves the process group."""
        if self.broken is None and self._driver.is_alive():
            try:
                self._call(Stop()).result(timeout)
            except Exception as exc:
                log.warning("FSDP shutdown: %s", exc)
        if self.broken is None:
            leave_group(self.group.control)
        elif dist.is_initialized():
            dist.destroy_process_group()

    async def aclose(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close)

    def _call(self, command: Command) -> concurrent.futures.Future:
        if self.broken:
            raise RuntimeError(self.broken)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        # the caller's context (its trace) goes with the command: the driver's span joins it
        self._commands.put((command, fut, contextvars.copy_context()))
        return fut

    def _drive(self) -> None:
        while True:
            try:
                command, fut, context = self._commands.get(timeout=PING_S)
            except queue.Empty:
                command, fut, context = Ping(), concurrent.futures.Future(), contextvars.Context()
            if self.broken:
                fut.set_exception(RuntimeError(self.broken))
                continue
            context.run(self._execute, command, fut)
            if isinstance(command, Stop):
                return

    def _execute(self, command: Command, fut: concurrent.futures.Future) -> None:
        """Broadcast, run here, agree; the future gets the result or the agreed error."""
        error, result = None, None
        try:
            with telemetry.span("fsdp_command", command=type(command).__name__, shards=self.group.size):
                _broadcast(self.group, command)
                result = _apply(self.group, self.engine, self._sessions, command)
        except Exception as exc:
            if not _agreed(exc):
                self._fail(f"a generator shard failed ({type(exc).__name__}: {exc}); restarting the group", fut)
                return
            error = exc
        try:
            _agree(self.group, error)
        except Exception as exc:
            self._fail(str(exc), fut)
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def _fail(self, reason: str, fut: concurrent.futures.Future) -> None:
        """The shards are out of step: fail what waits, then exit so torchrun restarts the group."""
        log.critical("FSDP: %s", reason)
        self.broken = reason
        fut.set_exception(RuntimeError(reason))
        while True:
            try:
                _, waiting, _ = self._commands.get_nowait()
            except queue.Empty:
                break
            waiting.set_exception(RuntimeError(reason))
        threading.Timer(EXIT_DELAY_S, os._exit, (1,)).start()


@dataclass(eq=False)
class ShardedSession:
    """One stream on the shard group: rank 0's GeneratorSession, its twins stepping on every shard."""

    engine: ShardedEngine
    sid: int
    local: GeneratorSession
    last_block_ms: float = 0.0
    pipeline_depth: int = 1
    _closed: bool = field(default=False)

    @property
    def kv_cache_bytes(self) -> int:
        """Every shard holds the whole cache (FSDP shards weights only)."""
        return self.local.kv_cache_bytes

    def generate_block(self, audio: torch.Tensor) -> torch.Tensor:
        if self._closed:
            raise InvalidInput("the generator session is closed")
        start = time.perf_counter()
        latent = self.engine._call(Step(self.sid, audio.detach().cpu())).result()
        self.last_block_ms = (time.perf_counter() - start) * 1e3
        return latent

    def submit(self, audio: torch.Tensor) -> concurrent.futures.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()
        try:
            done.set_result(self.generate_block(audio))
        except Exception as e:
            done.set_exception(e)
        return done

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self.engine.broken:
                try:
                    self.engine._call(Close(self.sid)).result()
                except errors.AvatarError:
                    pass
