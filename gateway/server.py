"""AvatarService: the public gateway. Plans the job, orchestrates the mesh, streams fMP4 back."""

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from avatar import metrics, telemetry, wire
from avatar.gateway import planner
from avatar.grpc_util import PeerError, call_options, create_channel, run_blocking, set_serving
from avatar.presets import FRAMES_PER_BLOCK, ModelSpec, check_lora_id
from avatar.v1 import (
    avatar_pb2,
    avatar_pb2_grpc,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    tensor_pb2,
)

SERVICE_NAME = avatar_pb2.DESCRIPTOR.services_by_name["AvatarService"].full_name
PEERS = ("encoder", "generator", "decoder")
PEER_CHECK_INTERVAL_S = 2.0  # health: how often the gateway checks that its peers are reachable
PEER_CONNECT_TIMEOUT_S = 3.0
log = logging.getLogger(__name__)
_DONE = object()
BLOCKS_AHEAD = 3  # blocks the generator may run ahead of the client (decoding + in flight)
# Block 0's first frames go out as a fragment of their own: the client starts playing them while
# the rest is encoded (x264 + AAC of 4 frames at 704*384: ~36 ms against ~89 for 12 on 2 cores).
FIRST_FRAGMENT_FRAMES = 4


def mime_type(init_segment: bytes) -> str:
    """'video/mp4; codecs="avc1.PPCCLL,mp4a.40.2"' from the avcC box (profile, constraints, level)."""
    at = init_segment.find(b"avcC")
    avc = "avc1." + init_segment[at + 5 : at + 8].hex() if at >= 0 else "avc1"
    return f'video/mp4; codecs="{avc},mp4a.40.2"'


def motion_context(image: encoder_pb2.EncodeImageResponse) -> dict:
    """SessionStart's motion field from an EncodeImage answer: the still latent as it came (one
    frame standing for 19), or the frames of an encoder that predates it."""
    if image.HasField("still_motion_latent"):
        return {"still_motion_latent": image.still_motion_latent}
    return {"motion_latents": image.motion_latents}


async def end_session(calls, tasks, peers) -> None:
    """Ends one session's stages (Generate's and Converse's): cancels its downstream calls (the
    services close their sessions when their stream is cancelled) and its pump tasks, waits for
    the pumps, then releases its peers, also when cancelled again while the pumps end."""
    try:
        for call in calls:
            call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if peers is not None:
            peers.release()


class _RequestStream:
    """The requests of one internal call: a first message, then what arrives on `queue` until
    _DONE. An async iterator rather than an async generator: grpc.aio abandons the iterator
    when a call is cancelled, and an abandoned async generator suspended in `queue.get()` is
    closed by the event loop's finaliser with "aclose(): asynchronous generator is already
    running" errors in the log."""

    def __init__(self, first, queue: asyncio.Queue, after_first: asyncio.Event | None = None):
        self._first, self._queue, self._after_first = first, queue, after_first

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._after_first is not None:
            await self._after_first.wait()
            self._after_first = None
        item = await self._queue.get()
        if item is _DONE:
            raise StopAsyncIteration
        return item


@dataclass
class Timings:
    """Milliseconds per stage, summed over blocks, in the order stages first ran."""

    ms: dict = field(default_factory=lambda: defaultdict(float))
    count: dict = field(default_factory=lambda: defaultdict(int))

    def add(self, stage: str, ms: float) -> None:
        self.ms[stage] += ms
        self.count[stage] += 1

    def to_proto(self) -> list[tensor_pb2.StageTiming]:
        return [tensor_pb2.StageTiming(stage=s, ms=round(ms, 3), count=self.count[s]) for s, ms in self.ms.items()]


