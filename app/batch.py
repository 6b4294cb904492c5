"""`avatar batch PROFILES_DIR --out DIR`: one video per JSON profile through AvatarService.Generate.

Each profile (NAME.json) names an image and an audio file, relative to a root folder (the
profiles folder unless --root says otherwise; absolute paths and paths leading out of the root
are refused), plus optional generation settings:

    {"image": "faces/anna.png", "audio": "speech/anna.wav", "prompt": "...", "size": "704*384",
     "preset": "hd", "num_clip": 0, "infer_frames": 48, "sample_steps": 4, "seed": 7}

(`avatar batch --example DIR` writes profiles to start from, with every field explained; FIELDS
below is the schema.)

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
import difflib
import hashlib
import json
import re
import sys
from pathlib import Path

from avatar.app import arg_types
from avatar.files import unlink_quietly, write_json_atomic

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ProfileError(ValueError):
    """The profile itself is wrong (fields, types, paths): fails that profile only, never retried."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One key of a profile: its JSON type, default and meaning (the schema, for checks and --example)."""

    kind: type | tuple
    default: object
    help: str
    example: object


FIELDS = {
    "image": Field(str, None, "portrait (PNG, JPEG or WebP), relative to the root; required", "inputs/portrait.png"),
    "audio": Field(
        str, None, "speech (WAV, FLAC, MP3, OGG or M4A), relative to the root; required", "inputs/speech.wav"
    ),
    "prompt": Field(str, "", "text describing the scene", "A woman talks to the camera"),
    "size": Field(str, "", 'pixel area "W*H", the aspect follows the image ("": the preset\'s)', "704*384"),
    "preset": Field(str, "", '"preview", "standard" or "hd" ("": preview)', "preview"),
    "num_clip": Field(int, 0, "clips to generate at most (0: the whole audio)", 0),
    "infer_frames": Field(int, 0, "video frames per clip, rounded up to 12 (0: the preset's)", 48),
    "sample_steps": Field(int, 0, "denoising steps per block, 1..50 (0: the preset's)", 4),
    "seed": Field((int, type(None)), None, "noise seed (null: 420)", 7),
}
REQUIRED = ("image", "audio")


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
    sha256: str = ""  # of the profile file's bytes: a changed profile is redone

    def request(self):
        from avatar.client import InvalidRequest, read_input
        from avatar.v1 import avatar_pb2

        try:
            image, audio = read_input(self.image, "image"), read_input(self.audio, "audio")
        except InvalidRequest as e:
            raise ProfileError(e.details) from None
        return avatar_pb2.GenerateRequest(
            image=image,
            audio=audio,
            prompt=self.prompt,
            size=self.size,
            preset=self.preset,
            num_clip=self.num_clip,
            infer_frames=self.infer_frames,
            sample_steps=self.sample_steps,
            seed=self.seed,
        )

    def settings(self) -> dict:
        d = dataclasses.asdict(self)
        d["image"], d["audio"] = str(self.image), str(self.audio)
        return d


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
        raise ProfileError(
            f"{what}: {value!r} does not exist under {root}"
            if not path.exists()
            else f"{what}: {value!r} is not a file"
        )
    return path


def _field_problems(data: dict, root: Path) -> tuple[list[str], dict]:
    """Every problem of a profile's fields, and the values that passed (paths resolved)."""
    from avatar.errors import InvalidInput
    from avatar.media import parse_size
    from avatar.presets import JOB_PRESETS

    problems, good = [], {}
    for key in data:
        if key not in FIELDS:
            near = difflib.get_close_matches(key, FIELDS, n=1)
            problems.append(f"unknown field {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    problems += [f"missing field {key!r}" for key in REQUIRED if key not in data]
    for key, field in FIELDS.items():
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, field.kind) or isinstance(value, bool):
            kind = field.kind.__name__ if isinstance(field.kind, type) else "integer or null"
            problems.append(f"field {key!r} must be {kind}, got {json.dumps(value)[:40]}")
        elif field.kind is int and value < 0:
            problems.append(f"field {key!r} must not be negative, got {value}")
        elif key in REQUIRED:
            try:
                good[key] = resolve_under(root, value, key)
            except ProfileError as e:
                problems.append(str(e))
        elif key == "size" and value:
            try:
                parse_size(value)
                good[key] = value
            except InvalidInput as e:
                problems.append(f"field 'size': {e}")
        elif key == "preset" and value and value not in JOB_PRESETS:
            problems.append(f"field 'preset': {value!r} is not one of {', '.join(JOB_PRESETS)}")
        else:
            good[key] = value
    return problems, good


