"""OpenTelemetry per process: OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, else optional JSONL file."""

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Status, StatusCode

TRACER_NAME = "avatar"
_provider: TracerProvider | None = None


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file (several processes may share it)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_to_dict(s)) + "\n" for s in spans)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)  # one write per batch: lines from concurrent processes stay whole
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def span_to_dict(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "service": span.resource.attributes.get("service.name"),
        "kind": span.kind.name,
        "start_unix_nano": span.start_time,
        "end_unix_nano": span.end_time,
        "duration_ms": (span.end_time - span.start_time) / 1e6 if span.end_time else None,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def setup(service_name: str, trace_file: str | None = None) -> TracerProvider:
    """Installs this process's tracer provider once; later calls return the first one.

    Spans always get real ids (so traces propagate through a process that exports nothing);
    they leave the process only through OTLP or the trace file.
    """
    global _provider
    if _provider is not None:
        return _provider
    provider = make_provider(service_name, trace_file)
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def make_provider(service_name: str, trace_file: str | None = None) -> TracerProvider:
    """A tracer provider with the exporters the environment and flags ask for (not installed)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        # The exporter reads OTEL_EXPORTER_OTLP_* itself (endpoint, headers, insecure, timeout).
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if trace_file:
        # Simple (synchronous) processor: a span is on disk when it ends, even if the process is killed.
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(trace_file)))
    return provider


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def _current_span(name: str, parent=None, **kwargs) -> Iterator[trace.Span]:
    """start_as_current_span that may live in an async generator: when a stream's generator is
    closed from another task (a cancelled or failed RPC), the context it attached belongs to a
    context that is already gone, and detaching it there would only log a spurious error."""
    span = tracer().start_span(name, context=parent, **kwargs)
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    closed_elsewhere = False
    try:
        yield span
    except GeneratorExit:
        closed_elsewhere = True
        raise
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()
        if not closed_elsewhere:
            otel_context.detach(token)


def server_span(method: str, metadata):
    """The span of one incoming RPC, child of the caller's span found in the metadata."""
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return _current_span(method, propagate.extract(carrier), kind=trace.SpanKind.SERVER)


def span(name: str, **attributes):
    """A stage span under the current one, e.g. span("encode_image", width=64)."""
    return _current_span(name, attributes=attributes)


def record_span(name: str, start_ns: int, end_ns: int, **attributes) -> None:
    """A span measured elsewhere (e.g. by an engine in a thread), placed under the current span."""
    s = tracer().start_span(name, start_time=start_ns, attributes=attributes)
    s.end(end_time=end_ns)


def outgoing_metadata(parent: trace.Span | None = None) -> list[tuple[str, str]]:
    """gRPC metadata carrying the trace context (W3C traceparent) of `parent`, or of the current
    span, to a downstream call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(parent) if parent is not None else None)
    return list(carrier.items())


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
