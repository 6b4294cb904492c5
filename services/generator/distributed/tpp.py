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

Rank 0 runs the gRPC service (avatar/serve.py) with TPPEngine in place of GeneratorEngine: a
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
import dataclasses
import itertools
import logging
import os
import pickle
import queue
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from avatar import errors
from avatar.errors import InvalidInput
from avatar.memory_planner import MemoryRequest, check_session_memory
from avatar.presets import VAE_TIME_STRIDE, ModelSpec
from avatar.services.generator.causal_s2v_dit import REF_ROPE_FRAME
from avatar.services.generator.engine import SINK_AHEAD, GeneratorEngine, clip_noise, plan_session
from avatar.services.generator.kv_cache import KVCache, KVCacheSpec
from avatar.services.generator.scheduler import FlowMatchEuler

log = logging.getLogger(__name__)

EXIT_DELAY_S = 2.0   # after a rank failure, rank 0 lets the failed RPCs reach their clients, then exits
PING_S = 60.0        # an idle rank 0 pings the ring, so idle ranks' receives never reach the group timeout
GROUP_TIMEOUT = datetime.timedelta(minutes=30)   # a rank silent this long is taken as hung


# ---------------------------------------------------------------- process group

@dataclass(frozen=True)
class Group:
    rank: int
    world_size: int
    device: torch.device          # where this rank's DiT runs (cuda:LOCAL_RANK or cpu)
    comm_device: torch.device     # where message buffers live (cuda for NCCL, cpu for gloo)
    up: Any                       # process group for last rank -> rank 0

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
    group = Group(dist.get_rank(), dist.get_world_size(), device, device if backend == "nccl" else torch.device("cpu"), up)
    return group, model.with_(device=str(device))


# ---------------------------------------------------------------- messages

@dataclass
class Msg:
    """One message on the ring. Tensors are CPU tensors (pickled, bit-exact)."""
    kind: str                             # open | block | close | shutdown | ack | result
    sid: int = 0
    index: int = 0                        # block index
    x: torch.Tensor | None = None         # block latent [1, 16, F, h, w] after this rank's step
    audio: torch.Tensor | None = None     # block audio features [F*4, layers, dim]
    first: torch.Tensor | None = None     # block 0's first latent frame (sink refresh at clip 1)
    open: dict | None = None              # job, text, ref_latent, motion_latents
    error: tuple[str, str] | None = None  # (error class name, message) of the first rank that failed
    of: str = ""                          # ack: the kind of message it acknowledges


def _describe(exc: BaseException, at_rank: int) -> tuple[str, str]:
    if isinstance(exc, torch.OutOfMemoryError):   # the session is freed on every rank; others may fit
        return "ResourceExhausted", f"generator rank {at_rank} ran out of GPU memory: {exc}"
    return type(exc).__name__, f"generator rank {at_rank}: {exc}"


def _raise_for(error: tuple[str, str]) -> Exception:
    cls = getattr(errors, error[0], None)
    if isinstance(cls, type) and issubclass(cls, errors.AvatarError):
        return cls(error[1])
    return RuntimeError(f"{error[1]} ({error[0]})")


class Channel:
    """Pickled messages to/from one peer over one process group: a length, then the bytes.
    Sends are asynchronous (one in flight: the next send waits for the previous)."""

    def __init__(self, peer: int, group, device: torch.device):
        self.peer, self.group, self.device = peer, group, device
        self._in_flight: list = []

    def send(self, msg: Msg) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(msg, protocol=5)), dtype=torch.uint8).to(self.device)
        head = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        self.flush()
        works = [dist.isend(head, self.peer, group=self.group), dist.isend(data, self.peer, group=self.group)]
        self._in_flight = [works, head, data]   # the buffers must outlive the sends

    def flush(self) -> None:
        if self._in_flight:
            for work in self._in_flight[0]:
                work.wait()
            self._in_flight = []

    def recv(self) -> Msg:
        head = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(head, self.peer, group=self.group)
        data = torch.empty(int(head.item()), dtype=torch.uint8, device=self.device)
        dist.recv(data, self.peer, group=self.group)
        return pickle.loads(data.cpu().numpy().tobytes())   # peers are this job's own ranks


