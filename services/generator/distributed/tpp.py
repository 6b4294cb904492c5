"""Timestep-forcing pipeline parallelism (TPP): one DiT copy per rank, each rank runs some of the
sampling steps of every block, for any number of ranks R and of sampling steps S.

Upstream's single-GPU sampler keeps one KV cache set per sampling step, so step k of a block only
reads and writes set k. TPP puts each set on the rank that runs its step: sampling step k of a
session runs on rank (offset + k) % R (`step_rank`), which holds that step's cache set and
nothing of the others. With offset 0 rank r runs steps r, r + R, r + 2R, ...: a block goes down
the ring 0 -> 1 -> ... -> R-1, up to rank 0 and round again until its S steps are done (one lap
per R steps), and blocks overlap across ranks, so a stream gets one block per ceil(S/R) step
times instead of per S. With S < R a session's steps use S ranks; the group gives each new
session the offset that evens out the steps per rank over the sessions in flight, so the other
ranks run other sessions' steps (with one session they only pass its blocks on, and the log says
so). The result is the same computation as GeneratorSession with one cache set per step
(bit-identical on CPU float32: tests/test_tpp.py).

Several sessions run through the group at once (`max_sessions`, `avatar serve --max-sessions`):
every rank works on whatever block reaches it, so while one session's next block waits (for its
audio, or for block 0 before the sink refresh) other sessions' blocks keep the ranks busy.

Messages travel as a ring of point-to-point sends: down on the default group, last rank -> 0 on
a second group ("up", its own NCCL communicator, so a send down and a receive up never queue
behind each other). Everything a rank learns (a session's job and conditioning, each block's
latent and audio, close, shutdown) comes down the ring in order, so no rank ever waits on a
collective that another rank is too busy to join, and a session's blocks reach every rank in
order (each step's cache set sees block b before block b + 1).

Rank 0 runs the gRPC service (avatar/app/serve.py) with TPPEngine in place of GeneratorEngine: a
driver thread runs rank 0's steps and sends down, a receiver thread takes what comes up (finished
blocks, blocks for another lap, acknowledgements) and never waits on the driver, so the ring
always drains. Ranks 1..R-1 run `run_worker`.

Failures: an exception on any rank (bad input, out of memory) travels with the block to rank 0,
which ends that session with the error; the service stays up. A rank that dies takes the group
with it: rank 0 fails its sessions with "a generator rank failed", reports NOT_SERVING
(`on_failure`) and exits, torchrun stops the other ranks and exits non-zero, and the orchestrator
(compose `restart:`, Kubernetes) restarts the group.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from avatar import errors
from avatar.errors import InvalidInput
from avatar.jobs import Job
from avatar.presets import VAE_TIME_STRIDE, ModelSpec
from avatar.services.generator.distributed import join_group
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
from avatar.services.generator.engine import GeneratorEngine, GeneratorSession, SessionPlan, clip_noise, plan_session

log = logging.getLogger(__name__)

# After a rank failure rank 0 exits once its streams have ended and their statuses had time to
# reach the clients (EXIT_DELAY_S after the last one), or EXIT_GRACE_S after the failure at the
# latest. Not on a fixed timer: on a loaded host a timer can cut off results already back.
EXIT_DELAY_S = 1.0
EXIT_GRACE_S = 15.0
PING_S = 60.0  # an idle rank 0 pings the ring, so idle ranks' receives never reach the group timeout
TIMEOUT_ENV = "AVATAR_TPP_TIMEOUT_S"  # a rank silent this long is taken as hung (default 30 minutes)


def group_timeout() -> datetime.timedelta:
    value = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds < 2 * PING_S:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds >= {2 * PING_S:.0f}, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def step_rank(step: int, offset: int, world_size: int) -> int:
    """The rank that runs sampling step `step` of a session placed at `offset` (and holds its cache set)."""
    return (offset + step) % world_size


def rank_steps(rank: int, steps: int, offset: int, world_size: int) -> list[int]:
    """The sampling steps `rank` runs for a session of `steps` steps at `offset`."""
    return [k for k in range(steps) if step_rank(k, offset, world_size) == rank]


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
    """Joins the torchrun group (MASTER_ADDR/MASTER_PORT, as torchrun's --master-addr/--master-port
    or --rdzv-endpoint set them): NCCL on CUDA (device cuda:LOCAL_RANK), gloo on the CPU.
    Returns the group and the ModelSpec with this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise ValueError("TPP needs at least 2 ranks (start the generator with torchrun --nproc-per-node N)")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"TPP rank without {', '.join(missing)}: start the generator with torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if os.environ.get("NCCL_NVLS_ENABLE") not in (None, "0"):
        # NVLink multicast (NVLS) needs multicast objects the host may not allow (communicator
        # creation then fails), reserves GPU memory per communicator and buys nothing for p2p.
        log.warning(
            "NCCL_NVLS_ENABLE=%s ignored: the TPP generator runs with NVLink multicast off",
            os.environ["NCCL_NVLS_ENABLE"],
        )
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    timeout = group_timeout()
    device, backend = join_group(model.device, local, timeout, "TPP")
    up = dist.new_group(backend=backend, timeout=timeout)
    group = Group(
        dist.get_rank(), dist.get_world_size(), device, device if backend == "nccl" else torch.device("cpu"), up
    )
    return group, model.with_(device=str(device))


