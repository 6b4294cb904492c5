"""`avatar batch PROFILES_DIR --out DIR`: one video per JSON profile through AvatarService.Generate.

Each profile (NAME.json) names an image and an audio file, relative to a root folder (the
profiles folder unless --root says otherwise; absolute paths and paths leading out of the root
are refused), plus optional generation settings:

    {"image": "faces/anna.png", "audio": "speech/anna.wav", "prompt": "...", "size": "704*384",
     "preset": "hd", "num_clip": 0, "infer_frames": 48, "sample_steps": 4, "seed": 7}

For each profile the batch writes OUT/NAME.mp4, OUT/NAME.json (sidecar: parameters, model,
timings, size and sha256 of the video) and OUT/logs/NAME.log, and keeps OUT/manifest.json with
every profile's state (done / failed with the reason). Files appear only complete (written
to a temporary name, then renamed). A rerun skips profiles whose video matches its sidecar and
whose profile did not change, and redoes everything else, so a killed batch resumes where it
stopped. One bad profile fails alone; the others go on.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from avatar.files import unlink_quietly, write_json_atomic

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
MAX_INPUT_BYTES = 64 * 1024 * 1024 - 1024 * 1024   # leaves room in a 64 MiB request for the rest


class ProfileError(ValueError):
    """The profile itself is wrong (fields, types, paths): fails that profile only, never retried."""


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    image: Path
    audio: Path
    prompt: str = ""
    size: str = ""
    preset: str = ""
    num_clip: int = 0
    infer_frames: int = 0
    sample_steps: int = 0
    seed: int | None = None
    sha256: str = ""          # of the profile file's bytes: a changed profile is redone

    def request(self):
        from avatar.v1 import avatar_pb2
        return avatar_pb2.GenerateRequest(
            image=_read_input(self.image, "image"), audio=_read_input(self.audio, "audio"), prompt=self.prompt,
            size=self.size, preset=self.preset, num_clip=self.num_clip, infer_frames=self.infer_frames,
            sample_steps=self.sample_steps, seed=self.seed)

    def settings(self) -> dict:
        d = dataclasses.asdict(self)
        d["image"], d["audio"] = str(self.image), str(self.audio)
        return d


_FIELDS = {"image": str, "audio": str, "prompt": str, "size": str, "preset": str,
           "num_clip": int, "infer_frames": int, "sample_steps": int, "seed": (int, type(None))}


def resolve_under(root: Path, value: str, what: str) -> Path:
    """`value` as a path inside `root` (symlinks followed). Refuses absolute paths, '..' escapes
    and links that point out of the root: server-side files are only read from under it."""
    if not value or "\x00" in value:
        raise ProfileError(f"{what}: empty or invalid path")
    rel = Path(value)
    if rel.is_absolute() or value.startswith("~"):
        raise ProfileError(f"{what}: {value!r} is absolute; give a path relative to the root {root}")
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ProfileError(f"{what}: {value!r} leads outside the root {root}")
    if not path.is_file():
        raise ProfileError(f"{what}: {value!r} does not exist under {root}" if not path.exists()
                           else f"{what}: {value!r} is not a file")
    return path


def load_profile(path: Path, root: Path) -> Profile:
    """Reads and checks one profile file; ProfileError says what is wrong in words."""
    name = path.stem
    if not _NAME.match(name):
        raise ProfileError(f"profile name {name!r}: use letters, digits, '.', '_' and '-' only")
    if name == Path(MANIFEST).stem:
        raise ProfileError(f"profile name {name!r} is reserved for the batch manifest: rename the file")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProfileError("a profile is a JSON object with at least 'image' and 'audio'")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ProfileError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    for key in ("image", "audio"):
        if key not in data:
            raise ProfileError(f"missing field {key!r}")
    for key, value in data.items():
        want = _FIELDS[key]
        if not isinstance(value, want) or (isinstance(value, bool)):
            kind = want.__name__ if isinstance(want, type) else "integer or null"
            raise ProfileError(f"field {key!r} must be {kind}, got {json.dumps(value)[:40]}")
    for key in ("num_clip", "infer_frames", "sample_steps"):
        if data.get(key, 0) < 0:
            raise ProfileError(f"field {key!r} must not be negative")
    return Profile(name=name, image=resolve_under(root, data["image"], "image"),
                   audio=resolve_under(root, data["audio"], "audio"), prompt=data.get("prompt", ""),
                   size=data.get("size", ""), preset=data.get("preset", ""), num_clip=data.get("num_clip", 0),
                   infer_frames=data.get("infer_frames", 0), sample_steps=data.get("sample_steps", 0),
                   seed=data.get("seed"), sha256=hashlib.sha256(raw).hexdigest())


def _read_input(path: Path, what: str) -> bytes:
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise ProfileError(f"{what} {path.name} is {size / 2**20:.0f} MiB; the limit is "
                           f"{MAX_INPUT_BYTES // 2**20} MiB")
    return path.read_bytes()


# --- files ---------------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finished(out: Path, profile: Profile) -> dict | None:
    """The sidecar of a finished, intact video for this exact profile, else None."""
    video, sidecar = out / f"{profile.name}.mp4", out / f"{profile.name}.json"
    try:
        meta = json.loads(sidecar.read_text())
        if (meta.get("status") == "done" and meta.get("profile_sha256") == profile.sha256
                and video.stat().st_size == meta["video"]["bytes"]
                and _sha256_file(video) == meta["video"]["sha256"]):
            return meta
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


class JobLog:
    """OUT/logs/NAME.log: one timestamped line per event of one profile's job, appended."""

    def __init__(self, path: Path):
        self._f = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        ts = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        self._f.write(f"{ts} {msg}\n")

    def close(self):
        self._f.close()


