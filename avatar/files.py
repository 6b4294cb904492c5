"""Output files written atomically: a temp file beside the target, renamed into place when whole."""

import json
import os
import tempfile
from pathlib import Path


def unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_json_atomic(path: Path, data) -> None:
    """JSON to `path`, never half-written: readers see the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; this is an ordinary output file
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