# ---------------------------------------------------------------- one rank's share of a session

@dataclass(frozen=True)
class _RingFirstSpec(KVCacheSpec):
    """One cache set laid out as an even set of a multi-set cache ([ring | sink], the ring filled
    backwards, set 0 of a two-set spec without the second ring), so attention sees the keys in
    the same order as GeneratorSession's set and the results match bit for bit."""

    @property
    def buffer_tokens(self) -> int:
        return self.ring_tokens + self.sink_tokens


def step_cache_spec(dit, h: int, w: int, window_frames: int, step: int, steps: int) -> tuple[KVCacheSpec, int]:
    """This step's single cache set and the index the DiT addresses it by."""
    if steps > 1 and step % 2 == 0:
        base = KVCacheSpec.for_model(dit, h, w, window_frames, num_sets=2)
        return _RingFirstSpec(**dataclasses.asdict(base)), 0
    return KVCacheSpec.for_model(dit, h, w, window_frames, num_sets=1), 0


class StepRunner:
    """Sampling step `step` of every block of one session: what GeneratorSession does for one of
    its cache sets (same plan, same timesteps, same draws of the sink's RoPE lead)."""

    def __init__(self, engine: GeneratorEngine, job, text: torch.Tensor, ref_latent: torch.Tensor,
                 motion_latents: torch.Tensor, step: int, refresh_sink: bool = True):
        self.dit = dit = engine.dit
        self.plan = p = plan_session(job, dit, ref_latent, motion_latents, text, None)
        if not 0 <= step < p.steps:
            raise InvalidInput(f"step {step} out of range for {p.steps} sampling steps")
        self.step, self.seed, self.refresh_sink = step, int(job.seed), refresh_sink
        self.sampler = FlowMatchEuler.create(p.steps)
        self._rng = random.Random(self.seed)
        self.device, self.dtype = dit.device, dit.dtype
        self.blocks_per_clip = p.clip_frames // p.block_frames
        self.next_index = 0
        self._clip_noise: torch.Tensor | None = None
        spec, self.cache_set = step_cache_spec(dit, p.h, p.w, p.clip_frames, step, p.steps)
        if engine.free_memory is not None and job.width % 16 == 0 == job.height % 16:
            check_session_memory(MemoryRequest.from_job(job), 1, engine.free_memory(),
                                 kv_dtype_bytes=engine.kv_dtype.itemsize)
        self.kv = KVCache(spec, engine.kv_dtype, self.device)
        try:
            with torch.no_grad():
                self.context = dit.embed_text(text.to(self.device)[None])
                self.motion = motion_latents.to(self.device, self.dtype)[None]
                dit.prefill_sink(ref_latent.to(self.device, self.dtype)[None], self.motion, self.context, self.kv)
        except BaseException as e:
            self.close()
            traceback.clear_frames(e.__traceback__)
            raise

    def noise(self, index: int) -> torch.Tensor:
        """Block `index`'s starting noise (rank 0 only): the clip's noise seeded with seed + clip."""
        p = self.plan
        clip, in_clip = divmod(index, self.blocks_per_clip)
        if in_clip == 0 or self._clip_noise is None:
            self._clip_noise = clip_noise(self.seed, clip, p)
        f0 = in_clip * p.block_frames
        return self._clip_noise[:, :, f0:f0 + p.block_frames]

    def needs_first_frame(self, index: int) -> bool:
        return self.refresh_sink and index == self.blocks_per_clip

    @torch.no_grad()
    def run(self, x: torch.Tensor, audio: torch.Tensor, index: int, first: torch.Tensor | None) -> torch.Tensor:
        """x [1, 16, F, h, w] before this step -> after it (on this rank's device)."""
        if index != self.next_index:
            raise RuntimeError(f"block {index} arrived, expected block {self.next_index}")
        try:
            return self._run(x, audio, index, first)
        except Exception as e:
            # The session is over (its later blocks fail with this error): free its cache now, and
            # clear the traceback's frames, whose locals hold views of the cache for as long as
            # the error is held (GeneratorSession._freed_on_failure does the same).
            self.close()
            traceback.clear_frames(e.__traceback__)
            raise

    def _run(self, x: torch.Tensor, audio: torch.Tensor, index: int, first: torch.Tensor | None) -> torch.Tensor:
        p, dit = self.plan, self.dit
        if self.needs_first_frame(index):
            if first is None:
                raise RuntimeError("the first clip's first frame did not arrive for the sink refresh")
            dit.prefill_sink(first.to(self.device, self.dtype), self.motion, self.context, self.kv)
        # GeneratorSession draws the sink's lead once per forward: N per block, step i uses the i-th.
        leads = [self._rng.randint(*SINK_AHEAD) for _ in range(p.steps)]
        frame = index * p.block_frames
        tokens = dit.encode_audio(audio.to(self.device).permute(1, 2, 0)[None])
        x = x.to(self.device, self.dtype)
        t = self.sampler.timesteps[self.step]
        v = dit(x, torch.full((1,), t, device=self.device), self.context, tokens, self.kv, self.cache_set,
                frame, max(REF_ROPE_FRAME, frame + leads[self.step]))
        self.next_index += 1
        return self.sampler.step(x, v, self.step)

    def close(self) -> None:
        if self.kv is not None:
            self.kv.free()
        self.kv = self._clip_noise = self.context = self.motion = None