# ---------------------------------------------------------------- every rank's share of the sessions


@dataclass
class Share:
    """One session on one rank: a step session (one cache set) per sampling step the rank runs."""

    offset: int
    steps: dict[int, GeneratorSession]  # sampling step -> its step session; empty: the rank passes blocks on

    def close(self) -> None:
        for session in self.steps.values():
            session.close()


class Shares:
    """A rank's part of every session in flight; rank 0 and run_worker both use it."""

    def __init__(self, engine: GeneratorEngine, rank: int, world_size: int):
        self.engine, self.rank, self.world_size = engine, rank, world_size
        self.sessions: dict[int, Share] = {}
        self.failed: dict[int, RankError] = {}  # sessions whose step failed here: their later blocks fail too

    def open(self, msg: OpenSession) -> OpenSession:
        """Opens this rank's step sessions; a failure travels on as the message's error."""
        if msg.error is not None:
            return msg
        opened: dict[int, GeneratorSession] = {}
        try:
            for k in rank_steps(self.rank, msg.job.sample_steps, msg.offset, self.world_size):
                opened[k] = self.engine.open_step_session(msg.job, msg.text, msg.ref_latent, msg.motion_latents, k)
        except Exception as exc:  # reported to rank 0, which fails the session
            for session in opened.values():
                session.close()
            log.warning("rank %d: session %d did not open: %s", self.rank, msg.sid, exc)
            return replace(msg, error=RankError.of(exc, self.rank))
        self.sessions[msg.sid] = Share(msg.offset, opened)
        held = sum(session.kv_cache_bytes for session in opened.values())
        return replace(msg, kv_cache_bytes=max(msg.kv_cache_bytes, held))

    def advance(self, block: Block) -> Block:
        """Runs the block's next step if it falls to this rank (one step a visit: the next step's
        rank is the next rank); a failure ends the session here and travels on with the block."""
        if block.finished:
            return block
        if block.sid in self.failed:
            return block.failed(self.failed[block.sid])
        share = self.sessions.get(block.sid)
        if share is None:
            return block.failed(RankError("RuntimeError", f"generator rank {self.rank}: no session {block.sid}"))
        session = share.steps.get(block.step)
        if session is None or step_rank(block.step, share.offset, self.world_size) != self.rank:
            return block  # another rank's step: pass it on
        try:
            x = _denoise(session, block.x, block.audio, block.index, block.first)
        except Exception as exc:  # the session has freed its memory (GeneratorSession._freed_on_failure)
            log.warning("rank %d: session %d block %d failed: %s", self.rank, block.sid, block.index, exc)
            self.failed[block.sid] = RankError.of(exc, self.rank)
            self.sessions.pop(block.sid).close()
            return block.failed(self.failed[block.sid])
        return replace(block, x=x, step=block.step + 1)

    def close(self, sid: int) -> None:
        self.failed.pop(sid, None)
        share = self.sessions.pop(sid, None)
        if share is not None:
            share.close()
            if self.engine.dit.device.type == "cuda":
                torch.cuda.empty_cache()


