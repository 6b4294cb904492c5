"""Timestep-forcing pipeline parallelism (TPP): one DiT copy per rank, rank i runs sampling step i.

Upstream's single-GPU sampler keeps one KV cache set per sampling step, so step i of a block only
reads and writes set i. TPP puts each set on its own rank: rank i holds a full DiT and ONE cache
set (its step's), runs step i of every block and passes the latent on to rank i + 1; the last
rank hands the finished block back to rank 0. Blocks overlap across ranks, so a stream gets one
block per step time instead of per N step times, and the result is the same computation as
GeneratorSession with one cache set per step (bit-identical on CPU float32: tests/test_tpp.py).

Messages travel as a ring of point-to-point sends: rank 0 -> 1 -> ... -> N-1 on the default
group ("down"), N-1 -> 0 on a second group ("up", its own NCCL communicator, so a send down and
a receive up never queue behind each other). Everything a rank learns (a session's job and
conditioning, each block's latent and audio, close, shutdown) comes down the ring in order, so
no rank ever waits on a collective that another rank is too busy to join.

Rank 0 runs the gRPC service (avatar/app/serve.py) with TPPEngine in place of GeneratorEngine: a
driver thread runs step 0 and sends down, a receiver thread takes finished blocks and
acknowledgements from the last rank. Ranks 1..N-1 run `run_worker`.

Failures: an exception on any rank (bad input, out of memory) travels with the block to rank 0,
which ends that session with the error; the service stays up. A rank that dies takes the group
with it: rank 0 fails its sessions with "a generator rank failed" and exits, torchrun stops the
other ranks and exits non-zero, and the orchestrator (compose `restart:`, Kubernetes) restarts it.
"""

from __future__ import annotations

import concurrent.futures
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

from avatar import errors
from avatar.errors import InvalidInput
from avatar.jobs import Job
from avatar.presets import ModelSpec
from avatar.services.generator.distributed.messages import (
    Block,
    BlockDone,
    Channel,
    Closed,
    CloseSession,
    Opened,
    OpenSession,
    Ping,
    Pong,
    RankError,
    Reply,
    ShutDown,
    Shutdown,
)
from avatar.services.generator.engine import GeneratorEngine, GeneratorSession

log = logging.getLogger(__name__)

EXIT_DELAY_S = 2.0  # after a rank failure, rank 0 lets the failed RPCs reach their clients, then exits
PING_S = 60.0  # an idle rank 0 pings the ring, so idle ranks' receives never reach the group timeout
GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # a rank silent this long is taken as hung


# ---------------------------------------------------------------- process group


@dataclass(frozen=True)
class Group:
    rank: int
    world_size: int
    device: torch.device  # where this rank's DiT runs (cuda:LOCAL_RANK or cpu)
    comm_device: torch.device  # where message buffers live (cuda for NCCL, cpu for gloo)
    up: Any  # process group for last rank -> rank 0

    @property
    def last(self) -> int:
        return self.world_size - 1