def load_profile(path: Path, root: Path) -> Profile:
    """Reads and checks one profile file; ProfileError lists everything that is wrong with it."""
    name = path.stem
    problems = []
    if not _NAME.match(name):
        problems.append(f"profile name {name!r}: use letters, digits, '.', '_' and '-' only")
    elif name == Path(MANIFEST).stem:
        problems.append(f"profile name {name!r} is reserved for the batch manifest: rename the file")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError("; ".join(problems + [f"not valid JSON: {e}"])) from None
    if not isinstance(data, dict):
        raise ProfileError("; ".join(problems + ["a profile is a JSON object with at least 'image' and 'audio'"]))
    field_problems, good = _field_problems(data, root)
    problems += field_problems
    if problems:
        head = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise ProfileError(head + "; ".join(problems))
    return Profile(
        name=name, sha256=hashlib.sha256(raw).hexdigest(), **{k: good.get(k, f.default) for k, f in FIELDS.items()}
    )


# --- files ---------------------------------------------------------------------------------


def finished(out: Path, profile: Profile) -> dict | None:
    """The sidecar of a finished, intact video for this exact profile, else None."""
    from avatar.client import sha256_file

    video, sidecar = out / f"{profile.name}.mp4", out / f"{profile.name}.json"
    try:
        meta = json.loads(sidecar.read_text())
        if (
            meta.get("status") == "done"
            and meta.get("profile_sha256") == profile.sha256
            and video.stat().st_size == meta["video"]["bytes"]
            and sha256_file(video) == meta["video"]["sha256"]
        ):
            return meta
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


class JobLog:
    """OUT/logs/NAME.log: one timestamped line per event of one profile's job, appended."""

    def __init__(self, path: Path):
        self._f = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        ts = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
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
    timeout_s: float | None = None