# --- the batch -----------------------------------------------------------------------------

@dataclasses.dataclass
class BatchConfig:
    profiles_dir: Path
    out: Path
    root: Path
    server: str | None = None
    concurrency: int = 1
    retries: int = 3
    timeout_s: float | None = None


class Batch:
    def __init__(self, cfg: BatchConfig, stub, say=print):
        self.cfg = cfg
        self.stub = stub
        self.say = say
        self.manifest: dict = {}
        self._lock = asyncio.Lock()

    async def _record(self, name: str, entry: dict) -> None:
        async with self._lock:
            self.manifest["profiles"][name] = entry
            counts: dict[str, int] = {}
            for e in self.manifest["profiles"].values():
                counts[e["status"]] = counts.get(e["status"], 0) + 1
            self.manifest["summary"] = counts
            self.manifest["updated"] = _now()
            write_json_atomic(self.cfg.out / MANIFEST, self.manifest)

    async def run(self, paths: list[Path]) -> dict:
        out = self.cfg.out
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.part"):   # half-written leftovers of a killed run
            unlink_quietly(stale)
        self.manifest = {"profiles_dir": str(self.cfg.profiles_dir), "root": str(self.cfg.root),
                         "server": self.cfg.server or "embedded", "started": _now(), "profiles": {}}
        try:
            old = json.loads((out / MANIFEST).read_text())["profiles"]
        except (OSError, ValueError, KeyError):
            old = {}
        # every profile gets a line at once; finished ones keep theirs
        for p in paths:
            prev = old.get(p.stem)
            self.manifest["profiles"][p.stem] = prev if prev and prev.get("status") == "done" else {"status": "pending"}
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def one(path: Path):
            async with sem:
                await self._job(path)

        await asyncio.gather(*(one(p) for p in paths))
        return self.manifest

    async def _job(self, path: Path) -> None:
        name = path.stem
        log = JobLog(self.cfg.out / "logs" / f"{name}.log")
        try:
            try:
                profile = load_profile(path, self.cfg.root)
            except (ProfileError, OSError) as e:
                reason = f"bad profile: {e}"
                log(f"FAILED {reason}")
                self.say(f"{name}: failed: {reason}")
                await self._record(name, {"status": "failed", "reason": reason, "at": _now()})
                return
            meta = finished(self.cfg.out, profile)
            if meta is not None:
                log("skipped: already done (video matches its sidecar)")
                await self._record(name, {"status": "done", "video": f"{name}.mp4", "sidecar": f"{name}.json",
                                          "finished": meta.get("finished"), "skipped": True})
                return
            await self._record(name, {"status": "running", "at": _now()})
            entry = await self._generate(profile, log)
            await self._record(name, entry)
            self.say(f"{name}: {entry['status']}" + (f": {entry['reason']}" if "reason" in entry else ""))
        finally:
            log.close()

    async def _generate(self, profile: Profile, log) -> dict:
        import grpc

        from avatar.admission import retry_after_ms
        log(f"start: image={profile.image} audio={profile.audio} size={profile.size!r} "
            f"preset={profile.preset!r} seed={profile.seed}")
        try:
            request = profile.request()
        except (ProfileError, OSError) as e:
            log(f"FAILED {e}")
            return {"status": "failed", "reason": f"bad profile: {e}", "at": _now()}
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(profile, request, log, attempt)
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                reason = f"{code}: {e.details()}"
                if code in _RETRYABLE and attempt <= self.cfg.retries:
                    wait = (retry_after_ms(e) or 1000 * 2 ** (attempt - 1)) / 1000
                    log(f"attempt {attempt} failed ({reason}); retrying in {wait:.1f} s")
                    await asyncio.sleep(min(wait, 60))
                    continue
                log(f"FAILED {reason}")
                return {"status": "failed", "reason": reason, "code": code, "attempts": attempt, "at": _now()}
            except Exception as e:  # noqa: BLE001 - one profile's failure never stops the batch
                reason = f"{type(e).__name__}: {e}"
                log(f"FAILED {reason}")
                return {"status": "failed", "reason": reason, "attempts": attempt, "at": _now()}

    async def _attempt(self, profile: Profile, request, log, attempt: int) -> dict:
        from google.protobuf.json_format import MessageToDict
        name, out = profile.name, self.cfg.out
        video = out / f"{name}.mp4"
        started, t0 = _now(), time.perf_counter()
        header = status = None
        fragments = 0
        fd, part = tempfile.mkstemp(prefix=f".{name}.mp4.", suffix=".part", dir=out)
        try:
            with os.fdopen(fd, "wb") as f:
                call = self.stub.Generate(request, timeout=self.cfg.timeout_s)
                async for msg in call:
                    kind = msg.WhichOneof("event")
                    if kind == "header":
                        header = msg.header
                        log(f"attempt {attempt}: request {header.request_id}: {header.width}x{header.height}, "
                            f"{header.total_frames} frames in {header.expected_fragments} fragments, "
                            f"model {header.model}")
                    elif kind == "init_segment":
                        f.write(msg.init_segment.data)
                    elif kind == "fragment":
                        f.write(msg.fragment.data)
                        fragments += 1
                    elif kind == "status":
                        status = msg.status
                if header is None or status is None:
                    raise RuntimeError("the stream ended without a header or a final status")
                if fragments != header.expected_fragments:
                    raise RuntimeError(f"got {fragments} of {header.expected_fragments} fragments")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(part, 0o644)
            os.replace(part, video)
        except BaseException:
            unlink_quietly(part)
            raise
        size, digest = video.stat().st_size, _sha256_file(video)
        sidecar = {
            "status": "done", "profile": profile.name, "profile_sha256": profile.sha256,
            "settings": profile.settings(), "server": self.cfg.server or "embedded",
            "request_id": header.request_id, "trace_id": status.trace_id, "model": header.model,
            "job": MessageToDict(header.job, preserving_proto_field_name=True),
            "width": header.width, "height": header.height, "fps": header.fps,
            "duration_s": header.duration_s, "blocks": status.blocks, "frames": status.frames,
            "timings_ms": {t.stage: {"ms": t.ms, "count": t.count} for t in status.timings},
            "time_to_first_fragment_s": status.time_to_first_fragment_s, "server_total_s": status.total_s,
            "total_s": time.perf_counter() - t0, "attempts": attempt,
            "video": {"file": video.name, "bytes": size, "sha256": digest},
            "started": started, "finished": _now(),
        }
        write_json_atomic(out / f"{name}.json", sidecar)
        log(f"done: {video.name} {size} bytes, {status.frames} frames, {sidecar['total_s']:.1f} s")
        return {"status": "done", "video": video.name, "sidecar": f"{name}.json", "finished": sidecar["finished"],
                "attempts": attempt}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