def init_group(model: ModelSpec) -> tuple[Group, ModelSpec]:
    """Joins the torchrun group: NCCL on CUDA (device cuda:LOCAL_RANK), gloo on the CPU.
    Returns the group and the ModelSpec with this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise ValueError("TPP needs at least 2 ranks (start the generator with torchrun --nproc-per-node N)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if os.environ.get("NCCL_NVLS_ENABLE") == "1":
        # NVLink multicast (NVLS) reserves GPU memory per communicator and buys nothing for p2p.
        log.warning("NCCL_NVLS_ENABLE=1 ignored: the TPP generator runs with NVLink multicast off")
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    device = torch.device(model.device)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank with LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"TPP runs on cuda or cpu, not {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=GROUP_TIMEOUT, **({"device_id": device} if backend == "nccl" else {}))
    up = dist.new_group(backend=backend, timeout=GROUP_TIMEOUT)
    group = Group(
        dist.get_rank(), dist.get_world_size(), device, device if backend == "nccl" else torch.device("cpu"), up
    )
    return group, model.with_(device=str(device))


# ---------------------------------------------------------------- ranks 1..N-1


def run_worker(group: Group, engine: GeneratorEngine) -> None:
    """Rank i > 0: step i of every block of every session, until rank 0 sends Shutdown."""
    step = group.rank
    down_in = Channel(step - 1, None, group.comm_device)
    last = step == group.last
    out = Channel(0, group.up, group.comm_device) if last else Channel(step + 1, None, group.comm_device)
    sessions: dict[int, GeneratorSession] = {}
    failed: dict[int, RankError] = {}
    log.info("TPP rank %d/%d ready on %s (sampling step %d)", step, group.world_size, group.device, step)
    while True:
        msg = down_in.recv()
        # The previous message's send ends before this one's work starts: a rank that then dies
        # (a crashed kernel) has delivered every block it finished. It has had the receive's
        # wait to complete, so this rarely waits.
        out.flush()
        if isinstance(msg, OpenSession) and msg.error is None:
            try:
                sessions[msg.sid] = engine.open_step_session(
                    msg.job, msg.text, msg.ref_latent, msg.motion_latents, step
                )
            except Exception as exc:  # reported to rank 0, which fails the session
                log.warning("rank %d: session %d did not open: %s", step, msg.sid, exc)
                msg = replace(msg, error=RankError.of(exc, step))
        elif isinstance(msg, Block) and msg.error is None:
            msg = _run_step(msg, sessions, failed, step)
        elif isinstance(msg, CloseSession):
            failed.pop(msg.sid, None)
            session = sessions.pop(msg.sid, None)
            if session is not None:
                session.close()
                if group.device.type == "cuda":
                    torch.cuda.empty_cache()
        out.send(msg.reply() if last else msg)
        if isinstance(msg, Shutdown):
            out.flush()
            log.info("TPP rank %d: shutdown", step)
            return


def _run_step(msg: Block, sessions: dict[int, GeneratorSession], failed: dict[int, RankError], step: int) -> Block:
    """This rank's step of one block; a failure ends the session here and travels on with the block."""
    if msg.sid in failed:
        return msg.failed(failed[msg.sid])
    session = sessions.get(msg.sid)
    if session is None:
        return msg.failed(RankError("RuntimeError", f"generator rank {step}: no session {msg.sid}"))
    try:
        return replace(msg, x=_denoise(session, msg.x, msg.audio, msg.index, msg.first))
    except Exception as exc:  # the session has freed its memory (GeneratorSession._freed_on_failure)
        log.warning("rank %d: session %d block %d failed: %s", step, msg.sid, msg.index, exc)
        failed[msg.sid] = RankError.of(exc, step)
        sessions.pop(msg.sid).close()
        return msg.failed(failed[msg.sid])


def _denoise(
    session: GeneratorSession, x: torch.Tensor, audio: torch.Tensor, index: int, first: torch.Tensor | None
) -> torch.Tensor:
    """One step session's step of block `index` (blocks arrive in order), the result on the CPU."""
    if index != session.block_index:
        raise RuntimeError(f"block {index} arrived, expected block {session.block_index}")
    return session.denoise_block(x, audio, first).cpu()


def worker_main(model: ModelSpec) -> None:
    """Entry of ranks 1..N-1 under `avatar serve --role generator`: join, load the DiT, serve steps."""
    group, spec = init_group(model)
    try:
        run_worker(group, GeneratorEngine(spec))
    finally:
        dist.destroy_process_group()


def start_rank0(model: ModelSpec) -> TPPEngine:
    """Rank 0's engine for GeneratorServicer (avatar/serve.py)."""
    group, spec = init_group(model)
    return TPPEngine(group, GeneratorEngine(spec))


# ---------------------------------------------------------------- rank 0