def _denoise(
    session: GeneratorSession, x: torch.Tensor, audio: torch.Tensor, index: int, first: torch.Tensor | None
) -> torch.Tensor:
    """One step session's step of block `index` (blocks arrive in order), the result on the CPU."""
    if index != session.block_index:
        raise RuntimeError(f"block {index} arrived, expected block {session.block_index}")
    return session.denoise_block(x, audio, first).cpu()


# ---------------------------------------------------------------- ranks 1..R-1


def run_worker(group: Group, engine: GeneratorEngine) -> None:
    """Rank r > 0: its steps of every block of every session, until rank 0 sends Shutdown."""
    rank = group.rank
    down_in = Channel(rank - 1, None, group.comm_device)
    last = rank == group.last
    out = Channel(0, group.up, group.comm_device) if last else Channel(rank + 1, None, group.comm_device)
    shares = Shares(engine, rank, group.world_size)
    log.info("TPP rank %d/%d ready on %s (pid %d)", rank, group.world_size, group.device, os.getpid())
    while True:
        msg = down_in.recv()
        # The previous message's send ends before this one's work starts: a rank that then dies
        # (a crashed kernel) has delivered every block it finished. It has had the receive's
        # wait to complete, so this rarely waits.
        out.flush()
        if isinstance(msg, OpenSession):
            msg = shares.open(msg)
        elif isinstance(msg, Block):
            msg = shares.advance(msg)
        elif isinstance(msg, CloseSession):
            shares.close(msg.sid)
        out.send(msg.reply() if last else msg)
        if isinstance(msg, Shutdown):
            out.flush()
            log.info("TPP rank %d: shutdown", rank)
            return


def worker_main(model: ModelSpec) -> None:
    """Entry of ranks 1..R-1 under `avatar serve --role generator`: join, load the DiT, serve steps."""
    group, spec = init_group(model)
    try:
        run_worker(group, GeneratorEngine(spec))
    finally:
        dist.destroy_process_group()


def start_rank0(model: ModelSpec, max_sessions: int = 1) -> TPPEngine:
    """Rank 0's engine for GeneratorServicer (avatar/serve.py), taking up to `max_sessions` at once."""
    group, spec = init_group(model)
    return TPPEngine(group, GeneratorEngine(spec), max_sessions=max_sessions)


# ---------------------------------------------------------------- rank 0

CONTINUE, COMMAND = 0, 1  # driver priorities: a block on its next lap before new work