def _check_audio(plan, dit, audio: torch.Tensor) -> None:
    want = (plan.block_frames * VAE_TIME_STRIDE, dit.config.audio_layers, dit.config.audio_dim)
    if tuple(audio.shape) != want:
        raise InvalidInput(f"audio features must be {list(want)}, got {list(audio.shape)}")


# ---------------------------------------------------------------- ranks 1..N-1

def run_worker(group: Group, engine: GeneratorEngine) -> None:
    """Rank i > 0: step i of every block of every session, until rank 0 sends shutdown."""
    step = group.rank
    down_in = Channel(step - 1, None, group.comm_device)
    last = step == group.last
    out = Channel(0, group.up, group.comm_device) if last else Channel(step + 1, None, group.comm_device)
    runners: dict[int, StepRunner] = {}
    failed: dict[int, tuple[str, str]] = {}
    log.info("TPP rank %d/%d ready on %s (sampling step %d)", step, group.world_size, group.device, step)
    while True:
        msg = down_in.recv()
        if msg.kind == "open" and msg.error is None:
            try:
                o = msg.open
                runners[msg.sid] = StepRunner(engine, o["job"], o["text"], o["ref_latent"], o["motion_latents"], step)
            except Exception as exc:   # reported to rank 0, which fails the session
                log.warning("rank %d: session %d did not open: %s", step, msg.sid, exc)
                msg.error = _describe(exc, step)
        elif msg.kind == "block" and msg.error is None:
            msg.error = failed.get(msg.sid)
            runner = runners.get(msg.sid)
            if msg.error is None and runner is None:
                msg.error = ("RuntimeError", f"generator rank {step}: no session {msg.sid}")
            if msg.error is None:
                try:
                    msg.x = runner.run(msg.x, msg.audio, msg.index, msg.first).cpu()
                except Exception as exc:
                    log.warning("rank %d: session %d block %d failed: %s", step, msg.sid, msg.index, exc)
                    msg.error = failed[msg.sid] = _describe(exc, step)
                    runners.pop(msg.sid).close()
                    if group.device.type == "cuda":
                        torch.cuda.empty_cache()
        elif msg.kind == "close":
            failed.pop(msg.sid, None)
            runner = runners.pop(msg.sid, None)
            if runner is not None:
                runner.close()
                if group.device.type == "cuda":
                    torch.cuda.empty_cache()
        if last:
            kind = "result" if msg.kind == "block" else "ack"
            reply = Msg(kind, msg.sid, msg.index, x=msg.x if msg.error is None and kind == "result" else None,
                        error=msg.error, of=msg.kind)
            out.send(reply)
        else:
            if msg.kind == "block":
                msg.audio = msg.audio if msg.error is None else None
            out.send(msg)
        if msg.kind == "shutdown":
            out.flush()
            log.info("TPP rank %d: shutdown", step)
            return


