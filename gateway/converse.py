"""Converse: one live session (audio streams in, video streams out) over the mesh Generate uses.

The client's speech is queued (SpeechQueue) and cut into blocks of 0.48 s on a real-time clock:
a block is decided when a full block of speech is queued, when its utterance has ended, or at the
latest when the video would otherwise run dry (then with whatever is queued, or silence: an idle
block, mouth closed). Decided blocks go through the same three internal streams as Generate,
opened once per session: EncoderService.EncodeAudioStream (features per block), one
GeneratorService.Generate session and one DecoderService.Decode stream. At most `blocks_ahead`
blocks are decided and not yet sent, and never more than that ahead of the clock, so an Interrupt
has little to undo: it drops the queued audio and every decided block whose latent has not gone to
the decoder yet (the decoder takes one block at a time for that reason); the next block is idle.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import statistics
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace

from avatar import media, metrics, telemetry, wire
from avatar.errors import InvalidInput
from avatar.gateway import planner
from avatar.gateway.live_audio import INPUT_RATES, SpeechQueue, StreamResampler, TakenBlock, pcm16_to_float
from avatar.gateway.server import _DONE as _END
from avatar.gateway.server import _RequestStream, end_session, mime_type, motion_context
from avatar.grpc_util import call_options, run_blocking
from avatar.job_limits import MAX_VIDEO_S
from avatar.presets import DEFAULT_AUDIO_ENCODER, ENCODER_AUDIO_RATE, FRAMES_PER_BLOCK, check_lora_id
from avatar.v1 import avatar_pb2, decoder_pb2, encoder_pb2, generator_pb2

LOOKAHEAD_S = 0.2  # queued speech after a block passed to the encoder as right context
MAX_SESSION_S = float(MAX_VIDEO_S)  # the longest job any service accepts (avatar.job_limits)


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConverseConfig:
    """Server-side limits of live sessions (`avatar serve --live-*`)."""

    idle_timeout_s: float = 60.0  # no client message for this long ends a session
    max_session_s: float = 4 * 3600.0  # longest session; the generator's job needs a block count
    block_budget_ms: float = 480.0  # generator ms per block a live session may need (real time: 480)
    probe_blocks: int = 2  # blocks measured before the header; the last one decides
    blocks_ahead: int = 2  # blocks decided and not yet sent, at most
    max_queued_s: float = 30.0  # client audio held; more: stop reading (backpressure)
    jitter_s: float = 0.2  # speech buffered before an utterance starts to play
    max_chunk_s: float = 10.0  # longest AudioChunk

    def __post_init__(self):
        if self.idle_timeout_s <= 0 or self.max_session_s <= 0 or self.block_budget_ms <= 0:
            raise ValueError("live idle timeout, session length and block budget must be positive")
        if self.max_session_s > MAX_SESSION_S:  # the job's frame count is an int32
            raise ValueError(f"a live session lasts at most {MAX_SESSION_S:g} s, got {self.max_session_s:g}")
        if self.max_queued_s < self.max_chunk_s:
            raise ValueError(
                f"max_queued_s ({self.max_queued_s:g}) must hold the longest chunk ({self.max_chunk_s:g} s)"
            )
        if not 1 <= self.probe_blocks <= self.blocks_ahead:
            raise ValueError(f"probe_blocks must be in 1..blocks_ahead ({self.blocks_ahead}), got {self.probe_blocks}")


class TooSlowForLive(Exception):
    """The generator cannot make blocks in real time at this size: FAILED_PRECONDITION."""


def plan_live_job(header: avatar_pb2.ConverseHeader, model, request_id: str, config: ConverseConfig):
    """Validates the header; returns (JobSpec for the generator, portrait pixels at the job size)."""
    if header.sample_rate not in INPUT_RATES:
        raise InvalidInput(
            f"sample_rate must be one of {', '.join(map(str, INPUT_RATES))} Hz "
            f"(PCM s16le mono), got {header.sample_rate}"
        )
    if not 0 <= header.idle_timeout_s <= config.idle_timeout_s or math.isnan(header.idle_timeout_s):
        raise InvalidInput(
            f"idle_timeout_s must be in 0..{config.idle_timeout_s:g} (0: the server's), got {header.idle_timeout_s:g}"
        )
    check_lora_id(header.lora_id)
    if not header.image:
        raise InvalidInput("the header needs the portrait image (PNG, JPEG or WebP bytes)")
    image = media.load_image(header.image)
    frames = math.ceil(config.max_session_s * 25 / FRAMES_PER_BLOCK) * FRAMES_PER_BLOCK
    # The planner's rules (preset, size, steps, prompt) apply unchanged; the "audio" is the
    # longest session, in one clip per block count the generator can run through.
    request = avatar_pb2.GenerateRequest(
        prompt=header.prompt,
        size=header.size,
        preset=header.preset,
        sample_steps=header.sample_steps,
        num_clip=frames,
        seed=header.seed if header.HasField("seed") else None,
        audio_encoder=header.audio_encoder,
    )
    job = planner.plan_job(request, model, config.max_session_s, image.size, request_id)
    return job, np.array(media.fit_image(image, job.width, job.height))


@dataclass(eq=False)
class _Block:
    """A decided block on its way through the mesh."""

    index: int  # in the generator's session (decided order)
    taken: TakenBlock
    epoch: int  # interrupts before it was decided
    pcm_out: np.ndarray  # int16 at the output rate, for the muxer
    decided_ns: int
    cursor: int  # the client's audio consumed before it (samples)
    features: object = None  # the encoder's AudioFeatures, until the block goes to the generator
    latent: object = None  # avatar.v1.Tensor once the generator returned it
    dropped: bool = False  # decided before an interrupt and never sent to the generator
    dit_ms: float = 0.0
    slot: int = -1  # fragment index once it went to the decoder
    after: list = field(default_factory=list)  # events to send right after its fragment


def _summary(values_s: list[float]) -> avatar_pb2.LatencySummary:
    if not values_s:
        return avatar_pb2.LatencySummary()
    ms = sorted(v * 1e3 for v in values_s)
    p95 = ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]
    return avatar_pb2.LatencySummary(count=len(ms), p50_ms=round(statistics.median(ms), 3), p95_ms=round(p95, 3))


class ConverseSession:
    """Owns one live session: reads the client, decides blocks, drives the three internal
    streams and yields what the client gets (`responses()`)."""

    def __init__(self, gateway, request_iterator, context, config: ConverseConfig):
        self.gateway, self.requests, self.context, self.config = gateway, request_iterator, context, config
        self.request_id = uuid.uuid4().hex[:8]
        self.loop = asyncio.get_running_loop()
        self.cond = asyncio.Condition()
        self.out: asyncio.Queue = asyncio.Queue()  # (response, block or None) in send order
        self.header_ready: asyncio.Future = self.loop.create_future()
        self.pending: collections.deque[_Block] = collections.deque()  # decided, not at the decoder
        self.in_decoder: collections.deque[_Block] = collections.deque()
        # decided blocks on their way to the generator, in decided order: the encoder's features
        # not back yet; back and waiting for the generator; sent to it, latents not back yet
        self.awaiting_features: collections.deque[_Block] = collections.deque()
        self.featured: collections.deque[_Block] = collections.deque()
        self.at_generator: collections.deque[_Block] = collections.deque()
        self.generator_depth = 1  # blocks the generator holds at once (a TPP group: its pipeline depth)
        self.decided = self.forwarded = self.sent = self.idle_sent = self.frames = 0
        self.epoch = 0
        self.eos = False
        self.stop_reason: str | None = None
        self.ahead = config.blocks_ahead
        self.starting = True  # an utterance after idle waits for its jitter buffer
        self.idle_now = False  # an interrupt came: the next block is decided at once, not at its deadline
        self.longest_chunk_s = 0.0  # the client's granularity: the jitter buffer covers it
        self.t0: float | None = None  # the block clock: slot s is due at t0 + s * block_s
        self.idle_announced = False
        self.audio_cursor = 0  # client samples put into blocks so far
        self.started: set[int] = set()
        self.finished: set[int] = set()
        self.played: dict[int, int] = collections.defaultdict(int)
        self.last_block_of: dict[int, _Block] = {}
        self.interrupted = 0
        self.open_interrupts: list[tuple[int, float]] = []  # (epoch, received at)
        self.latency = {"audio_to_fragment": [], "interrupt_to_idle": [], "block_ms": []}
        self.init_segment: bytes | None = None
        self.probe_ms: list[float] = []
        self.steady_ms = 0.0  # the generator's steady block time at this size and steps (0: unknown)
        self.steady_by_size: dict[str, float] = {}  # the same for every size it measured
        self.degraded: avatar_pb2.Degraded | None = None
        self.peers = None  # gateway.replicas.Route: the replicas of this session, once chosen

    # ---- the stream the client gets ----------------------------------------------------------

    async def responses(self):
        t_start = time.perf_counter()
        trace.get_current_span().set_attribute("request_id", self.request_id)
        await self._read_header()
        self.calls, self.tasks = [], []
        try:
            await self._open_mesh()
            await self.header_ready
            yield self._stream_header()
            if self.degraded is not None:
                yield avatar_pb2.ConverseResponse(degraded=self.degraded)
            async with self.cond:  # the client starts playing: slot 2 is due one block from now
                self.t0 = self.loop.time() - (self.config.probe_blocks - 1) * self.block_s
                self.cond.notify_all()
            while (item := await self.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                response, block = item
                yield response
                if block is not None:
                    await self._on_sent(block)
            yield avatar_pb2.ConverseResponse(
                status=avatar_pb2.ConverseStatus(
                    reason=self.stop_reason or "end_of_stream",
                    blocks=self.sent,
                    idle_blocks=self.idle_sent,
                    frames=self.frames,
                    utterances=self.queue.utterances,
                    interrupted=self.interrupted,
                    audio_to_fragment=_summary(self.latency["audio_to_fragment"]),
                    interrupt_to_idle=_summary(self.latency["interrupt_to_idle"]),
                    block_ms=_summary([ms / 1e3 for ms in self.latency["block_ms"]]),
                    total_s=time.perf_counter() - t_start,
                    trace_id=telemetry.current_trace_id(),
                )
            )
        finally:  # client gone, timeout or a failed stage
            await end_session(self.calls, self.tasks, self.peers)

    async def _read_header(self) -> None:
        first = await anext(aiter(self.requests), None)
        if first is None or first.WhichOneof("event") != "header":
            raise InvalidInput("the first ConverseRequest must be the header (audio came before it)")
        self.header = first.header
        if self.header.lora_id:
            trace.get_current_span().set_attribute("lora_id", self.header.lora_id[:80])
        self.job, self.pixels = await run_blocking(
            plan_live_job, self.header, self.gateway.model, self.request_id, self.config
        )
        trace.get_current_span().set_attribute("audio_encoder", self.header.audio_encoder or DEFAULT_AUDIO_ENCODER)
        self.rate = self.header.sample_rate
        self.block_s = FRAMES_PER_BLOCK / self.job.fps
        self.block_n = round(self.block_s * self.rate)
        self.idle_timeout_s = self.header.idle_timeout_s or self.config.idle_timeout_s
        self.queue = SpeechQueue(self.rate)
        self.to_16k = StreamResampler(self.rate, ENCODER_AUDIO_RATE)
        self.to_out = StreamResampler(self.rate, self.job.audio_sample_rate)
        self.last_message_at = self.loop.time()

    async def _open_mesh(self) -> None:
        """Portrait and prompt once, then the three streams of the conversation and their pumps."""
        options = call_options(self.context)
        # The session's replicas (`serve --ray`: chosen now, kept for the whole session)
        g = self.peers = await self.gateway.route(getattr(self.header, "lora_id", ""))
        self.image, self.text = await asyncio.gather(
            g.encoder.EncodeImage(
                encoder_pb2.EncodeImageRequest(job=self.job, pixels=wire.to_proto(self.pixels)), **options
            ),
            g.encoder.EncodeText(encoder_pb2.EncodeTextRequest(job=self.job, prompt=self.header.prompt), **options),
        )
        self.features_in, self.decoder_in = asyncio.Queue(), asyncio.Queue()
        decode_job = type(self.job)()
        decode_job.CopyFrom(self.job)
        decode_job.num_blocks, decode_job.total_frames = 0, 0  # open-ended: the decoder stream
        features = g.encoder.EncodeAudioStream(
            _RequestStream(
                encoder_pb2.AudioStreamInput(job=self.job, audio_encoder=self.header.audio_encoder), self.features_in
            ),
            **options,
        )
        fragments = g.decoder.Decode(
            _RequestStream(
                decoder_pb2.DecoderInput(
                    start=decoder_pb2.DecodeStart(job=decode_job, prime_latent=self.image.ref_latent)
                ),
                self.decoder_in,
            ),
            **options,
        )
        self.calls += [features, fragments]
        self.tasks += [
            asyncio.create_task(self._guarded(c))
            for c in (
                self._read_client(),
                self._decide(),
                self._pump_features(features),
                self._forward(),
                self._pump_fragments(fragments),
            )
        ]
        self._open_generator()

    def _stream_header(self) -> avatar_pb2.ConverseResponse:
        return avatar_pb2.ConverseResponse(
            header=avatar_pb2.ConverseStreamHeader(
                request_id=self.request_id,
                mime_type=mime_type(self.init_segment),
                init_segment=self.init_segment,
                width=self.job.width,
                height=self.job.height,
                fps=self.job.fps,
                frames_per_block=FRAMES_PER_BLOCK,
                sample_steps=self.job.sample_steps,
                model=self.gateway.model.describe(),
                measured_block_ms=round(self._block_ms(), 3),
                block_budget_ms=self.config.block_budget_ms,
            )
        )

    async def _guarded(self, coro):
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised by responses(), mapped to a status
            if not self.header_ready.done():
                self.header_ready.set_exception(exc)
            await self.out.put(exc)

    def _open_generator(self) -> None:
        """One GeneratorService session at job.sample_steps; blocks decided from now on go to it."""
        self.generator_in = asyncio.Queue()
        ready = asyncio.Event()
        call = self.peers.generator.Generate(
            _RequestStream(
                generator_pb2.GeneratorInput(
                    start=generator_pb2.SessionStart(
                        job=self.job,
                        text=self.text.embeddings,
                        ref_latent=self.image.ref_latent,
                        **motion_context(self.image),
                        lora_id=self.header.lora_id,
                    )
                ),
                self.generator_in,
                after_first=ready,
            ),
            **call_options(self.context),
        )
        self.calls.append(call)
        self.tasks.append(asyncio.create_task(self._guarded(self._pump_latents(call, ready))))

    def _degrade(self, measured: float) -> bool:
        """allow_degrade: fewer steps (block time grows with them), in a new generator session
        for the blocks to come. False when even one step would be too slow."""
        steps = self.job.sample_steps
        new = min(steps - 1, int(steps * self.config.block_budget_ms / measured))
        if not self.header.allow_degrade or new < 1:
            return False
        self.degraded = avatar_pb2.Degraded(
            requested_sample_steps=steps,
            sample_steps=new,
            measured_block_ms=round(measured, 3),
            block_budget_ms=self.config.block_budget_ms,
            reason=f"the generator needs {measured:.0f} ms per block at {steps} steps, over the budget of "
            f"{self.config.block_budget_ms:g} ms; running {new} steps",
        )
        self.job.sample_steps = new
        self.calls[-1].cancel()  # the probe's session; its blocks are made and kept
        self._open_generator()
        return True

    def _block_ms(self) -> float:
        """What the guard decides by: the generator's steady block time at this size and steps
        when it has measured one, else the last probe block (the first pays one-time costs)."""
        return self.steady_ms or self.probe_ms[-1]

    def _check_header_ready(self) -> None:
        if self.header_ready.done() or self.init_segment is None or len(self.probe_ms) < self.config.probe_blocks:
            return
        measured, budget = self._block_ms(), self.config.block_budget_ms
        if measured > budget and self.degraded is None and self._degrade(measured):
            self.header_ready.set_result(None)
        elif measured > budget:
            self.header_ready.set_exception(TooSlowForLive(self._too_slow(measured)))
        else:
            self.header_ready.set_result(None)

    def _too_slow(self, measured: float) -> str:
        """The refusal: the numbers, and the largest size this generator measured that keeps up."""
        steps, budget = self.job.sample_steps, self.config.block_budget_ms
        first = ", ".join(f"{m:.0f}" for m in self.probe_ms)
        basis = f"with full caches; its first blocks: {first} ms" if self.steady_ms else f"first blocks: {first} ms"
        fast = [(size, ms) for size, ms in self.steady_by_size.items() if ms <= budget]
        if fast:
            size, ms = max(fast, key=lambda f: math.prod(int(x) for x in f[0].split("*")))
            advice = f"the largest size that keeps up at {steps} steps here: {size} ({ms:.0f} ms per block)"
        elif self.steady_by_size:
            advice = f"no size measured here keeps up at {steps} steps: choose fewer sample_steps"
        else:
            advice = "choose a smaller size or fewer sample_steps"
        return (
            f"the generator needs {measured:.0f} ms per block at {self.job.width}*{self.job.height} with "
            f"{steps} steps ({basis}); a live session needs at most {budget:g} ms per block of "
            f"{self.block_s * 1e3:.0f} ms: {advice}"
        )

    # ---- client -> queue -----------------------------------------------------------------------

    async def _read_client(self):
        max_chunk = round(self.config.max_chunk_s * self.rate)
        max_queued = round(self.config.max_queued_s * self.rate)
        async for msg in self.requests:
            kind = msg.WhichOneof("event")
            self.last_message_at = self.loop.time()
            if self.eos:
                raise InvalidInput(f"a {kind or 'empty message'} came after EndOfStream")
            if kind == "audio":
                data = msg.audio.pcm
                if len(data) % 2:
                    raise InvalidInput(f"an AudioChunk must hold whole 16-bit samples, got {len(data)} bytes")
                if len(data) // 2 > max_chunk:
                    raise InvalidInput(
                        f"an AudioChunk of {len(data) // 2 / self.rate:.2f} s is over the limit of "
                        f"{self.config.max_chunk_s:g} s ({max_chunk * 2} bytes at {self.rate} Hz)"
                    )
                samples = pcm16_to_float(data)
                self.longest_chunk_s = max(self.longest_chunk_s, len(samples) / self.rate)
                async with self.cond:
                    # backpressure: the client's next messages wait in its HTTP/2 window
                    await self.cond.wait_for(lambda: self.queue.samples + len(samples) <= max_queued)
                    self.queue.push(samples, self.loop.time())
                    self.cond.notify_all()
            elif kind == "end_of_utterance":
                async with self.cond:
                    self._end_utterance()
                    self.cond.notify_all()
            elif kind == "interrupt":
                async with self.cond:
                    self._interrupt(self.loop.time())
                    self.cond.notify_all()
            elif kind == "end":
                async with self.cond:
                    self._end_utterance()
                    self.eos = True
                    self.cond.notify_all()
            elif kind == "header":
                raise InvalidInput("the header may come only once, first")
            else:
                raise InvalidInput("an empty ConverseRequest: set header, audio, end_of_utterance, interrupt or end")
        async with self.cond:  # the client closed its side: as EndOfStream
            self._end_utterance()
            self.eos = True
            self.cond.notify_all()

    def _end_utterance(self) -> None:
        u = self.queue.end_utterance()
        if u is None or self.queue.queued_of(u) or u in self.finished:
            return
        # all of it is in blocks already: the last one announces the end
        for b in reversed(self.pending):
            if any(s.utterance == u for s in b.taken.segments):
                b.taken.finished.append(u)
                return
        if u in self.last_block_of:
            self._finish(u, interrupted=False)

    def _interrupt(self, now: float) -> None:
        self.epoch += 1
        self.open_interrupts.append((self.epoch, now))
        cut = set(self.queue.clear())
        cut |= {s.utterance for b in self.pending for s in b.taken.segments}
        cut |= {u for u in self.started if u not in self.finished}
        for u in sorted(cut - self.finished):
            self.interrupted += 1
            self._finish(u, interrupted=True)
        self.starting = True
        self.idle_now = True

    def _finish(self, u: int, interrupted: bool) -> None:
        """UtteranceFinished for u: after the fragment holding its last played sample."""
        self.finished.add(u)
        block = self.last_block_of.get(u)
        if block is None:  # nothing of it played
            pts = self.forwarded * self.block_s
        else:
            seg = [s for s in block.taken.segments if s.utterance == u][-1]
            pts = block.slot * self.block_s + (seg.offset + seg.audio_end - seg.audio_start) / self.rate
        event = avatar_pb2.ConverseResponse(
            utterance_finished=avatar_pb2.UtteranceFinished(
                utterance=u, pts_s=round(pts, 6), played_s=round(self.played[u] / self.rate, 6), interrupted=interrupted
            )
        )
        if block is not None and block in self.in_decoder:
            block.after.append(event)
        else:
            self.out.put_nowait((event, None))

    # ---- queue -> blocks -----------------------------------------------------------------------

    def _live_pending(self) -> int:
        return sum(1 for b in self.pending if b.epoch == self.epoch)

    def _next(self, now: float) -> tuple[str | None, float | None]:
        """What to decide now: ("take", 0): the next block from the queue; ("idle", 0): a silent
        block, the queue left as it is; (None, s): nothing for s seconds (None: until an event)."""
        live = self.forwarded + self._live_pending()
        if live - self.sent >= self.ahead:
            return None, None
        if self.t0 is None:  # before the header: the probe blocks, decided at once
            if self.decided >= self.config.probe_blocks:
                return None, None
            due, deadline = True, now
        else:
            earliest = self.t0 + (live - self.ahead) * self.block_s  # never further ahead of the clock
            if now < earliest:
                return None, earliest - now
            deadline = self.t0 + live * self.block_s  # the video would run dry after this
            # After an interrupt the idle block is wanted now, not when the video runs dry: waiting
            # for the deadline put a random 0-480 ms before it (on an H200 at 384*256: interrupt ->
            # idle p50 503 / p95 723 ms, of which about 300 are the block's own making and sending).
            due = now >= deadline or self.idle_now
        q = self.queue
        if q.samples and (q.front_complete() or self.eos):
            return "take", 0.0
        jitter = round(min(max(self.config.jitter_s, self.longest_chunk_s), 1.0) * self.rate) if self.starting else 0
        if q.samples >= self.block_n + jitter:
            return "take", 0.0
        if due:  # an utterance waits for its jitter buffer; one under way takes what there is
            return ("idle" if self.starting else "take"), 0.0
        wake = deadline - now
        if not q.samples:
            wake = min(wake, max(0.0, self.last_message_at + self.idle_timeout_s - now) + 1e-3)
        return None, wake

    def _stop(self, now: float) -> str | None:
        if self.decided < self.config.probe_blocks or self.queue.samples:
            return None if self.forwarded + self._live_pending() < self.job.num_blocks else "max_duration"
        if self.eos:
            return "end_of_stream"
        if now - self.last_message_at >= self.idle_timeout_s:
            return "idle_timeout"
        if self.forwarded + self._live_pending() >= self.job.num_blocks:
            return "max_duration"
        return None

    async def _decide(self):
        lookahead_n = round(LOOKAHEAD_S * self.rate)
        while True:
            async with self.cond:
                while True:
                    now = self.loop.time()
                    if (reason := self._stop(now)) is not None:
                        self.stop_reason = reason
                        self.cond.notify_all()
                        break
                    what, wait = self._next(now)
                    if what is not None:
                        break
                    try:
                        # Not wait_for: Python 3.11's drops a cancel that comes as the wait ends
                        # (CPython gh-86296), and the session then outlived its client.
                        async with asyncio.timeout(wait):
                            await self.cond.wait()
                    except TimeoutError:
                        pass
                if self.stop_reason is not None:
                    break
                self._keep_time(now, self.forwarded + self._live_pending())
                block = self._take(lookahead_n, idle=what == "idle")
            await self.features_in.put(encoder_pb2.AudioStreamInput(block=block))
        await self.features_in.put(_END)

    def _keep_time(self, now: float, slot: int) -> None:
        """A decision late by more than a quarter block (a slow block, a stalled client): the
        player waited, so does the clock. Less is the timer waking late, a few ms per idle block
        that the player's buffer absorbs: following it too, those ms added up over every idle
        block of a long session, behind real time for good. The clock stays absolute then."""
        if self.t0 is not None and (late := now - (self.t0 + slot * self.block_s)) > self.block_s / 4:
            log.info("session %s: block %d decided %.0f ms late; the clock follows", self.request_id, slot, late * 1e3)
            self.t0 = now - slot * self.block_s

    def _take(self, lookahead_n: int, idle: bool) -> encoder_pb2.AudioStreamBlock:
        self.idle_now = False
        taken = self.queue.take_block(0 if idle else self.block_n)
        if idle:
            taken = TakenBlock(pcm=np.zeros(self.block_n, np.float32))
        ahead = self.queue.peek(lookahead_n)
        if self.queue.open is None and len(ahead) < lookahead_n:  # silence follows for sure
            ahead = np.concatenate([ahead, np.zeros(lookahead_n - len(ahead), np.float32)])
        block = _Block(
            index=self.decided,
            taken=taken,
            epoch=self.epoch,
            decided_ns=time.time_ns(),
            cursor=self.audio_cursor,
            pcm_out=media.to_pcm16(self.to_out.push(taken.pcm)),
        )
        if taken.segments:
            self.audio_cursor = taken.segments[-1].audio_end
        self.pending.append(block)
        self.awaiting_features.append(block)
        self.decided += 1
        # after silence, or when the audio ran dry mid-utterance, speech waits for a jitter buffer again
        self.starting = taken.idle or (
            len(taken.pcm)
            and self.queue.samples == 0
            and self.queue.open is not None
            and taken.segments[-1].audio_end - taken.segments[0].audio_start < self.block_n
        )
        msg = encoder_pb2.AudioStreamBlock(pcm_16k=wire.to_proto(self.to_16k.push(taken.pcm)))
        if len(ahead):
            msg.lookahead_16k.CopyFrom(wire.to_proto(media.resample(ahead, self.rate, ENCODER_AUDIO_RATE)))
        self.cond.notify_all()
        return msg

    # ---- the mesh ------------------------------------------------------------------------------

    async def _pump_features(self, call):
        async for features in call:
            async with self.cond:
                block = self.awaiting_features.popleft()
                block.features = features
                self.featured.append(block)
                self._feed_generator()

    def _feed_generator(self) -> None:
        """Features go to the generator just in time, one block at a time (a TPP group: as many as
        its pipeline holds), so a block decided before an interrupt that has not reached it yet
        is never made: the idle block after an interrupt waits for the block being made at most,
        not for the queue behind it (on an H200 at 384*256: p95 interrupt -> idle 752 ms with
        every decided block queued at the generator)."""
        while self.featured and len(self.at_generator) < self.generator_depth:
            block = self.featured.popleft()
            features, block.features = block.features, None
            if block.epoch != self.epoch:
                block.dropped = True
                self.cond.notify_all()
                continue
            self.at_generator.append(block)
            self.generator_in.put_nowait(generator_pb2.GeneratorInput(audio=features))

    async def _pump_latents(self, call, ready: asyncio.Event):
        """One generator session's blocks, in the order they were sent to it."""
        async for out in call:
            if out.WhichOneof("event") == "ready":
                async with self.cond:
                    depth = max(1, out.ready.pipeline_depth)
                    self.ahead = max(self.ahead, depth)  # a TPP generator needs its depth
                    self.generator_depth = depth
                    self.steady_ms = out.ready.steady_block_ms
                    self.steady_by_size = dict(out.ready.steady_block_ms_by_size)
                    self._feed_generator()
                ready.set()
                continue
            async with self.cond:
                block = self.at_generator.popleft()
                self._feed_generator()
                block.latent, block.dit_ms = out.block.latent, out.block.dit_ms
                self.latency["block_ms"].append(out.block.dit_ms)
                if len(self.probe_ms) < self.config.probe_blocks:
                    self.probe_ms.append(out.block.dit_ms)
                    self._check_header_ready()
                self.cond.notify_all()

    def _forward_ready(self) -> bool:
        if self.pending:
            head = self.pending[0]
            made = head.latent is not None or head.dropped
            return made and (head.epoch != self.epoch or not self.in_decoder)
        return self.stop_reason is not None and not self.in_decoder

    async def _forward(self):
        """Latents to the decoder, one block at a time, so an interrupt can still drop the next."""
        while True:
            async with self.cond:
                await self.cond.wait_for(self._forward_ready)
                if not self.pending:
                    break
                block = self.pending.popleft()
                if block.epoch != self.epoch:  # decided before an interrupt: never shown
                    self.cond.notify_all()
                    continue
                self._place(block)
                self.cond.notify_all()
            await self.decoder_in.put(
                decoder_pb2.DecoderInput(
                    block=decoder_pb2.DecodeBlock(
                        index=block.slot,
                        latent=block.latent,
                        pcm=wire.to_proto(block.pcm_out),
                        keep_frames=FRAMES_PER_BLOCK,
                    )
                )
            )
        await self.decoder_in.put(_END)

    def _place(self, block: _Block) -> None:
        """Gives the block its fragment index and the utterance events that follow it."""
        block.slot = self.forwarded
        self.forwarded += 1
        start = block.slot * self.block_s
        for seg in block.taken.segments:
            u = seg.utterance
            if u not in self.started:
                self.started.add(u)
                block.after.append(
                    avatar_pb2.ConverseResponse(
                        utterance_started=avatar_pb2.UtteranceStarted(
                            utterance=u,
                            pts_s=round(start + seg.offset / self.rate, 6),
                            audio_start_s=round(seg.audio_start / self.rate, 6),
                        )
                    )
                )
            self.played[u] += seg.audio_end - seg.audio_start
            self.last_block_of[u] = block
        if block.taken.idle and not self.idle_announced:
            block.after.append(avatar_pb2.ConverseResponse(idle=avatar_pb2.IdleStarted(pts_s=round(start, 6))))
        self.idle_announced = block.taken.idle
        self.in_decoder.append(block)
        for u in block.taken.finished:
            if u not in self.finished:
                self._finish(u, interrupted=False)

    async def _pump_fragments(self, call):
        async for out in call:
            if out.WhichOneof("event") == "decoded":  # only Generate's first block waits for it
                continue
            if out.WhichOneof("event") == "init_segment":
                self.init_segment = out.init_segment
                async with self.cond:
                    self._check_header_ready()
                continue
            frag = out.fragment
            if frag.num_frames == 0:  # the AAC tail after the last block
                await self.out.put(
                    (
                        avatar_pb2.ConverseResponse(
                            fragment=avatar_pb2.ConverseFragment(
                                index=frag.index,
                                data=frag.data,
                                pts_s=frag.index * self.block_s,
                                idle=True,
                                audio_start_s=self.audio_cursor / self.rate,
                                audio_end_s=self.audio_cursor / self.rate,
                            )
                        ),
                        None,
                    )
                )
                continue
            async with self.cond:  # with the lock: _finish() sees the block either here or queued
                block = self.in_decoder.popleft()
                segs = block.taken.segments
                a0 = segs[0].audio_start if segs else block.cursor
                a1 = segs[-1].audio_end if segs else a0
                self.out.put_nowait(
                    (
                        avatar_pb2.ConverseResponse(
                            fragment=avatar_pb2.ConverseFragment(
                                index=block.slot,
                                data=frag.data,
                                pts_s=round(block.slot * self.block_s, 6),
                                num_frames=frag.num_frames,
                                audio_start_s=a0 / self.rate,
                                audio_end_s=a1 / self.rate,
                                utterance=segs[0].utterance if segs else 0,
                                idle=not segs,
                            )
                        ),
                        block,
                    )
                )
                for event in block.after:
                    self.out.put_nowait((event, None))
                block.after = []
                self.cond.notify_all()
        await self.out.put(_END)

    async def _on_sent(self, block: _Block) -> None:
        now, now_ns = self.loop.time(), time.time_ns()
        idle = block.taken.idle
        if block.taken.received_at is not None:
            self.latency["audio_to_fragment"].append(now - block.taken.received_at)
            metrics.LIVE_AUDIO_TO_FRAGMENT.observe(now - block.taken.received_at)
        while self.open_interrupts and self.open_interrupts[0][0] <= block.epoch:
            _, at = self.open_interrupts.pop(0)
            self.latency["interrupt_to_idle"].append(now - at)
            metrics.LIVE_INTERRUPT_TO_IDLE.observe(now - at)
        metrics.LIVE_BLOCKS.labels(kind="idle" if idle else "speech").inc()
        telemetry.record_span(
            "converse_block",
            block.decided_ns,
            now_ns,
            block=block.slot,
            idle=idle,
            utterance=block.taken.segments[0].utterance if not idle else 0,
            dit_ms=round(block.dit_ms, 3),
        )
        async with self.cond:
            self.sent += 1
            self.idle_sent += idle
            self.frames += FRAMES_PER_BLOCK
            self.cond.notify_all()


async def converse(gateway, request_iterator, context, config: ConverseConfig):
    """AvatarService.Converse: the servicer's method delegates here."""
    session = ConverseSession(gateway, request_iterator, context, config)
    try:
        async for response in session.responses():
            yield response
    except TooSlowForLive as exc:
        import grpc

        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