class TPPEngine:
    """GeneratorEngine's interface on rank 0 of a TPP group (one session at a time)."""

    def __init__(self, group: Group, engine: GeneratorEngine):
        if group.rank != 0:
            raise ValueError("TPPEngine runs on rank 0; other ranks run run_worker")
        if engine.cache_sets is not None:
            raise ValueError("--cache-sets does not apply to the multi-GPU generator: each rank holds its step's set")
        self.group, self.engine = group, engine
        self.dit, self.spec = engine.dit, engine.spec
        self.world_size = group.world_size
        self._down = Channel(1, None, group.comm_device)
        self._up = Channel(group.last, group.up, group.comm_device)
        self._commands: queue.Queue = queue.Queue()
        self._waiting: dict[tuple, concurrent.futures.Future] = {}  # _reply_key -> future
        self._lock = threading.Lock()
        self._sids = itertools.count(1)
        self._active: int | None = None
        self.broken: str | None = None
        self._driver = threading.Thread(target=self._drive, name="tpp-driver", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="tpp-receiver", daemon=True)
        self._driver.start()
        self._receiver.start()

    # -- API used by GeneratorServicer (from worker threads / the event loop) and TPPSession

    def open_session(
        self, job: Job, text: torch.Tensor, ref_latent: torch.Tensor, motion_latents: torch.Tensor
    ) -> TPPSession:
        if job.sample_steps != self.world_size:
            raise InvalidInput(
                f"this multi-GPU generator runs {self.world_size} ranks, one sampling step each: "
                f"sample_steps must be {self.world_size}, got {job.sample_steps}"
            )
        with self._lock:
            if self._active is not None:
                raise errors.ResourceExhausted("the multi-GPU generator runs one session at a time (--max-sessions=1)")
            self._active = sid = next(self._sids)
        try:
            step = self._call(self._open, sid, job, text, ref_latent, motion_latents).result()
        except BaseException:
            with self._lock:
                self._active = None
            raise
        return TPPSession(self, sid, step)

    def run_block(self, session: TPPSession, index: int, audio: torch.Tensor) -> concurrent.futures.Future:
        """Queues step 0 of block `index`; the future resolves once it is sent down the ring (the
        block's own result future is then in session.results[index])."""
        return self._call(self._block, session, index, audio)

    def end_session(self, session: TPPSession) -> None:
        """Closes the session on every rank (unless the group is gone) and frees rank 0's share."""
        try:
            if not self.broken:
                self._call(self._close, session.sid, session.step).result()
        finally:
            session.step.close()
            with self._lock:
                self._active = None

    def close(self, timeout: float = 30.0) -> None:
        """Stops every rank (Shutdown down the ring) and leaves the process group."""
        if self.broken is None and self._driver.is_alive():
            try:
                self._call(self._shutdown).result(timeout)
            except Exception as exc:
                log.warning("TPP shutdown: %s", exc)
        if dist.is_initialized():
            dist.destroy_process_group()

    async def aclose(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close)

    # -- plumbing: the driver thread runs one command at a time, in order

    def _call(self, command, *args) -> concurrent.futures.Future:
        if self.broken:
            raise RuntimeError(self.broken)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((command, args, fut))
        return fut

    def _expect(self, key: tuple) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._waiting[key] = fut
        return fut

    def _drive(self) -> None:
        while True:
            try:
                command, args, fut = self._commands.get(timeout=PING_S)
            except queue.Empty:
                command, args, fut = self._ping, (), concurrent.futures.Future()
            if self.broken:
                fut.set_exception(RuntimeError(self.broken))
                continue
            try:
                fut.set_result(command(*args))
            except Exception as exc:
                fut.set_exception(exc)
            except BaseException as exc:  # the process is going down
                fut.set_exception(exc)
                raise
            if command == self._shutdown:
                return

    def _open(self, sid: int, job: Job, text, ref_latent, motion_latents) -> GeneratorSession:
        step = self.engine.open_step_session(job, text, ref_latent, motion_latents, 0)
        opened = self._expect(_reply_key(Opened(sid)))
        try:
            self._down.send(OpenSession(sid, job, text.cpu(), ref_latent.cpu(), motion_latents.cpu()))
            reply = opened.result()
        except BaseException:
            step.close()
            raise
        if reply.error is not None:
            step.close()
            self._close(sid, None)  # ranks before the one that failed have opened
            raise reply.error.exception()
        return step

    def _block(self, session: TPPSession, index: int, audio: torch.Tensor) -> None:
        sid = session.sid
        result = self._expect(_reply_key(BlockDone(sid, index)))
        session.results[index] = result
        if session.error is not None:
            result.set_exception(session.error.exception())
            return
        first = None
        try:
            if session.step.needs_first_frame(index):
                first = session.results[0].result()[:, :, :1]  # waits for block 0 to come round
            x = _denoise(session.step, session.step.block_noise(index), audio, index, first)
        except Exception as exc:
            session.error = RankError.of(exc, 0)
            with self._lock:
                self._waiting.pop(_reply_key(BlockDone(sid, index)), None)
            result.set_exception(exc if isinstance(exc, errors.AvatarError) else session.error.exception())
            return
        self._down.send(Block(sid, index, x=x, audio=audio.cpu(), first=first))

    def _close(self, sid: int, step: GeneratorSession | None) -> None:
        closed = self._expect(_reply_key(Closed(sid)))
        self._down.send(CloseSession(sid))
        closed.result()
        if step is not None:
            step.close()
            if self.group.device.type == "cuda":
                torch.cuda.empty_cache()

    def _ping(self) -> None:
        self._down.send(Ping())

    def _shutdown(self) -> None:
        done = self._expect(_reply_key(ShutDown()))
        self._down.send(Shutdown())
        done.result()
        self._down.flush()

    def _receive(self) -> None:
        stream = torch.cuda.Stream(self.group.device) if self.group.device.type == "cuda" else None
        while True:
            try:
                if stream is not None:
                    # Its own stream: a receive waiting for a block N steps away must not hold up
                    # step 0's kernels on the default stream.
                    with torch.cuda.stream(stream):
                        reply = self._up.recv()
                else:
                    reply = self._up.recv()
            except Exception as exc:
                self._fail(f"a generator rank failed ({type(exc).__name__}: {exc}); restarting the group")
                return
            if isinstance(reply, Pong):
                continue
            with self._lock:
                fut = self._waiting.pop(_reply_key(reply), None)
            if fut is None:
                log.warning("TPP: unexpected reply %s", reply)
                continue
            if isinstance(reply, BlockDone):
                if reply.error is not None:
                    fut.set_exception(reply.error.exception())
                else:
                    fut.set_result(reply.x)
            else:
                fut.set_result(reply)
            if isinstance(reply, ShutDown):
                return

    def _fail(self, reason: str) -> None:
        """A rank is gone: fail everything waiting, then exit so torchrun and the orchestrator
        restart the whole group (the survivors cannot rebuild the ring on their own)."""
        log.critical("TPP: %s", reason)
        self.broken = reason
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for fut in waiting:
            fut.set_exception(RuntimeError(reason))
        threading.Timer(EXIT_DELAY_S, os._exit, (1,)).start()