class Batch:
    """Runs the profiles through one avatar.client.AvatarClient (its retry policy is the batch's)."""

    def __init__(self, cfg: BatchConfig, client, say=print):
        self.cfg = cfg
        self.client = client
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
        for stale in out.glob(".*.part"):  # half-written leftovers of a killed run
            unlink_quietly(stale)
        self.manifest = {
            "profiles_dir": str(self.cfg.profiles_dir),
            "root": str(self.cfg.root),
            "server": self.cfg.server or "embedded",
            "started": _now(),
            "profiles": {},
        }
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
                await self._record(
                    name,
                    {
                        "status": "done",
                        "video": f"{name}.mp4",
                        "sidecar": f"{name}.json",
                        "finished": meta.get("finished"),
                        "skipped": True,
                    },
                )
                return
            await self._record(name, {"status": "running", "at": _now()})
            entry = await self._generate(profile, log)
            await self._record(name, entry)
            self.say(f"{name}: {entry['status']}" + (f": {entry['reason']}" if "reason" in entry else ""))
        finally:
            log.close()

    async def _generate(self, profile: Profile, log) -> dict:
        from avatar.client import GenerateError

        log(
            f"start: image={profile.image} audio={profile.audio} size={profile.size!r} "
            f"preset={profile.preset!r} seed={profile.seed}"
        )
        try:
            request = profile.request()
        except ProfileError as e:
            log(f"FAILED {e}")
            return {"status": "failed", "reason": f"bad profile: {e}", "at": _now()}

        def on_event(msg):
            if msg.WhichOneof("event") == "header":
                h = msg.header
                log(
                    f"request {h.request_id}: {h.width}x{h.height}, {h.total_frames} frames in "
                    f"{h.expected_fragments} fragments, model {h.model}"
                )

        try:
            saved = await self.client.generate_to_file(
                request,
                self.cfg.out / f"{profile.name}.mp4",
                timeout_s=self.cfg.timeout_s,
                on_event=on_event,
                on_retry=lambda e, wait: log(f"attempt {e.attempts} failed ({e}); retrying in {wait:.1f} s"),
                server=self.cfg.server or "embedded",
                sidecar={"profile": profile.name, "profile_sha256": profile.sha256, "settings": profile.settings()},
            )
        except GenerateError as e:
            log(f"FAILED {e}")
            return {"status": "failed", "reason": str(e), "code": e.code.name, "attempts": e.attempts, "at": _now()}
        except Exception as e:  # noqa: BLE001 - one profile's failure never stops the batch
            reason = f"{type(e).__name__}: {e}"
            log(f"FAILED {reason}")
            return {"status": "failed", "reason": reason, "at": _now()}
        for note in (saved.audio_note, saved.status.truncation):
            if note:
                log(f"note: {note}")
        log(f"done: {saved.path.name} {saved.bytes} bytes, {saved.status.frames} frames, {saved.total_s:.1f} s")
        return {
            "status": "done",
            "video": saved.path.name,
            "sidecar": f"{profile.name}.json",
            "finished": saved.finished,
            "attempts": saved.attempts,
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# --- command line --------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profiles_dir", metavar="PROFILES_DIR", nargs="?", help="folder of NAME.json profiles")
    p.add_argument("--out", metavar="DIR", help="where videos, sidecars, logs and the manifest go (required)")
    p.add_argument(
        "--example",
        metavar="DIR",
        help="write an example profiles folder (profiles, the inputs they "
        "name, README.md with every field) to DIR and exit",
    )
    p.add_argument(
        "--root",
        metavar="DIR",
        help="profiles' image/audio paths are relative to this folder and must stay inside it (default: PROFILES_DIR)",
    )
    p.add_argument("--server", metavar="ADDR", help="a running gateway (default: start the mesh in this process)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="profiles in flight at once (default 1)")
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="N",
        help="retries of a video refused before its first fragment (UNAVAILABLE, or RESOURCE_EXHAUSTED "
        "with the gateway's retry-after-ms) (default 3)",
    )
    p.add_argument(
        "--timeout",
        type=arg_types.positive_seconds,
        default=None,
        metavar="S",
        help="deadline per video in seconds, retries included",
    )


def _usage_error(msg: str) -> int:
    print(f"avatar batch: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


async def run(args, model=None) -> int:
    from avatar.app.embedded import client_for
    from avatar.client import RetryPolicy

    if args.profiles_dir is None or args.out is None:
        return _usage_error("give PROFILES_DIR and --out DIR (or --example DIR for a folder to start from)")
    profiles_dir = Path(args.profiles_dir)
    if not profiles_dir.is_dir():
        return _usage_error(f"{profiles_dir} is not a folder")
    root = Path(args.root or profiles_dir).resolve()
    if not root.is_dir():
        return _usage_error(f"--root {root} is not a folder")
    if args.concurrency < 1 or args.retries < 0:
        return _usage_error("--concurrency must be at least 1 and --retries not negative")
    paths = sorted(profiles_dir.glob("*.json"))
    if not paths:
        return _usage_error(f"no *.json profiles in {profiles_dir} (`avatar batch --example DIR` writes some)")
    out = Path(args.out)
    if out.resolve() == profiles_dir.resolve():
        return _usage_error("--out must not be the profiles folder (sidecars would replace profiles)")
    out.mkdir(parents=True, exist_ok=True)
    cfg = BatchConfig(
        profiles_dir=profiles_dir.resolve(),
        out=out,
        root=root,
        server=args.server,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
    )
    async with client_for(args, model, RetryPolicy(retries=args.retries)) as client:
        if client.warning:
            print(f"avatar batch: {client.warning}", file=sys.stderr)
        batch = Batch(cfg, client, say=lambda s: print(f"avatar batch: {s}", file=sys.stderr, flush=True))
        manifest = await batch.run(paths)
    summary = manifest.get("summary", {})
    print(
        f"avatar batch: {summary.get('done', 0)} done, {summary.get('failed', 0)} failed of {len(paths)}; "
        f"manifest {out / MANIFEST}",
        file=sys.stderr,
    )
    return EXIT_OK if summary.get("done", 0) == len(paths) else EXIT_SOME_FAILED


# --- the example folder ----------------------------------------------------------------------

SAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "assets"  # in a source checkout
EXAMPLE_PROFILES = {
    "minimal": {"image": "inputs/portrait.png", "audio": "inputs/speech.wav"},
    "every-field": {key: field.example for key, field in FIELDS.items()}
    | {"num_clip": 1, "infer_frames": 24, "size": "384*256", "sample_steps": 3},
}


def write_example(folder: Path) -> list[str]:
    """An example profiles folder that runs as it is: one profile with the two required fields, one
    with every field, README.md describing them, and the inputs they name (the repository's sample
    portrait and speech). Returns what still has to be done by hand (empty when nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in EXAMPLE_PROFILES.items():
        write_json_atomic(folder / f"{name}.json", data)
    rows = "\n".join(
        f"| `{key}` | {'integer or null' if key == 'seed' else field.kind.__name__} | {field.help} |"
        for key, field in FIELDS.items()
    )
    (folder / "README.md").write_text(
        "# avatar batch profiles\n\nOne video per `NAME.json` here: `avatar batch "
        f"{folder} --out renders/`.\nPaths are relative to this folder (or `--root`) and must stay inside "
        "it.\n\n| field | type | meaning |\n|---|---|---|\n" + rows + "\n"
    )
    inputs = folder / "inputs"
    inputs.mkdir(exist_ok=True)
    todo = []
    for sample, target in (("astronaut.png", "portrait.png"), ("speech.wav", "speech.wav")):
        if (SAMPLE_INPUTS / sample).is_file():
            (inputs / target).write_bytes((SAMPLE_INPUTS / sample).read_bytes())
        else:
            todo.append(f"put a {'portrait' if target.endswith('png') else 'speech file'} at {inputs / target}")
    return todo


def example_command(args) -> int:
    folder = Path(args.example)
    todo = write_example(folder)
    print(
        f"avatar batch: wrote {', '.join(f'{n}.json' for n in EXAMPLE_PROFILES)} and README.md to {folder}; "
        + (f"then {'; '.join(todo)}; " if todo else "")
        + f"run: avatar batch {folder} --out {folder.parent / (folder.name + '-renders')}",
        file=sys.stderr,
    )
    return EXIT_OK
