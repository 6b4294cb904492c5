"""Logging for avatar processes: one JSON object per line with the trace id, secrets scrubbed.

`setup_logging()` is called once by `avatar serve`; AVATAR_LOG_FORMAT=text gives plain lines
for a terminal. Every record carries trace_id/span_id of the current OpenTelemetry span, so
a log line leads to its trace in Jaeger and back.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys

LOG_FORMAT_ENV = "AVATAR_LOG_FORMAT"
_SECRET_ENVS = ("AVATAR_AUTH_TOKEN", "AVATAR_INTERNAL_TOKEN")
# "authorization: Bearer abc", "Bearer abc", "token=abc", "--auth-token abc"
_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[^\s'\",;]+"),
    re.compile(r"(?i)((?:auth|internal)[-_]token[\"']?\s*[=: ]\s*[\"']?)[^\s'\",;]+"),
]
_REDACTED = "[REDACTED]"
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """text with bearer tokens, token flags and the given secret values replaced."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, _REDACTED)
    for p in _PATTERNS:
        text = p.sub(lambda m: m.group(1) + _REDACTED, text)
    return text


def _trace_ids() -> tuple[str | None, str | None]:
    try:
        from opentelemetry import trace
    except ImportError:
        return None, None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


class RedactingFilter(logging.Filter):
    """Scrubs secrets from the formatted message and arguments of every record."""

    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg, self.secrets)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        return True


class JSONFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", "trace_id", "span_id", ...extra fields, "exc"}."""

    def __init__(self, service: str | None = None, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.service = service
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        trace_id, span_id = _trace_ids()
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage(), self.secrets),
        }
        if self.service:
            out["service"] = self.service
        if trace_id:
            out["trace_id"], out["span_id"] = trace_id, span_id
        for key, value in vars(record).items():  # fields passed with extra={...}
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = (
                    value if isinstance(value, (int, float, bool, type(None))) else redact(str(value), self.secrets)
                )
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info), self.secrets)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.secrets = secrets

    def format(self, record):
        trace_id, _ = _trace_ids()
        line = super().format(record)
        return redact(f"{line} trace_id={trace_id}" if trace_id else line, self.secrets)


def setup_logging(
    service: str | None = None,
    level: str | int = None,
    fmt: str | None = None,
    stream=None,
    secrets: tuple[str, ...] = (),
) -> logging.Handler:
    """Installs one handler on the root logger (replacing handlers set up earlier by us).
    fmt: "json" or "text" (default: $AVATAR_LOG_FORMAT, else json when stderr is not a tty)."""
    fmt = fmt or os.environ.get(LOG_FORMAT_ENV) or ("text" if sys.stderr.isatty() else "json")
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    secrets = tuple(secrets) + tuple(os.environ.get(e, "") for e in _SECRET_ENVS)
    secrets = tuple(s for s in secrets if s)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter(service, secrets) if fmt == "json" else TextFormatter(secrets))
    handler.addFilter(RedactingFilter(secrets))
    handler._avatar = True
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_avatar", False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("AVATAR_LOG_LEVEL", "INFO").upper())
    return handler
