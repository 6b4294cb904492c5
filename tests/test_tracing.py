"""One trace across processes: four services with their own trace files, one trace id, a span per stage."""

import json
from collections import Counter

from conftest import ASSETS, generate

from avatar.v1 import avatar_pb2

STAGES = ("encode_image", "encode_audio", "encode_text", "dit_block", "vae_decode", "mux", "send")


def test_one_request_is_one_trace_across_four_processes(mesh, tmp_path):
    request = avatar_pb2.GenerateRequest(
        image=(ASSETS / "astronaut.png").read_bytes(),
        audio=(ASSETS / "speech.wav").read_bytes(),
        size="64*64",
        num_clip=1,
        infer_frames=24,
        sample_steps=2,
    )
    s = generate(mesh["gateway"].address, request)
    trace_id = s.status.trace_id
    assert len(trace_id) == 32 and int(trace_id, 16) != 0

    spans = {role: [sp for sp in svc.spans() if sp["trace_id"] == trace_id] for role, svc in mesh.items()}
    everything = [sp for found in spans.values() for sp in found]
    # Each process exported spans of this request, under this trace id only.
    assert all(spans[role] for role in ("gateway", "encoder", "generator", "decoder")), {
        role: len(found) for role, found in spans.items()
    }
    assert {sp["service"] for sp in everything} == {
        f"avatar-{r}" for r in ("gateway", "encoder", "generator", "decoder")
    }

    names = Counter(sp["name"] for sp in everything)
    for stage in STAGES:
        assert names[stage] >= 1, f"no {stage} span in {dict(names)}"
    blocks = s.status.blocks
    assert names["dit_block"] == names["vae_decode"] == blocks == 2
    assert names["mux"] == names["send"] == blocks + 1  # block 0's first 4 frames in a fragment of their own
    assert {sp["attributes"]["steps"] for sp in spans["generator"] if sp["name"] == "dit_block"} == {2}
    assert {sp["service"] for sp in everything if sp["name"] == "dit_block"} == {"avatar-generator"}
    assert {sp["service"] for sp in everything if sp["name"] in ("vae_decode", "mux")} == {"avatar-decoder"}

    # What bench/mesh_summary.py reads for the first fragment's path: every stage of it, in order
    import sys

    sys.path.insert(0, "bench")
    import mesh_summary

    path = mesh_summary.first_fragment_path(everything, trace_id)
    labels = [label for _, _, label in mesh_summary.FIRST_FRAGMENT_PATH]
    assert [part.split(" (")[0].rsplit(" ", 1)[0] for part in path.split(", ")] == labels, path
    assert "first chunk at" in path and "graphs kept" in path
    assert "; its model " in path and all(f"; {stage} " in path for stage in ("admit", "inputs", "sink"))
    # where the first chunk's time went: the audio model's share of it, and the session's opening
    (audio,) = [sp["attributes"] for sp in spans["encoder"] if sp["name"] == "encode_audio"]
    assert 0 < audio["first_chunk_model_ms"] <= audio["first_chunk_ms"] and audio["model_windows"] == 1
    assert audio["model_ms"] == audio["first_chunk_model_ms"]  # one window: the whole clip at once
    (opening,) = [sp for sp in spans["generator"] if sp["name"] == "open_session"]
    parts = [opening["attributes"][k] for k in ("admit_ms", "inputs_ms", "sink_ms")]
    assert all(ms >= 0 for ms in parts) and sum(parts) <= opening["duration_ms"]

    # One tree: a single root (the gateway's Generate), every other span's parent is in the trace,
    # and each service's server span hangs under a gateway span (propagated through gRPC metadata).
    ids = {sp["span_id"]: sp for sp in everything}
    roots = [sp for sp in everything if sp["parent_id"] is None]
    assert [r["name"] for r in roots] == ["avatar.v1.AvatarService/Generate"]
    assert all(sp["parent_id"] in ids for sp in everything if sp["parent_id"] is not None)
    for sp in everything:
        if sp["kind"] == "SERVER" and sp["service"] != "avatar-gateway":
            assert ids[sp["parent_id"]]["service"] == "avatar-gateway", sp


def test_otlp_exporter_when_endpoint_is_set(monkeypatch, tmp_path):
    """OTEL_EXPORTER_OTLP_ENDPOINT set: spans go to that OTLP/gRPC collector (here a local fake one);
    with --trace-file as well, they also land in the file."""
    from concurrent import futures

    import grpc
    from conftest import free_port
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from avatar import telemetry

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.extend(sp.name for rs in request.resource_spans for ss in rs.scope_spans for sp in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        trace_file = tmp_path / "spans.jsonl"
        provider = telemetry.make_provider("avatar-test", str(trace_file))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("encode_image"):
            with tracer.start_as_current_span("dit_block", attributes={"steps": 4}):
                pass
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        server.stop(None)
    assert sorted(received) == ["dit_block", "encode_image"]
    lines = [json.loads(x) for x in trace_file.read_text().splitlines()]
    assert [x["name"] for x in lines] == ["dit_block", "encode_image"]
    assert lines[0]["parent_id"] == lines[1]["span_id"] and lines[0]["attributes"] == {"steps": 4}
    assert lines[0]["trace_id"] == lines[1]["trace_id"] and lines[0]["service"] == "avatar-test"


def test_a_stream_closed_from_another_task_ends_its_spans_without_logging_errors(caplog):
    import asyncio

    from avatar import telemetry

    async def stream():
        with telemetry.server_span("/avatar.v1.Test/Stream", ()):
            with telemetry.span("stage"):
                for i in range(10):
                    yield i

    async def main():
        gen = stream()
        await anext(gen)  # spans attached in this task's context
        await asyncio.create_task(gen.aclose())  # closed from another task, as grpc.aio does
        # the same generator run to an error in one task still records it
        failing = stream()
        await anext(failing)
        try:
            await failing.athrow(RuntimeError("boom"))
        except RuntimeError:
            pass

    with caplog.at_level("ERROR"):
        asyncio.run(main())
    assert not [r for r in caplog.records if "detach" in r.getMessage()], caplog.text