class GatewayServicer(avatar_pb2_grpc.AvatarServiceServicer):
    """Calls the encoder, generator and decoder at the given addresses (loopback in `serve --role all`),
    or, given a `router` (gateway.replicas.ReplicaRouter, `serve --ray`), at the replicas it picks
    per session."""

    def __init__(
        self,
        model: ModelSpec,
        encoder: str | None,
        generator: str | None,
        decoder: str | None,
        credentials=None,
        token: str | None = None,
        admission=None,
        max_audio_s: float = planner.media.MAX_AUDIO_S,
        live=None,
        router=None,
    ):
        self.model = model
        self.router = router
        # avatar.admission.Admission for Converse's live sessions; Generate's slot is taken before
        # its request is read (AdmitBeforeReading, the same Admission: app/serve.py)
        self.admission = admission
        if router is not None:
            router.admission = admission  # the gateway's slots follow the replicas' (set_capacity)
        self.peer_addresses = (encoder, generator, decoder)
        self.live = live  # gateway.converse.ConverseConfig for Converse; None: its defaults
        self.max_audio_s = max_audio_s  # longest speech input accepted, seconds
        # credentials/token: TLS and the internal token for the peers (avatar.security)
        addresses = () if router is not None else (encoder, generator, decoder)
        self.channels = [create_channel(a, credentials, token) for a in addresses]
        if router is not None:
            self.encoder = self.generator = self.decoder = None
            return
        self.encoder = encoder_pb2_grpc.EncoderServiceStub(self.channels[0])
        self.generator = generator_pb2_grpc.GeneratorServiceStub(self.channels[1])
        self.decoder = decoder_pb2_grpc.DecoderServiceStub(self.channels[2])

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        if self.router is not None:
            await self.router.close()

    async def route(self, lora_id: str = "", wait_s: float | None = None):
        """The peers of one new session (gateway.replicas.Route); release() it when the session ends.
        Without a router: the fixed peers. `wait_s`: how long the session may wait for a free
        generator slot (its remaining deadline; None: until one frees or the call ends)."""
        from avatar.gateway.replicas import Route

        if self.router is None:
            return Route(self.encoder, self.generator, self.decoder, {})
        return await self.router.route(lora_id, wait_s)

    def watch_peers(self, health, service_name: str = SERVICE_NAME, interval_s: float = PEER_CHECK_INTERVAL_S):
        """Keeps `service_name` NOT_SERVING in `health` while a peer is unreachable (load balancers
        then send requests to a gateway that can serve them), SERVING when all are back; logs
        each change with the reason. Returns an async function that stops the watch."""
        task = asyncio.create_task(self._watch_peers(health, service_name, interval_s))

        async def stop():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        return stop

    async def unreachable_peers(self, timeout_s: float = PEER_CONNECT_TIMEOUT_S) -> list[str]:
        if self.router is not None:  # replicas come and go: a role without any is down
            return [f"{role} (no replica serving)" for role in self.router.missing_roles()]

        async def down(channel) -> bool:
            try:
                async with asyncio.timeout(timeout_s):
                    await channel.channel_ready()
                return False
            except TimeoutError:
                return True

        states = await asyncio.gather(*(down(ch) for ch in self.channels))
        return [f"{name} at {addr}" for name, addr, d in zip(PEERS, self.peer_addresses, states) if d]

    async def _watch_peers(self, health, service_name: str, interval_s: float) -> None:
        serving = True
        while True:
            down = await self.unreachable_peers()
            if down and serving:
                log.warning("gateway NOT_SERVING: cannot connect to %s", ", ".join(down))
            elif not down and not serving:
                log.info("gateway SERVING again: every service behind it is reachable")
            if bool(down) == serving:
                serving = not down
                await set_serving(health, [service_name], serving, whole_server=False)
            await asyncio.sleep(interval_s)

    async def Generate(self, request, context):
        # The session slot is taken before the request is read (avatar.admission.AdmitBeforeReading).
        async with contextlib.aclosing(self._generate(request, context)) as outs:  # cleanup at once, not at GC
            async for out in outs:
                if out.WhichOneof("event") == "status":
                    metrics.observe_final(out.status)
                yield out

    async def Converse(self, request_iterator, context):
        # live sessions: gateway/converse.py owns the flow
        from avatar.gateway.converse import ConverseConfig, converse

        async with self.admission.slot(context) if self.admission else contextlib.nullcontext():
            # Accepted: clients (avatar.live_client) start writing only after this, so a refusal
            # above reaches them as its status, not as a write failing under them ("Internal
            # error from Core" while a large header is still being sent).
            await context.send_initial_metadata(())
            async with contextlib.aclosing(
                converse(self, request_iterator, context, self.live or ConverseConfig())
            ) as outs:
                async for out in outs:
                    yield out

    async def _generate(self, request, context):
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex[:8]
        trace.get_current_span().set_attribute("request_id", request_id)
        if check_lora_id(request.lora_id):
            trace.get_current_span().set_attribute("lora_id", request.lora_id)  # checked: at most 64 chars
        plan = await run_blocking(planner.prepare, request, self.model, request_id, self.max_audio_s)
        job = plan.job

        timings = Timings()
        peers = await self.route(getattr(request, "lora_id", ""), context.time_remaining())  # for the whole stream
        generator_in: asyncio.Queue = asyncio.Queue()
        decoder_in: asyncio.Queue = asyncio.Queue()
        events: asyncio.Queue = asyncio.Queue()
        # Backpressure: audio for block k goes to the generator only once fragment k - AHEAD has
        # been sent, so a fast generator or a slow client never piles blocks up in the mesh.
        # The first block runs alone: on a shared GPU its VAE decode would otherwise compete with
        # the next blocks' DiT work and hold the first fragment back; the rest of the window opens
        # when its frames are decoded (its encoding on the CPU overlaps the next block's DiT), when
        # one audio chunk spans several blocks, or at once for a pipelined generator (TPP), which
        # needs `pipeline_depth` blocks before its first result.
        credits = asyncio.Semaphore(1)
        window_open = False

        def open_window(size: int = BLOCKS_AHEAD):
            nonlocal window_open
            if not window_open:
                window_open = True
                for _ in range(size - 1):
                    credits.release()

        async def pump_audio():
            # Read here, not inside the request iterator, so an encoder error keeps its status code.
            blocks_fed = 0
            waited = 0.0  # time spent waiting for credits is the client's, not the encoder's
            started = time.perf_counter()
            async for features in audio_call:
                blocked = time.perf_counter()
                fed_before = blocks_fed
                while blocks_fed * FRAMES_PER_BLOCK < features.first_frame + features.features.shape[0]:
                    if blocks_fed > fed_before:
                        open_window()  # one chunk spans several blocks: waiting would deadlock
                    await credits.acquire()
                    blocks_fed += 1
                waited += time.perf_counter() - blocked
                await generator_in.put(generator_pb2.GeneratorInput(audio=features))
            timings.add("encode_audio", (time.perf_counter() - started - waited) * 1e3)
            await generator_in.put(_DONE)

        session_ready = asyncio.Event()

        def generator_requests():
            # a refused session must not race our audio writes: audio waits for SessionReady
            return _RequestStream(
                generator_pb2.GeneratorInput(
                    start=generator_pb2.SessionStart(
                        job=job,
                        text=text.embeddings,
                        ref_latent=image.ref_latent,
                        **motion_context(image),
                        lora_id=request.lora_id,
                    )
                ),
                generator_in,
                after_first=session_ready,
            )

        def decoder_requests():
            return _RequestStream(
                decoder_pb2.DecoderInput(
                    start=decoder_pb2.DecodeStart(
                        job=job, prime_latent=image.ref_latent, first_fragment_frames=FIRST_FRAGMENT_FRAMES
                    )
                ),
                decoder_in,
            )

        async def pump_blocks():
            output_audio = None
            try:
                async for out in generator_call:
                    if out.WhichOneof("event") == "ready":
                        if out.ready.pipeline_depth > 1:
                            open_window(max(BLOCKS_AHEAD, out.ready.pipeline_depth))
                        session_ready.set()
                        # The muxer's audio (plan.pcm_out), made while block 0 runs: this loop
                        # is idle then, and it is off the path to the encoders and the session.
                        output_audio = asyncio.ensure_future(run_blocking(lambda: plan.pcm_out))
                        continue
                    if output_audio is not None:
                        await output_audio
                    await forward_block(out.block)
            finally:
                if output_audio is not None:
                    output_audio.cancel()  # a stream that ended before block 0 must not leave it behind
            await decoder_in.put(_DONE)

        async def forward_block(block):
            timings.add("dit_block", block.dit_ms)
            pcm, keep = plan.block_audio(block.index)
            await decoder_in.put(
                decoder_pb2.DecoderInput(
                    block=decoder_pb2.DecodeBlock(
                        index=block.index, latent=block.latent, pcm=wire.to_proto(pcm), keep_frames=keep
                    )
                )
            )

        async def pump_fragments():
            async for out in decoder_call:
                if out.WhichOneof("event") == "decoded":
                    open_window()
                    continue
                await events.put(out)
            await events.put(_DONE)

        async def guarded(coro, peer: str):
            try:
                await coro
            except grpc.aio.AioRpcError as exc:  # the client learns which service failed, not its address
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    peers.unavailable(peer)  # `serve --ray`: no new session to a replica that died
                await events.put(PeerError(peer, exc))
            except Exception as exc:  # noqa: BLE001 - re-raised by the handler, mapped to a status
                await events.put(exc)

        # Three calls stay open for the whole job: audio features stream into the generator while
        # it streams latent blocks out, and each block goes to the decoder with its slice of PCM.
        # The audio encoder starts first, so it overlaps the image and text encoders.
        audio_call = peers.encoder.EncodeAudio(
            encoder_pb2.EncodeAudioRequest(
                job=job, pcm_16k=wire.to_proto(plan.pcm_16k), audio_encoder=request.audio_encoder
            ),
            **call_options(context),
        )
        calls = [audio_call]
        tasks = [asyncio.create_task(guarded(pump_audio(), "encoder"))]
        first_fragment_s = None
        blocks = frames = 0
        part_ms: defaultdict[str, float] = defaultdict(float)  # of the block whose fragments are going out
        try:
            image, text = await asyncio.gather(
                self._timed(
                    timings,
                    "encode_image",
                    peers.encoder.EncodeImage(
                        encoder_pb2.EncodeImageRequest(
                            job=job, pixels=wire.to_proto(plan.pixels), clip_embedding=request.clip_embedding
                        ),
                        **call_options(context),
                    ),
                ),
                self._timed(
                    timings,
                    "encode_text",
                    peers.encoder.EncodeText(
                        encoder_pb2.EncodeTextRequest(job=job, prompt=request.prompt), **call_options(context)
                    ),
                ),
            )
            generator_call = peers.generator.Generate(generator_requests(), **call_options(context))
            decoder_call = peers.decoder.Decode(decoder_requests(), **call_options(context))
            calls += [generator_call, decoder_call]
            tasks += [
                asyncio.create_task(guarded(pump_blocks(), "generator")),
                asyncio.create_task(guarded(pump_fragments(), "decoder")),
            ]

            while (event := await events.get()) is not _DONE:
                if isinstance(event, Exception):
                    raise event
                if event.WhichOneof("event") == "init_segment":
                    # The header waits for the init segment: its MIME type names the H.264
                    # profile and level the encoder chose, and the decoder says whether it sends
                    # block 0 in two fragments (one that predates the split says 0).
                    split = event.first_fragment_frames
                    yield avatar_pb2.GenerateResponse(
                        header=avatar_pb2.StreamHeader(
                            request_id=request_id,
                            mime_type=mime_type(event.init_segment),
                            width=job.width,
                            height=job.height,
                            fps=job.fps,
                            expected_fragments=job.num_blocks + (0 < split < plan.kept_frames(0)),
                            total_frames=job.total_frames,
                            duration_s=plan.duration_s,
                            model=self.model.describe(),
                            job=job,
                            clip_embedding=image.clip_embedding if request.clip_embedding else None,
                        )
                    )
                    yield avatar_pb2.GenerateResponse(init_segment=avatar_pb2.InitSegment(data=event.init_segment))
                    continue
                frag = event.fragment
                sent = time.perf_counter()
                with telemetry.span("send", block=frag.index, bytes=len(frag.data)):
                    yield avatar_pb2.GenerateResponse(
                        fragment=avatar_pb2.MediaFragment(
                            index=frag.index, data=frag.data, first_frame=frames, num_frames=frag.num_frames
                        )
                    )
                # stage times per block, however many fragments it came in
                part_ms["send"] += (time.perf_counter() - sent) * 1e3
                part_ms["vae_decode"] += frag.vae_ms
                part_ms["mux"] += frag.mux_ms
                metrics.count_frames(frag.num_frames)
                frames += frag.num_frames
                if first_fragment_s is None:
                    first_fragment_s = sent - t0
                    open_window()
                if frag.continued:  # the rest of this block comes next (block 0's first frames went first)
                    continue
                for stage in list(part_ms):
                    timings.add(stage, part_ms.pop(stage))
                credits.release()
                blocks += 1
                yield avatar_pb2.GenerateResponse(
                    progress=avatar_pb2.Progress(
                        blocks_done=blocks, blocks_total=job.num_blocks, elapsed_s=time.perf_counter() - t0
                    )
                )
            if blocks != job.num_blocks:
                raise RuntimeError(f"the decoder returned {blocks} of {job.num_blocks} blocks")
            yield avatar_pb2.GenerateResponse(
                status=avatar_pb2.FinalStatus(
                    blocks=blocks,
                    frames=frames,
                    time_to_first_fragment_s=first_fragment_s or 0.0,
                    total_s=time.perf_counter() - t0,
                    timings=timings.to_proto(),
                    trace_id=telemetry.current_trace_id(),
                    audio_duration_s=plan.audio_duration_s,
                    truncation=plan.truncation,
                )
            )
        finally:
            await end_session(calls, tasks, peers)

    @staticmethod
    async def _timed(timings: Timings, stage: str, call):
        started = time.perf_counter()
        try:
            result = await call
        except grpc.aio.AioRpcError as exc:
            raise PeerError("encoder", exc) from None
        timings.add(stage, (time.perf_counter() - started) * 1e3)
        return result