def worker_main(model: ModelSpec) -> None:
    """Entry of ranks 1..N-1 under `avatar serve --role generator`: join, load the DiT, serve steps."""
    group, spec = init_group(model)
    try:
        run_worker(group, GeneratorEngine(spec))
    finally:
        dist.destroy_process_group()


def start_rank0(model: ModelSpec) -> "TPPEngine":
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
        self._waiting: dict[tuple, concurrent.futures.Future] = {}   # (kind, sid, index) -> future
        self._lock = threading.Lock()
        self._sids = itertools.count(1)
        self._active: int | None = None
        self.broken: str | None = None
        self._driver = threading.Thread(target=self._drive, name="tpp-driver", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="tpp-receiver", daemon=True)
        self._driver.start()
        self._receiver.start()

    # -- API used by GeneratorServicer (from worker threads / the event loop)

    def open_session(self, job, text: torch.Tensor, ref_latent: torch.Tensor,
                     motion_latents: torch.Tensor) -> "TPPSession":
        if job.sample_steps != self.world_size:
            raise InvalidInput(f"this multi-GPU generator runs {self.world_size} ranks, one sampling step each: "
                               f"sample_steps must be {self.world_size}, got {job.sample_steps}")
        with self._lock:
            if self._active is not None:
                raise errors.ResourceExhausted("the multi-GPU generator runs one session at a time (--max-sessions=1)")
            self._active = sid = next(self._sids)
        try:
            runner = self._call("open", sid, job, text, ref_latent, motion_latents).result()
        except BaseException:
            with self._lock:
                self._active = None
            raise
        return TPPSession(self, sid, runner)

    def close(self, timeout: float = 30.0) -> None:
        """Stops every rank (shutdown down the ring) and leaves the process group."""
        if self.broken is None and self._driver.is_alive():
            try:
                self._call("shutdown").result(timeout)
            except Exception as exc:
                log.warning("TPP shutdown: %s", exc)
        if dist.is_initialized():
            dist.destroy_process_group()

    async def aclose(self) -> None:
        import asyncio
        await asyncio.to_thread(self.close)

    # -- plumbing

    def _call(self, what: str, *args) -> concurrent.futures.Future:
        if self.broken:
            raise RuntimeError(self.broken)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((what, args, fut))
        return fut

    def _expect(self, key: tuple) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._waiting[key] = fut
        return fut

    def _drive(self) -> None:
        handlers = {"ping": self._ping, "open": self._open, "block": self._block, "close": self._close, "shutdown": self._shutdown}
        while True:
            try:
                what, args, fut = self._commands.get(timeout=PING_S)
            except queue.Empty:
                what, args, fut = "ping", (), concurrent.futures.Future()
            if self.broken:
                fut.set_exception(RuntimeError(self.broken))
                continue
            try:
                fut.set_result(handlers[what](*args))
            except Exception as exc:
                fut.set_exception(exc)
            except BaseException as exc:   # the process is going down
                fut.set_exception(exc)
                raise
            if what == "shutdown":
                return

    def _open(self, sid, job, text, ref_latent, motion_latents) -> StepRunner:
        runner = StepRunner(self.engine, job, text, ref_latent, motion_latents, 0)
        ack = self._expect(("ack", sid, 0))
        try:
            self._down.send(Msg("open", sid, open={"job": job, "text": text.cpu(), "ref_latent": ref_latent.cpu(),
                                                   "motion_latents": motion_latents.cpu()}))
            reply = ack.result()
        except BaseException:
            runner.close()
            raise
        if reply.error is not None:
            runner.close()
            self._close(sid, None)   # ranks before the one that failed have opened
            raise _raise_for(reply.error)
        return runner

    def _block(self, sid, runner: StepRunner, index: int, audio: torch.Tensor, session: "TPPSession") -> None:
        result = self._expect(("result", sid, index))
        session.results[index] = result
        if session.error is not None:
            result.set_exception(_raise_for(session.error))
            return
        first = None
        try:
            if runner.needs_first_frame(index):
                first = session.results[0].result()[:, :, :1]   # waits for block 0 to come round
            x = runner.run(runner.noise(index), audio, index, first).cpu()
        except Exception as exc:
            session.error = _describe(exc, 0)
            with self._lock:
                self._waiting.pop(("result", sid, index), None)
            result.set_exception(exc if isinstance(exc, errors.AvatarError) else _raise_for(session.error))
            return
        self._down.send(Msg("block", sid, index, x=x, audio=audio.cpu(), first=first))

    def _close(self, sid, runner: StepRunner | None) -> None:
        ack = self._expect(("ack", sid, 0))
        self._down.send(Msg("close", sid))
        ack.result()
        if runner is not None:
            runner.close()
            if self.group.device.type == "cuda":
                torch.cuda.empty_cache()

    def _ping(self) -> None:
        self._down.send(Msg("ping"))

    def _shutdown(self) -> None:
        ack = self._expect(("ack", 0, 0))
        self._down.send(Msg("shutdown"))
        ack.result()
        self._down.flush()

    def _receive(self) -> None:
        stream = torch.cuda.Stream(self.group.device) if self.group.device.type == "cuda" else None
        while True:
            try:
                if stream is not None:
                    # Its own stream: a receive waiting for a block N steps away must not hold up
                    # step 0's kernels on the default stream.
                    with torch.cuda.stream(stream):
                        msg = self._up.recv()
                else:
                    msg = self._up.recv()
            except Exception as exc:
                self._fail(f"a generator rank failed ({type(exc).__name__}: {exc}); restarting the group")
                return
            key = ("result", msg.sid, msg.index) if msg.kind == "result" else ("ack", msg.sid, 0)
            with self._lock:
                fut = self._waiting.pop(key, None)
            if fut is None:
                if msg.of == "ping":
                    continue
                log.warning("TPP: unexpected %s for session %d block %d", msg.kind, msg.sid, msg.index)
                continue
            if msg.error is not None and msg.kind == "result":
                fut.set_exception(_raise_for(msg.error))
            else:
                fut.set_result(msg.x if msg.kind == "result" else msg)
            if msg.kind == "ack" and msg.of == "shutdown":
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