def _reply_key(reply: Reply) -> tuple:
    """What a reply answers: the future rank 0 waits on for it."""
    if isinstance(reply, BlockDone):
        return BlockDone, reply.sid, reply.index
    if isinstance(reply, (Opened, Closed)):
        return type(reply), reply.sid
    return (type(reply),)


@dataclass(eq=False)
class TPPSession:
    """One stream on the TPP group. submit() returns at once (blocks overlap across ranks);
    results come back in order. `pipeline_depth` blocks may be in flight."""

    engine: TPPEngine
    sid: int
    step: GeneratorSession  # rank 0's share: sampling step 0 of every block
    results: dict = field(default_factory=dict)  # block index -> future of its finished latent
    error: RankError | None = None
    last_block_ms: float = 0.0
    _next: int = 0
    _closed: bool = False

    @property
    def pipeline_depth(self) -> int:
        return self.engine.world_size

    @property
    def kv_cache_bytes(self) -> int:
        """Rank 0's share (every rank holds as much)."""
        return self.step.kv_cache_bytes

    def submit(self, audio: torch.Tensor) -> concurrent.futures.Future:
        """Queues the next block; the future gives its latent [16, F, h, w] (CPU)."""
        if self._closed:
            raise InvalidInput("the generator session is closed")
        self.step.check_audio(audio)
        index, self._next = self._next, self._next + 1
        start = time.perf_counter()
        sent = self.engine.run_block(self, index, audio)
        out: concurrent.futures.Future = concurrent.futures.Future()

        def relay(f):  # `sent` resolves when step 0 is sent; then wait for the result
            if f.exception() is not None:
                out.set_exception(f.exception())
                return

            def done(r):
                self.last_block_ms = (time.perf_counter() - start) * 1e3
                if r.exception() is not None:
                    out.set_exception(r.exception())
                else:
                    out.set_result(r.result()[0])
                if index:  # block 0 stays: the sink refresh at the second clip needs its first frame
                    self.results.pop(index, None)

            self.results[index].add_done_callback(done)

        sent.add_done_callback(relay)
        return out

    def generate_block(self, audio: torch.Tensor) -> torch.Tensor:
        return self.submit(audio).result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.end_session(self)