# --- command line --------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profiles_dir", metavar="PROFILES_DIR", help="folder of NAME.json profiles")
    p.add_argument("--out", required=True, metavar="DIR", help="where videos, sidecars, logs and the manifest go")
    p.add_argument("--root", metavar="DIR", help="profiles' image/audio paths are relative to this folder and "
                                                 "must stay inside it (default: PROFILES_DIR)")
    p.add_argument("--server", metavar="ADDR", help="a running gateway (default: start the mesh in this process)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="profiles in flight at once (default 1)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="retries of a profile on UNAVAILABLE / RESOURCE_EXHAUSTED / deadline (default 3)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline per video in seconds")


async def run(args, model=None) -> int:
    from avatar import grpc_util
    from avatar.security import SecurityConfig
    from avatar.v1 import avatar_pb2_grpc

    profiles_dir = Path(args.profiles_dir)
    if not profiles_dir.is_dir():
        print(f"avatar batch: error: {profiles_dir} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    root = Path(args.root or profiles_dir).resolve()
    if not root.is_dir():
        print(f"avatar batch: error: --root {root} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    if args.concurrency < 1 or args.retries < 0:
        print("avatar batch: error: --concurrency must be at least 1 and --retries not negative", file=sys.stderr)
        return EXIT_USAGE
    paths = sorted(profiles_dir.glob("*.json"))
    if not paths:
        print(f"avatar batch: error: no *.json profiles in {profiles_dir}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    if out.resolve() == profiles_dir.resolve():
        print("avatar batch: error: --out must not be the profiles folder (sidecars would replace profiles)",
              file=sys.stderr)
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    cfg = BatchConfig(profiles_dir=profiles_dir.resolve(), out=out, root=root, server=args.server,
                      concurrency=args.concurrency, retries=args.retries, timeout_s=args.timeout)
    mesh, creds, token = None, None, None
    try:
        if args.server:
            sec = SecurityConfig.from_args(args)
            creds, token, address = sec.tls.channel_credentials(), sec.auth_token, args.server
            from avatar.security import plaintext_token_warning
            if warning := plaintext_token_warning(address, creds, token):
                print(f"avatar batch: {warning}", file=sys.stderr)
        else:
            from avatar.app.serve import ServeConfig, start
            mesh = await start(ServeConfig(role="all", listen="127.0.0.1:0", model=model,
                                           trace_file=getattr(args, "trace_file", None)))
            address = mesh.address
    except ValueError as e:
        print(f"avatar batch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        async with grpc_util.create_channel(address, creds, token) as channel:
            batch = Batch(cfg, avatar_pb2_grpc.AvatarServiceStub(channel),
                          say=lambda s: print(f"avatar batch: {s}", file=sys.stderr, flush=True))
            manifest = await batch.run(paths)
    finally:
        if mesh is not None:
            await mesh.stop(grace=1.0)
    summary = manifest.get("summary", {})
    print(f"avatar batch: {summary.get('done', 0)} done, {summary.get('failed', 0)} failed of {len(paths)}; "
          f"manifest {out / MANIFEST}", file=sys.stderr)
    return EXIT_OK if summary.get("done", 0) == len(paths) else EXIT_SOME_FAILED