@dataclass(eq=False)
class TPPSession:
    """One stream on the TPP group. submit() returns at once (blocks overlap across ranks);
    results come back in order. `pipeline_depth` blocks may be in flight."""
    engine: TPPEngine
    sid: int
    runner: StepRunner
    results: dict = field(default_factory=dict)
    error: tuple[str, str] | None = None
    last_block_ms: float = 0.0
    _next: int = 0
    _closed: bool = False

    @property
    def pipeline_depth(self) -> int:
        return self.engine.world_size

    @property
    def plan(self):
        return self.runner.plan

    def submit(self, audio: torch.Tensor) -> concurrent.futures.Future:
        """Queues the next block; the future gives its latent [16, F, h, w] (CPU)."""
        if self._closed:
            raise InvalidInput("the generator session is closed")
        _check_audio(self.runner.plan, self.engine.dit, audio)
        index, self._next = self._next, self._next + 1
        start = time.perf_counter()
        fut = self.engine._call("block", self.sid, self.runner, index, audio, self)
        out: concurrent.futures.Future = concurrent.futures.Future()

        def relay(f):   # the driver's future resolves when step 0 is sent; then wait for the result
            if f.exception() is not None:
                out.set_exception(f.exception())
                return
            result = self.results[index]

            def done(r):
                self.last_block_ms = (time.perf_counter() - start) * 1e3
                if r.exception() is not None:
                    out.set_exception(r.exception())
                else:
                    out.set_result(r.result()[0])
                if index:   # block 0 stays: the sink refresh at the second clip needs its first frame
                    self.results.pop(index, None)
            result.add_done_callback(done)
        fut.add_done_callback(relay)
        return out

    def generate_block(self, audio: torch.Tensor) -> torch.Tensor:
        return self.submit(audio).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.engine.broken:
                self.engine._call("close", self.sid, self.runner).result()
        finally:
            self.runner.close()
            with self.engine._lock:
                self.engine._active = None