class TPPEngine:
    """GeneratorEngine's interface on rank 0 of a TPP group: up to `max_sessions` sessions at once."""

    def __init__(self, group: Group, engine: GeneratorEngine, max_sessions: int = 1):
        if group.rank != 0:
            raise ValueError("TPPEngine runs on rank 0; other ranks run run_worker")
        if engine.cache_sets is not None:
            raise ValueError("--cache-sets does not apply to the multi-GPU generator: each rank holds its steps' sets")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.group, self.engine = group, engine
        self.dit, self.spec = engine.dit, engine.spec
        self.world_size = group.world_size
        self.max_sessions = max_sessions
        self.shares = Shares(engine, 0, group.world_size)
        self._down = Channel(1, None, group.comm_device)
        self._up = Channel(group.last, group.up, group.comm_device)
        self._commands: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO within a priority
        self._waiting: dict[tuple, concurrent.futures.Future] = {}  # _reply_key -> future
        self._lock = threading.Lock()
        self._sids = itertools.count(1)
        self._sessions: dict[int, TPPSession] = {}
        self._failure_hooks: list[Callable[[str], None]] = []
        self.broken: str | None = None
        self._driver = threading.Thread(target=self._drive, name="tpp-driver", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="tpp-receiver", daemon=True)
        self._driver.start()
        self._receiver.start()

    # -- API used by GeneratorServicer (from worker threads / the event loop) and TPPSession

    def open_session(
        self, job: Job, text: torch.Tensor, ref_latent: torch.Tensor, motion_latents: torch.Tensor
    ) -> TPPSession:
        plan = plan_session(job, self.dit, ref_latent, motion_latents, text, None)  # bad input: refused here
        with self._lock:
            if self.broken:
                raise errors.Unavailable(self.broken)
            if len(self._sessions) >= self.max_sessions:
                raise errors.ResourceExhausted(
                    f"the multi-GPU generator runs {self.max_sessions} session(s) at once (--max-sessions); "
                    "retry when one ends"
                )
            sid, offset = next(self._sids), self._offset_for(plan.steps)
            session = TPPSession(self, sid, job, plan, offset)
            self._sessions[sid] = session
        try:
            opened = self._call(COMMAND, self._open, session, text, ref_latent, motion_latents).result().result()
            if opened.error is not None:
                self._close_on_ranks(sid)  # the ranks before the one that failed have opened
                raise opened.error.exception()
        except BaseException:
            self._forget(sid)
            raise
        session.kv_cache_bytes = opened.kv_cache_bytes
        ranks = sorted({step_rank(k, offset, self.world_size) for k in range(plan.steps)})
        log.info(
            "TPP session %d: %d sampling steps on %d ranks: step k on rank (%d + k) %% %d%s",
            sid,
            plan.steps,
            self.world_size,
            offset,
            self.world_size,
            ""
            if len(ranks) == self.world_size
            else f"; ranks {sorted(set(range(self.world_size)) - set(ranks))} run none of its steps "
            "(they pass its blocks on and run other sessions')",
        )
        return session

    def on_failure(self, hook: Callable[[str], None]) -> None:
        """Calls hook(reason) once a rank is gone (from the receiver thread; serve.py turns the
        health NOT_SERVING with it), before rank 0 exits."""
        self._failure_hooks.append(hook)

    def close(self, timeout: float = 30.0) -> None:
        """Stops every rank (Shutdown down the ring) and leaves the process group."""
        if self.broken is None and self._driver.is_alive():
            try:
                self._call(COMMAND, self._shutdown).result(timeout).result(timeout)
            except Exception as exc:
                log.warning("TPP shutdown: %s", exc)
        if dist.is_initialized():
            dist.destroy_process_group()

    async def aclose(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close)

    # -- placement and admission

    def _offset_for(self, steps: int) -> int:
        """The offset whose ranks have the fewest steps of the sessions in flight (ties: the lowest,
        so a lone session starts on rank 0). Caller holds the lock."""
        load = [0] * self.world_size
        for s in self._sessions.values():
            for k in range(s.plan.steps):
                load[step_rank(k, s.offset, self.world_size)] += 1

        def after(offset: int) -> tuple[int, int]:
            new = list(load)
            for k in range(steps):
                new[step_rank(k, offset, self.world_size)] += 1
            return max(new), sum(v * v for v in new)

        return min(range(self.world_size), key=after)

    def _forget(self, sid: int) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def end_session(self, session: TPPSession) -> None:
        """Closes the session on every rank, rank 0 too (unless the group is gone)."""
        try:
            if not self.broken:  # else the process exits in a moment, with every share
                self._close_on_ranks(session.sid)
        finally:
            self._forget(session.sid)

    def _close_on_ranks(self, sid: int) -> None:
        self._call(COMMAND, self._close, sid).result().result()

    # -- plumbing: the driver thread runs one command at a time (lap continuations first)

    def _call(self, priority: int, command, *args) -> concurrent.futures.Future:
        if self.broken:
            raise errors.Unavailable(self.broken)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((priority, next(self._order), command, args, fut))
        return fut

    def _expect(self, key: tuple) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.broken:
                fut.set_exception(errors.Unavailable(self.broken))
            else:
                self._waiting[key] = fut
        return fut

    def _resolve(self, reply: Reply) -> None:
        with self._lock:
            fut = self._waiting.pop(_reply_key(reply), None)
        if fut is None:
            log.warning("TPP: unexpected reply %s", reply)
        elif isinstance(reply, BlockDone):
            if reply.error is not None:
                fut.set_exception(reply.error.exception())
            else:
                fut.set_result(reply.x)
        else:
            fut.set_result(reply)

    def _drive(self) -> None:
        while True:
            try:
                _, _, command, args, fut = self._commands.get(timeout=PING_S)
            except queue.Empty:
                command, args, fut = self._ping, (), concurrent.futures.Future()
            if self.broken:
                fut.set_exception(errors.Unavailable(self.broken))
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

    # Driver commands: none waits for the ring (replies come to the receiver), so rank 0 keeps
    # running its steps of other blocks meanwhile.

    def _open(self, session: TPPSession, text, ref_latent, motion_latents) -> concurrent.futures.Future:
        msg = OpenSession(
            session.sid, session.job, text.cpu(), ref_latent.cpu(), motion_latents.cpu(), offset=session.offset
        )
        msg = self.shares.open(msg)
        if msg.error is not None:
            raise msg.error.exception()  # nothing opened anywhere yet
        opened = self._expect(_reply_key(Opened(session.sid)))
        self._down.send(msg)
        return opened

    def _inject(self, session: TPPSession, index: int, audio: torch.Tensor, first: torch.Tensor | None) -> None:
        x = session.block_noise(index)
        self._onward(Block(session.sid, index, x=x, audio=audio.cpu(), first=first, steps=session.plan.steps))

    def _continue(self, block: Block) -> None:
        self._onward(block)

    def _onward(self, block: Block) -> None:
        """Rank 0's step of the block if it has one here; then round the ring, or done."""
        block = self.shares.advance(block)
        if block.finished:
            self._resolve(block.reply())  # no need to go round: nothing is left to run
        else:
            self._down.send(block)

    def _close(self, sid: int) -> concurrent.futures.Future:
        self.shares.close(sid)
        closed = self._expect(_reply_key(Closed(sid)))
        self._down.send(CloseSession(sid))
        return closed

    def _ping(self) -> None:
        self._down.send(Ping())

    def _shutdown(self) -> concurrent.futures.Future:
        done = self._expect(_reply_key(ShutDown()))
        self._down.send(Shutdown())
        self._down.flush()
        return done

    def _receive(self) -> None:
        stream = torch.cuda.Stream(self.group.device) if self.group.device.type == "cuda" else None
        while True:
            try:
                if stream is not None:
                    # Its own stream: a receive waiting for a block R steps away must not hold up
                    # rank 0's kernels on the default stream.
                    with torch.cuda.stream(stream):
                        reply = self._up.recv()
                else:
                    reply = self._up.recv()
            except Exception as exc:
                self._fail(f"a generator rank failed ({type(exc).__name__}: {exc}); restarting the group")
                return
            if isinstance(reply, Pong):
                continue
            if isinstance(reply, Block):  # another lap: rank 0's next step, in the driver thread
                try:
                    self._call(CONTINUE, self._continue, reply)
                except errors.Unavailable:
                    return  # the group is gone
                continue
            self._resolve(reply)
            if isinstance(reply, ShutDown):
                return

    def _fail(self, reason: str) -> None:
        """A rank is gone: fail everything waiting, report NOT_SERVING, then exit so torchrun and
        the orchestrator restart the whole group (the survivors cannot rebuild the ring on their own)."""
        log.critical("TPP: %s", reason)
        with self._lock:
            self.broken = reason
            waiting, self._waiting = list(self._waiting.values()), {}
        for fut in waiting:
            fut.set_exception(errors.Unavailable(reason))
        for hook in self._failure_hooks:
            try:
                hook(reason)
            except Exception as exc:
                log.warning("TPP failure hook: %s", exc)
        threading.Thread(target=self._exit_when_drained, name="tpp-exit", daemon=True).start()

    def _exit_when_drained(self) -> None:
        deadline, idle_since = time.monotonic() + EXIT_GRACE_S, None
        while time.monotonic() < deadline:
            with self._lock:
                idle = not self._sessions
            idle_since = (idle_since or time.monotonic()) if idle else None
            if idle_since is not None and time.monotonic() - idle_since >= EXIT_DELAY_S:
                break
            time.sleep(0.1)
        log.critical("TPP: rank 0 exits so the group restarts")
        logging.shutdown()
        os._exit(1)


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
    job: Job
    plan: SessionPlan
    offset: int  # sampling step k runs on rank (offset + k) % R
    kv_cache_bytes: int = 0  # the largest share on one rank
    last_block_ms: float = 0.0
    _next: int = 0
    _closed: bool = False
    _waiting: collections.deque = field(default_factory=collections.deque)  # (index, audio, out, t0) not sent yet
    _block0: concurrent.futures.Future | None = None  # block 0's latent: its first frame refreshes the sink
    _outstanding: dict = field(default_factory=dict)  # index -> future handed to the caller
    _lock: threading.RLock = field(default_factory=threading.RLock)  # re-entered by callbacks of done futures
    _awaiting_block0: bool = False
    _noise: tuple | None = None  # (clip, its noise)

    @property
    def pipeline_depth(self) -> int:
        return self.engine.world_size

    def block_noise(self, index: int) -> torch.Tensor:
        """Block `index`'s starting noise, as GeneratorSession.block_noise draws it (CPU)."""
        clip, in_clip = divmod(index, self.plan.blocks_per_clip)
        if self._noise is None or self._noise[0] != clip:
            self._noise = clip, clip_noise(int(self.job.seed), clip, self.plan).to(self.engine.dit.dtype)
        f0 = in_clip * self.plan.block_frames
        return self._noise[1][:, :, f0 : f0 + self.plan.block_frames]

    def _needs_first_frame(self, index: int) -> bool:
        return index == self.plan.blocks_per_clip

    def submit(self, audio: torch.Tensor) -> concurrent.futures.Future:
        """Queues the next block; the future gives its latent [16, F, h, w] (CPU)."""
        if self._closed:
            raise InvalidInput("the generator session is closed")
        c = self.engine.dit.config
        want = (self.plan.block_frames * VAE_TIME_STRIDE, c.audio_layers, c.audio_dim)
        if tuple(audio.shape) != want:
            raise InvalidInput(f"audio features must be {list(want)}, got {list(audio.shape)}")
        out: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            index, self._next = self._next, self._next + 1
            self._outstanding[index] = out
            self._waiting.append((index, audio, out, time.perf_counter()))
        self._pump()
        return out

    def _pump(self) -> None:
        """Hands the waiting blocks to the driver in order; the block that refreshes the sink
        waits (here, not in the driver) for block 0 to come round, and the ones after it too."""
        with self._lock:
            while self._waiting:
                index, audio, out, t0 = self._waiting[0]
                first = None
                if self._needs_first_frame(index):
                    if not self._block0.done():
                        if not self._awaiting_block0:
                            self._awaiting_block0 = True
                            self._block0.add_done_callback(lambda _: self._pump())
                        return
                    if self._block0.exception() is not None:
                        self._waiting.popleft()
                        out.set_exception(self._block0.exception())
                        continue
                    first = self._block0.result()[:, :, :1]
                self._waiting.popleft()
                result = self.engine._expect(_reply_key(BlockDone(self.sid, index)))
                if index == 0:
                    self._block0 = result
                result.add_done_callback(lambda r, index=index, out=out, t0=t0: self._done(index, out, t0, r))
                try:
                    self.engine._call(COMMAND, self.engine._inject, self, index, audio, first)
                except errors.Unavailable as exc:  # the group is gone
                    if not result.done():
                        result.set_exception(exc)

    def _done(self, index: int, out: concurrent.futures.Future, t0: float, result: concurrent.futures.Future) -> None:
        self.last_block_ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            self._outstanding.pop(index, None)
        if result.exception() is not None:
            out.set_exception(result.exception())
        else:
            out.set_result(result.result()[0])

    def generate_block(self, audio: torch.Tensor) -> torch.Tensor:
        return self.submit(audio).result()

    def close(self) -> None:
        """Waits for the blocks already sent round (they finish or fail), drops the ones not sent,
        then closes the session on every rank."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            dropped, self._waiting = list(self._waiting), collections.deque()
            outstanding = [f for f in self._outstanding.values() if not f.done()]
        for _, _, out, _ in dropped:
            out.set_exception(InvalidInput("the generator session is closed"))
        concurrent.futures.wait(outstanding, timeout=group_timeout().total_seconds())
        self.engine.end_session(self)
