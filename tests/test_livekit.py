"""The LiveKit Agents VideoGenerator over Converse, against a real `avatar serve` on loopback (tiny
model): fed with rtc.AudioFrames of the sample speech it yields 25 fps video with the same audio
and an AudioSegmentEnd; driven by LiveKit's own AvatarRunner, barge-in and the playback
notifications work as an agent expects. No LiveKit server: the room is the only stand-in."""

import asyncio
import json
import subprocess
import time

import grpc
import numpy as np
import pytest
import soundfile
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, QueueAudioOutput

from avatar import grpc_util, media
from avatar.app.cli import main
from avatar.integrations.livekit import ConverseVideoGenerator
from avatar.v1 import avatar_pb2
from tests.conftest import ASSETS, AVATAR, ROOT, Services, free_port

pytestmark = pytest.mark.mesh

IMAGE = (ASSETS / "astronaut.png").read_bytes()
SPEECH_RATE = 16000  # assets/speech.wav
FRAME_MS = 100  # what DataStreamAudioReceiver hands the runner


def header(rate: int, **kw) -> avatar_pb2.ConverseHeader:
    return avatar_pb2.ConverseHeader(**{"image": IMAGE, "size": "64*64", "sample_steps": 2, "sample_rate": rate, **kw})


def speech(start_s: float, length_s: float) -> np.ndarray:
    pcm, rate = soundfile.read(str(ASSETS / "speech.wav"), dtype="int16")
    assert rate == SPEECH_RATE
    return pcm[round(start_s * rate) : round((start_s + length_s) * rate)]


