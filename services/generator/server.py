"""GeneratorService: thin grpc.aio servicer over GeneratorEngine; one bidi stream = one session."""

import asyncio
import collections
import contextlib
import time

import torch
from opentelemetry import trace

from avatar import job_limits, telemetry, wire
from avatar.errors import InvalidInput
from avatar.grpc_util import run_blocking
from avatar.jobs import Job
from avatar.services.generator import avatar_loras
from avatar.services.generator.protocols import BlockGenerator, BlockSession
from avatar.v1 import generator_pb2, generator_pb2_grpc

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, engine: BlockGenerator, admission=None):
        self.engine = engine
        self.admission = admission  # avatar.admission.Admission: cap on sessions + bounded queue

    async def Generate(self, request_iterator, context):
        async with self.admission.slot(context) if self.admission else contextlib.nullcontext():
            async with contextlib.aclosing(
                self._generate(request_iterator, context)
            ) as outs:  # cleanup at once, not at GC
                async for out in outs:
                    yield out

    async def _generate(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("event") != "start":
            raise InvalidInput("the first GeneratorInput must be a SessionStart")
        start = first.start
        job = Job.from_proto(start.job)
        job_limits.check_job(job, sampling=True)  # reachable from the cluster: no unbounded session
        block_frames = job.frames_per_block
        lora = _lora_kwargs(self.engine, start.lora_id)
        with telemetry.span("open_session", width=job.width, height=job.height) as span:
            session = await run_blocking(
                self.engine.open_session,
                job,
                wire.tensor_arg(start.text, "text"),
                wire.tensor_arg(start.ref_latent, "ref_latent"),
                _motion_latents(start, self.engine),
                **lora,
            )
            graphs = getattr(session, "graphs", None)  # a kept session's: captured already
            span.set_attribute("graphs", graphs.num_graphs if graphs is not None else 0)
            span.set_attribute("sink_kept", bool(getattr(session, "sink_restored", False)))
            for stage, ms in getattr(session, "open_ms", {}).items():  # admit_ms, inputs_ms, sink_ms
                span.set_attribute(stage, ms)
        blocks = _InFlight(self, session, job, start.lora_id)
        try:
            # Ready before the caller sends audio: a refusal above reaches it as a clean status
            # (a status that races the caller's writes comes out as INTERNAL in grpc.aio).
            yield generator_pb2.GeneratorOutput(ready=_ready(self.engine, session, blocks.depth))
            pending: list[torch.Tensor] = []  # audio frames received but not yet used by a block
            have = 0
            index = 0
            async for msg in request_iterator:
                if msg.WhichOneof("event") != "audio":
                    raise InvalidInput("only AudioFeatures may follow the SessionStart")
                feats = wire.tensor_arg(msg.audio.features, "audio features")
                if feats.ndim != 3:
                    raise InvalidInput(f"audio features must be [frames, layers, dim], got {list(feats.shape)}")
                have += feats.shape[0]
                if index * block_frames + have > job.num_blocks * block_frames:
                    raise InvalidInput(
                        f"more audio features than the job's {job.num_blocks} blocks of {block_frames} frames"
                    )
                pending.append(feats)
                while have >= block_frames and index < job.num_blocks:
                    audio = torch.cat(pending)
                    pending, have = [audio[block_frames:]], have - block_frames
                    for out in await blocks.push(index, audio[:block_frames]):
                        yield out
                    index += 1
            # The audio stream ended early: the remaining blocks get silent (zero) features.
            if index < job.num_blocks and not pending:
                raise InvalidInput("no audio features arrived before the stream ended")
            while index < job.num_blocks:
                audio = torch.cat(pending)[:block_frames]
                pad = audio.new_zeros((block_frames - audio.shape[0], *audio.shape[1:]))
                pending = [audio.new_zeros((0, *audio.shape[1:]))]
                for out in await blocks.push(index, torch.cat([audio, pad])):
                    yield out
                index += 1
            for out in await blocks.drain():
                yield out
        finally:
            await run_blocking(session.close)

    async def Loras(self, request, context) -> generator_pb2.LorasReply:
        st = avatar_loras.status(getattr(self.engine, "loras", None))
        return generator_pb2.LorasReply(
            registered=st.registered,
            loaded=st.loaded,
            max_loras=st.max_loras,
            in_use=st.in_use,
            loads=st.loads,
            evictions=st.evictions,
        )

    async def _block(
        self, session: BlockSession, job: Job, index: int, audio: torch.Tensor, lora_id: str = ""
    ) -> generator_pb2.GeneratorOutput:
        with telemetry.span("dit_block", block=index, steps=job.sample_steps, lora_id=lora_id):
            t0 = time.perf_counter()
            latent = await run_blocking(session.generate_block, audio)
            dit_ms = (time.perf_counter() - t0) * 1e3
        return generator_pb2.GeneratorOutput(
            block=generator_pb2.LatentBlock(index=index, latent=wire.to_proto(latent), dit_ms=dit_ms)
        )


def _ready(engine: BlockGenerator, session: BlockSession, depth: int) -> generator_pb2.SessionReady:
    """The session is open; with the steady block times this engine measured (an engine that
    keeps none, such as the multi-GPU one, reports none: the guard then reads the first blocks)."""
    ready = generator_pb2.SessionReady(kv_cache_bytes=session.kv_cache_bytes, pipeline_depth=depth)
    times = getattr(engine, "block_times", None)
    if times is not None and hasattr(session, "steady_block_ms"):
        ready.steady_block_ms = session.steady_block_ms() or 0.0
        ready.steady_block_ms_by_size.update(times.by_size(session.plan.forwards_per_block))
    return ready


def _motion_latents(start: generator_pb2.SessionStart, engine: BlockGenerator) -> torch.Tensor:
    """The session's motion context [16, T, h, w]: motion_latents as sent, or the still latent
    repeated to the model's motion frames (a view: nothing is copied on the host)."""
    still, frames = start.HasField("still_motion_latent"), start.HasField("motion_latents")
    if still == frames:
        raise InvalidInput(
            "SessionStart needs exactly one of motion_latents and still_motion_latent, "
            f"got {'both' if still else 'neither'}"
        )
    if frames:
        return wire.tensor_arg(start.motion_latents, "motion_latents")
    latent = wire.tensor_arg(start.still_motion_latent, "still_motion_latent")
    if latent.ndim != 4 or latent.shape[1] != 1:
        raise InvalidInput(f"still_motion_latent must be one latent frame [16, 1, h, w], got {list(latent.shape)}")
    return latent.expand(-1, engine.dit.motion_latent_frames, -1, -1)


def _lora_kwargs(engine: BlockGenerator, lora_id: str) -> dict:
    """open_session's lora_id when the request names one (an engine without avatar LoRAs, such as
    the multi-GPU one, refuses it here); {} keeps the call as it was without."""
    if not lora_id:
        return {}
    trace.get_current_span().set_attribute("lora_id", lora_id[:80])
    if getattr(engine, "loras", None) is None:
        raise InvalidInput(f"lora_id {lora_id[:80]!r}: {avatar_loras.NOT_SERVED}")
    return {"lora_id": lora_id}


class _InFlight:
    """Blocks of one stream in order. A GeneratorSession runs one block at a time; a session with
    `pipeline_depth` > 1 (the multi-GPU TPP generator) takes up to that many blocks before the
    first comes back, so blocks overlap across its ranks."""

    def __init__(self, servicer: GeneratorServicer, session: BlockSession, job: Job, lora_id: str = ""):
        self.servicer, self.session, self.job, self.lora_id = servicer, session, job, lora_id
        self.depth = session.pipeline_depth
        self.queue: collections.deque = collections.deque()

    async def push(self, index: int, audio: torch.Tensor) -> list[generator_pb2.GeneratorOutput]:
        if self.depth <= 1:
            return [await self.servicer._block(self.session, self.job, index, audio, self.lora_id)]
        self.queue.append((index, time.perf_counter(), asyncio.wrap_future(self.session.submit(audio))))
        return await self._take(self.depth - 1)

    async def drain(self) -> list[generator_pb2.GeneratorOutput]:
        return await self._take(0)

    async def _take(self, keep: int) -> list[generator_pb2.GeneratorOutput]:
        outs = []
        while self.queue and (len(self.queue) > keep or self.queue[0][2].done()):
            index, t0, fut = self.queue.popleft()
            with telemetry.span(
                "dit_block", block=index, steps=self.job.sample_steps, pipelined=True, lora_id=self.lora_id
            ):
                latent = await fut
            outs.append(
                generator_pb2.GeneratorOutput(
                    block=generator_pb2.LatentBlock(
                        index=index, latent=wire.to_proto(latent), dit_ms=(time.perf_counter() - t0) * 1e3
                    )
                )
            )
        return outs
