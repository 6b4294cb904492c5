"""HTTP jobs: `POST /v1/jobs` starts a Generate call, `GET /v1/jobs/{id}/video.mp4` streams its fMP4.

The video is sent with chunked transfer from the init segment on while the job still runs, so
`ffplay URL`, VLC or `<video src=URL>` play it before it ends; any number of readers may read a
job, each from the start. Jobs live in memory, bounded: at most `max_jobs`, at most
`max_bytes` of video over all of them (the oldest finished jobs are forgotten first), and a
finished job is forgotten `ttl_s` after it ended.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from google.protobuf import json_format

from avatar.client import GenerateError
from avatar.gateway.web.app import grpc_error_response, json_error
from avatar.gateway.web.metrics import BYTES_STREAMED
from avatar.grpc_util import PUBLIC_MAX_REQUEST_BYTES
from avatar.v1 import avatar_pb2

log = logging.getLogger("avatar.gateway.web")

START_WAIT_S = 5.0  # POST waits this long for the first fragment, so early refusals keep their status
VIDEO_ROUTE = "/v1/jobs/{id}/video.mp4"
FILE_FIELDS = ("image", "audio")
TEXT_FIELDS = ("prompt", "preset", "size")
INT_FIELDS = {"sample_steps": "sample_steps", "steps": "sample_steps", "seed": "seed", "num_clip": "num_clip"}


class BadForm(ValueError):
    """The multipart form is unusable: 400 with the reason."""


@dataclass
class Job:
    id: str
    created: float = field(default_factory=time.time)
    state: str = "queued"  # queued -> running -> done | failed
    chunks: list[bytes] = field(default_factory=list)  # init segment, then each fragment
    bytes: int = 0
    fragments: int = 0
    header: dict | None = None
    status: dict | None = None
    error: GenerateError | None = None
    ended_at: float | None = None
    task: asyncio.Task | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)  # first bytes, or the end
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.state in ("queued", "running")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def append(self, data: bytes) -> None:
        self.chunks.append(data)
        self.bytes += len(data)
        self.state = "running"
        self.started.set()
        self._notify()

    def finish(self, error: GenerateError | None = None) -> None:
        if not self.running:
            return
        self.state, self.error, self.ended_at = ("failed" if error else "done"), error, time.time()
        self.started.set()
        self._notify()

    async def read(self):
        """Every chunk from the first, waiting for new ones while the job runs."""
        i = 0
        while True:
            changed = self._changed
            while i < len(self.chunks):
                yield self.chunks[i]
                i += 1
            if not self.running:
                return
            await changed.wait()

    def describe(self) -> dict:
        out = {
            "id": self.id,
            "state": self.state,
            "created": self.created,
            "fragments": self.fragments,
            "bytes": self.bytes,
            "url": f"/v1/jobs/{self.id}/video.mp4",
        }
        if self.header:
            out["header"] = self.header
        if self.status:
            out["status"] = self.status
        if self.error is not None:
            out["error"] = {"code": self.error.code.name, "reason": self.error.details}
        return out


class JobStore:
    def __init__(self, max_jobs: int, max_bytes: int, ttl_s: float):
        self.max_jobs, self.max_bytes, self.ttl_s = max_jobs, max_bytes, ttl_s
        self.jobs: dict[str, Job] = {}

    def _forget_expired(self) -> None:
        now = time.time()
        for job in list(self.jobs.values()):
            if job.ended_at is not None and now - job.ended_at > self.ttl_s:
                del self.jobs[job.id]

    def _make_room(self, needed_bytes: int = 0, needed_jobs: int = 0) -> bool:
        """Forgets the oldest finished jobs until there is room; False if running jobs fill it."""
        self._forget_expired()
        finished = sorted((j for j in self.jobs.values() if not j.running), key=lambda j: j.ended_at)
        while (
            len(self.jobs) + needed_jobs > self.max_jobs or self.total_bytes + needed_bytes > self.max_bytes
        ) and finished:
            del self.jobs[finished.pop(0).id]
        return len(self.jobs) + needed_jobs <= self.max_jobs and self.total_bytes + needed_bytes <= self.max_bytes

    @property
    def total_bytes(self) -> int:
        return sum(j.bytes for j in self.jobs.values())

    def get(self, job_id: str) -> Job | None:
        self._forget_expired()
        return self.jobs.get(job_id)

    def start(self, client, request: avatar_pb2.GenerateRequest) -> Job | None:
        """A new job running `request` through `client`, or None when the store is full of running jobs."""
        if not self._make_room(needed_jobs=1):
            return None
        job = Job(secrets.token_urlsafe(12))
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, client, request))
        return job

    async def _run(self, job: Job, client, request: avatar_pb2.GenerateRequest) -> None:
        try:
            async for msg in client.generate(request, span_name="avatar.web job"):
                kind = msg.WhichOneof("event")
                if kind == "header":
                    fields = json_format.MessageToDict(msg.header, preserving_proto_field_name=True)
                    fields.pop("clip_embedding", None)
                    job.header = fields
                elif kind in ("init_segment", "fragment"):
                    data = getattr(msg, kind).data
                    if not self._make_room(needed_bytes=len(data)):
                        raise GenerateError(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the web front keeps at most {self.max_bytes >> 20} MiB of job video; "
                            "this job outgrew what is left",
                        )
                    job.fragments += kind == "fragment"
                    job.append(data)
                elif kind == "status":
                    job.status = json_format.MessageToDict(msg.status, preserving_proto_field_name=True)
            job.finish()
        except GenerateError as exc:
            job.finish(exc)
        except Exception:  # a bug must not leave the job "running" for its readers forever
            log.exception("web job %s failed", job.id)
            job.finish(GenerateError(grpc.StatusCode.INTERNAL, "the job failed (see the server log)"))
        except asyncio.CancelledError:
            job.finish(GenerateError(grpc.StatusCode.CANCELLED, "the job was cancelled"))
            raise

    async def close(self) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the form --------------------------------------------------------------------------------


async def read_form(request: web.Request) -> avatar_pb2.GenerateRequest:
    """The multipart form of POST /v1/jobs as a GenerateRequest; BadForm says what is wrong."""
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:  # aiohttp's checks of the Content-Type
        raise BadForm(f"send multipart/form-data with the fields image and audio ({exc})") from None
    fields: dict[str, bytes] = {}
    left = PUBLIC_MAX_REQUEST_BYTES
    try:
        while (part := await reader.next()) is not None:
            name = part.name or ""
            if name not in (*FILE_FIELDS, *TEXT_FIELDS, *INT_FIELDS):
                raise BadForm(
                    f"unknown form field {name!r}: expected {', '.join((*FILE_FIELDS, *TEXT_FIELDS, *INT_FIELDS))}"
                )
            data = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                data += chunk
                if len(data) > left:
                    raise web.HTTPRequestEntityTooLarge(
                        max_size=PUBLIC_MAX_REQUEST_BYTES, actual_size=request.content_length or 0
                    )
            left -= len(data)
            fields[name] = bytes(data)
    except ValueError as exc:
        raise BadForm(f"the multipart body is malformed: {exc}") from None
    missing = [n for n in FILE_FIELDS if not fields.get(n)]
    if missing:
        raise BadForm(
            f"missing form field{'s' * (len(missing) > 1)} {' and '.join(missing)} (the portrait and the speech file)"
        )
    request_fields: dict = {"image": fields["image"], "audio": fields["audio"]}
    for name in TEXT_FIELDS:
        if name in fields:
            request_fields[name] = fields[name].decode(errors="replace").strip()
    for name, target in INT_FIELDS.items():
        if name in fields:
            text = fields[name].decode(errors="replace").strip()
            try:
                request_fields[target] = int(text)
            except ValueError:
                raise BadForm(f"{name} must be an integer, got {text[:40]!r}") from None
    try:
        return avatar_pb2.GenerateRequest(**request_fields)
    except ValueError as exc:  # an int out of the proto's range
        raise BadForm(f"a field is out of range: {exc}") from None


# --- routes ----------------------------------------------------------------------------------


def _job_or_404(request: web.Request) -> Job:
    job = request.app["jobs"].get(request.match_info["id"])
    if job is None:
        raise web.HTTPNotFound(
            text='{"error": "no such job (unknown, or expired and forgotten)", "code": "NOT_FOUND"}',
            content_type="application/json",
        )
    return job


def _failure(job: Job) -> web.Response:
    err = job.error
    return grpc_error_response(err.code, err.details, err.retry_after_ms)


async def create_job(request: web.Request) -> web.Response:
    try:
        generate = await read_form(request)
    except BadForm as exc:
        return json_error(400, str(exc), "INVALID_ARGUMENT")
    store: JobStore = request.app["jobs"]
    job = store.start(request.app["client"], generate)
    if job is None:
        return json_error(
            429, f"{store.max_jobs} jobs are running here already", "RESOURCE_EXHAUSTED", {"Retry-After": "5"}
        )
    try:
        await asyncio.wait_for(job.started.wait(), START_WAIT_S)
    except TimeoutError:
        pass  # still queued: 201, its status tells the rest
    if job.state == "failed" and not job.chunks:
        store.jobs.pop(job.id, None)
        return _failure(job)
    body = job.describe()
    body["url"] = str(request.url.join(request.app.router["job_video"].url_for(id=job.id)))
    body["status_url"] = str(request.url.join(request.app.router["job"].url_for(id=job.id)))
    return web.json_response(body, status=201, headers={"Location": body["status_url"]})


async def job_status(request: web.Request) -> web.Response:
    return web.json_response(_job_or_404(request).describe())


async def cancel_job(request: web.Request) -> web.Response:
    job = _job_or_404(request)
    if job.task and not job.task.done():
        job.task.cancel()
        await asyncio.gather(job.task, return_exceptions=True)
    return web.json_response(job.describe())


async def job_video(request: web.Request) -> web.StreamResponse:
    job = _job_or_404(request)
    await job.started.wait()
    if job.state == "failed" and not job.chunks:
        return _failure(job)
    response = web.StreamResponse(headers={"Content-Type": "video/mp4", "Cache-Control": "no-store"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        async for data in job.read():
            await response.write(data)
            BYTES_STREAMED.labels(VIDEO_ROUTE).inc(len(data))
    except ConnectionError:
        return response  # the reader left; the job goes on for the others
    await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/jobs", create_job)
    app.router.add_get("/v1/jobs/{id}", job_status, name="job")
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get(VIDEO_ROUTE, job_video, name="job_video")