def audio_frames(pcm: np.ndarray, rate: int = SPEECH_RATE, channels: int = 1) -> list[rtc.AudioFrame]:
    """Frames of FRAME_MS; pcm is interleaved when channels > 1."""
    n = rate * FRAME_MS // 1000 * channels
    return [
        rtc.AudioFrame(pcm[i : i + n].tobytes(), rate, channels, len(pcm[i : i + n]) // channels)
        for i in range(0, len(pcm), n)
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory, env):
    services = Services(tmp_path_factory.mktemp("livekit"), env)
    try:
        # a generous block budget: the real-time guard is tested elsewhere (test_converse.py), and
        # a busy CI machine must not make these sessions refused
        yield services.start("all", "--live-idle-timeout-s", "30", "--live-block-budget-ms", "5000", trace=True)
    finally:
        services.stop_all()


class Recorded(ConverseVideoGenerator):
    """The generator, keeping (time.monotonic(), item) of everything it yields and the times of
    clear_buffer() calls."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.items, self.cleared_at = [], []

    async def clear_buffer(self):
        self.cleared_at.append(time.monotonic())
        await super().clear_buffer()

    async def _frames(self):
        async for item in super()._frames():
            self.items.append((time.monotonic(), item))
            yield item

    def of(self, kind):
        return [x for _, x in self.items if isinstance(x, kind)]


async def consume(gen):
    async for _ in gen:
        pass


def test_speech_frames_become_25_fps_video_with_the_same_audio(server):
    pcm = speech(0.5, 3.0)
    rate = 24000  # session rate: the 16 kHz frames are resampled on the way in

    async def main():
        async with grpc_util.create_channel(server.address) as channel:
            gen = Recorded(channel, header(rate))
            h = await gen.start()
            opts = gen.options()
            assert (opts.video_width, opts.video_height, opts.video_fps) == (h.width, h.height, 25)
            assert (opts.audio_sample_rate, opts.audio_channels) == (rate, 1)
            reader = asyncio.create_task(consume(gen))
            pushed_at = time.monotonic()
            for frame in audio_frames(pcm):  # faster than real time, as a TTS does
                await gen.push_audio(frame)
            await gen.push_audio(AudioSegmentEnd())
            while not gen.of(AudioSegmentEnd) and not reader.done():  # it plays in real time
                await asyncio.sleep(0.05)
            # then idles: wait for the rest of its last block and one idle block (not a fixed time:
            # a loaded machine makes blocks slower than real time)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not reader.done():
                items = [x for _, x in gen.items]
                end = next((i for i, x in enumerate(items) if isinstance(x, AudioSegmentEnd)), len(items))
                if sum(isinstance(x, rtc.VideoFrame) for x in items[end:]) >= 12 + 9:
                    break
                await asyncio.sleep(0.05)
            await gen.end()
            await asyncio.wait_for(reader, 60)
            return gen, pushed_at

    gen, pushed_at = asyncio.run(main())
    h, status = gen.stream_header, gen.status
    items = [x for _, x in gen.items]
    video = gen.of(rtc.VideoFrame)
    audio = gen.of(rtc.AudioFrame)
    # video: every frame of every block, at the session's size, 25 per second of the stream
    assert status is not None and status.reason == "end_of_stream" and status.utterances == 1
    assert len(video) == status.frames == 12 * status.blocks
    assert all((v.width, v.height, len(v.data)) == (h.width, h.height, h.width * h.height * 4) for v in video)
    assert len({bytes(v.data) for v in video}) > 1  # decoded pictures, not one repeated frame
    # audio: the speech once, at the session rate, as much as was pushed (resampling keeps the length)
    out = np.concatenate([np.frombuffer(a.data, np.int16) for a in audio])
    assert all(a.sample_rate == rate and a.num_channels == 1 for a in audio)
    assert abs(len(out) / rate - 3.0) < 0.005
    ref = media.resample(pcm.astype(np.float32) / 32768, SPEECH_RATE, rate)
    n = min(len(out), len(ref))
    corr = float(np.dot(out[:n], ref[:n]) / (np.linalg.norm(out[:n]) * np.linalg.norm(ref[:n])))
    assert corr > 0.99, corr
    # the audio plays with its video: each video frame is followed by at most its 40 ms of audio
    speaking, per_video = 0, 0
    for x in items:
        if isinstance(x, rtc.VideoFrame):
            speaking += per_video > 0
            per_video = 0
        elif isinstance(x, rtc.AudioFrame):
            per_video += x.samples_per_channel
            assert per_video <= rate // 25
    speaking += per_video > 0
    assert speaking == int(np.ceil(len(out) / (rate // 25)))  # 75 frames = 3.0 s at 25 fps
    # the stream covers the speech plus the idle blocks around it: 25 fps of stream time
    assert len(video) / 25 >= 3.0 + 0.48 and status.idle_blocks >= 1
    # one AudioSegmentEnd, right after the utterance's last sample, then idle video only
    ends = [i for i, x in enumerate(items) if isinstance(x, AudioSegmentEnd)]
    last_audio = max(i for i, x in enumerate(items) if isinstance(x, rtc.AudioFrame))
    assert ends == [last_audio + 1]
    assert sum(isinstance(x, rtc.VideoFrame) for x in items[ends[0] :]) >= 12 + 9  # its last block's rest, idle
    # latency: audio pushed -> the first video frame that plays it (printed for docs/clients.md)
    first_speech_video = next(
        t
        for (t, x), (_, y) in zip(gen.items, gen.items[1:])
        if isinstance(x, rtc.VideoFrame) and isinstance(y, rtc.AudioFrame)
    )
    print(f"\nlivekit: audio pushed -> first speaking video frame {1000 * (first_speech_video - pushed_at):.0f} ms")


def test_an_utterance_ended_after_it_played_ends_at_once(server):
    """A TTS may close its segment only after all its audio played (the session rendered the last
    partial block when the video would have run dry): the AudioSegmentEnd must follow at once,
    not wait for the next utterance."""
    pcm = speech(0.5, 1.0)  # two blocks and 40 ms

    async def main():
        async with grpc_util.create_channel(server.address) as channel:
            gen = Recorded(channel, header(SPEECH_RATE))
            await gen.start()
            reader = asyncio.create_task(consume(gen))
            for frame in audio_frames(pcm):
                await gen.push_audio(frame)
            deadline = time.monotonic() + 60
            while sum(a.duration for a in gen.of(rtc.AudioFrame)) < 1.0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not gen.of(AudioSegmentEnd)
            await asyncio.sleep(0.5)
            ended_at = time.monotonic()
            await gen.push_audio(AudioSegmentEnd())
            while not gen.of(AudioSegmentEnd) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await gen.aclose()
            await asyncio.wait_for(reader, 30)
            return gen, ended_at

    gen, ended_at = asyncio.run(main())
    assert abs(sum(a.duration for a in gen.of(rtc.AudioFrame)) - 1.0) < 1e-6
    (end_at,) = [t for t, x in gen.items if isinstance(x, AudioSegmentEnd)]
    assert end_at - ended_at < 5.0  # with the next message of the session, not with the next speech


class OfflineRoom(rtc.EventEmitter):
    """The part of a connected rtc.Room that AvatarRunner uses, with nowhere to publish to (no
    LiveKit server here): the tracks are kept, their sources are LiveKit's real ones."""

    def __init__(self):
        super().__init__()
        self.local_participant = self
        self.tracks = []

    def isconnected(self) -> bool:
        return True

    async def publish_track(self, track, options):
        self.tracks.append(track)
        return self

    async def wait_for_subscription(self):
        return None


def test_avatar_runner_barge_in_and_playback_notifications(server):
    rate = 16000
    first, second = speech(0.5, 4.0), speech(5.0, 1.0)

    async def main():
        async with grpc_util.create_channel(server.address) as channel:
            gen = Recorded(channel, header(rate))
            await gen.start()
            # the agent's side in the same process: LiveKit's queue between AudioOutput and runner
            agent_out = QueueAudioOutput(sample_rate=rate)
            finished = []
            agent_out.on("playback_finished", finished.append)
            room = OfflineRoom()
            runner = AvatarRunner(room, audio_recv=agent_out, video_gen=gen, options=gen.options())
            await runner.start()
            for frame in audio_frames(first):  # faster than real time, as a TTS does
                await agent_out.capture_frame(frame)
            deadline = time.monotonic() + 30
            while sum(a.duration for a in gen.of(rtc.AudioFrame)) < 1.5 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # barge-in once 1.5 s of it played
            agent_out.clear_buffer()  # the user spoke: LiveKit's barge-in, then the
            agent_out.flush()  # segment's end, as the agent's audio forwarding does when cut
            # a pause: wait for an idle block after the barge-in (not a fixed time: a loaded machine
            # makes blocks slower than real time)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                after = [x for t, x in gen.items if gen.cleared_at and t > gen.cleared_at[0]]
                if sum(isinstance(x, rtc.VideoFrame) for x in after) >= 12:
                    break
                await asyncio.sleep(0.05)
            for frame in audio_frames(np.repeat(second, 2), channels=2):  # stereo this time: mixed down to mono
                await agent_out.capture_frame(frame)
            agent_out.flush()
            deadline = time.monotonic() + 30
            while len(finished) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await gen.end()
            while gen.status is None and time.monotonic() < deadline:  # the runner plays the rest
                await asyncio.sleep(0.1)
            await runner.aclose()
            return gen, finished, room

    gen, finished, room = asyncio.run(main())
    assert [t.name for t in room.tracks] == ["avatar_audio", "avatar_video"]
    # barge-in: the runner cleared the generator, no audio of the first utterance played after it
    assert len(gen.cleared_at) == 1
    played_first = sum(a.duration for a in gen.of(rtc.AudioFrame)) - 1.0
    after = [x for t, x in gen.items if t > gen.cleared_at[0]]
    assert all(a.samples_per_channel for a in gen.of(rtc.AudioFrame))  # not even an empty frame of the cut one
    second_starts = next(i for i, x in enumerate(after) if isinstance(x, rtc.AudioFrame))
    assert sum(isinstance(x, rtc.VideoFrame) for x in after[:second_starts]) >= 12  # idle blocks in between
    # the agent heard: the first utterance interrupted where it stopped, the second played whole
    assert [e.interrupted for e in finished] == [True, False]
    # at the barge-in 1.5 s had been yielded; the runner counts a frame once it is pushed (40 ms)
    assert 1.5 - 0.04 - 1e-6 <= finished[0].playback_position < 4.0
    assert abs(finished[0].playback_position - played_first) < 0.05
    # (AvatarRunner may count the audio frame in flight at the barge-in into the next segment)
    assert abs(finished[1].playback_position - 1.0) <= 0.04 + 1e-6
    s = gen.status
    assert s.utterances == 2 and s.interrupted == 1 and s.interrupt_to_idle.count == 1


def test_bad_input(server):
    async def main():
        with pytest.raises(ValueError, match="sample_rate must be 16000 or 24000"):
            ConverseVideoGenerator(None, header(44100))
        async with grpc_util.create_channel(server.address) as channel:
            gen = ConverseVideoGenerator(channel, header(16000))
            with pytest.raises(RuntimeError, match="start"):
                await gen.push_audio(audio_frames(speech(0, 0.1))[0])
            # a header the session refuses: the server's reason
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ConverseVideoGenerator(channel, header(16000, sample_steps=99)).start()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sample_steps" in err.value.details()
            await gen.start()
            with pytest.raises(TypeError, match="rtc.AudioFrame or AudioSegmentEnd"):
                await gen.push_audio(speech(0, 0.1).tobytes())
            with pytest.raises(ValueError, match="bad audio frame"):
                await gen.push_audio(rtc.AudioFrame(bytes(320), 0, 1, 160))
            await gen.push_audio(audio_frames(speech(0, 0.1))[0])  # still usable after the bad ones
            await gen.aclose()
            with pytest.raises(RuntimeError, match="closed"):
                await gen.push_audio(audio_frames(speech(0, 0.1))[0])
            async for _ in gen:  # iteration ends quietly after aclose
                pass

    asyncio.run(asyncio.wait_for(main(), 120))


def worker(*args: str, env: dict, **env_vars) -> subprocess.CompletedProcess:
    """`avatar livekit-worker` as a user runs it, with exactly the LiveKit variables given."""
    e = {k: v for k, v in env.items() if not k.startswith("LIVEKIT_")} | env_vars
    cmd = [*AVATAR, "livekit-worker", "--room", "demo", "--image", str(ASSETS / "astronaut.png"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)


def test_worker_bad_input_is_one_line_and_exit_code_2(server, env, tmp_path, monkeypatch, capsys):
    creds = dict(LIVEKIT_API_KEY="devkey", LIVEKIT_API_SECRET="secret-of-at-least-32-characters!")
    url = dict(LIVEKIT_URL="ws://127.0.0.1:7880")
    mesh = ["--server", server.address, "--size", "64*64"]
    image = ["--room", "demo", "--image", str(ASSETS / "astronaut.png")]
    for args, env_vars, why in [
        ((), creds, "LIVEKIT_URL"),
        (("--livekit-url", "ftp://example.com"), creds, "ws://"),
        ((), url, "LIVEKIT_API_KEY"),
        (("--sample-rate", "44100"), creds | url, "16000 or 24000"),
        (("--room", " "), creds | url, "--room"),
        (("--image", str(tmp_path / "missing.png")), creds | url, "missing.png"),
        (("--sample_steps", "99"), creds | url, "sample_steps"),  # the session's own reason
    ]:
        for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "LIVEKIT_TOKEN"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env_vars.items():
            monkeypatch.setenv(k, v)
        assert main(["livekit-worker", *image, *args, *mesh]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err and err.startswith("avatar livekit-worker: error:"), err
    # the installed command, as a user runs it
    r = worker(env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "LIVEKIT_URL" in r.stderr, r.stderr
    r = worker("--help", env=env)
    assert r.returncode == 0 and "DataStreamAudioOutput" in r.stdout and "LIVEKIT_API_KEY" in r.stdout


def test_worker_without_a_livekit_server_says_so(server, env, tmp_path):
    """No LiveKit server can run here: the worker starts its session, cannot join, and says why."""
    port = free_port()  # nothing listens there
    trace = tmp_path / "worker.trace.jsonl"
    r = worker(
        "--trace-file",
        str(trace),
        "--server",
        server.address,
        "--size",
        "64*64",
        "--sample_steps",
        "2",
        env=env,
        LIVEKIT_URL=f"ws://127.0.0.1:{port}",
        LIVEKIT_API_KEY="devkey",
        LIVEKIT_API_SECRET="secret-of-at-least-32-characters!",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    # one line says why (LiveKit's own log lines about the attempts come around it)
    said = [line for line in r.stderr.splitlines() if line.startswith("avatar livekit-worker:")]
    assert len(said) == 1 and said[0].startswith(
        f"avatar livekit-worker: cannot join room 'demo' at ws://127.0.0.1:{port}"
    )
    # its span says which room and which session (the session's trace on the mesh hangs below it)
    (span,) = [x for x in map(json.loads, trace.read_text().splitlines()) if x["name"] == "livekit_worker"]
    a = span["attributes"]
    assert a["room"] == "demo" and a["identity"] == "avatar-mesh" and a["request_id"] and a["joined"] is False
    deadline = time.monotonic() + 20  # the session's span ends once the server saw the call end
    while not any(x["trace_id"] == span["trace_id"] for x in server.spans()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any(x["trace_id"] == span["trace_id"] for x in server.spans())
