"""Per-avatar LoRAs on the tiny DiT: chosen per session, equal to a generator with that LoRA
merged, switched back and forth, held LRU, refused with the reason when unknown or bad."""

import base64
import json
import struct
import subprocess
import threading

import grpc
import pytest
import torch
from ckpt_fixtures.dit import one_torch_thread, write_lora  # noqa: F401 (one_torch_thread: autouse)
from conftest import ASSETS, AVATAR, check_video, generate, metrics_of, tone_wav
from safetensors.torch import save_file

from avatar.errors import InvalidInput, ResourceExhausted, WeightsError
from avatar.jobs import Job
from avatar.presets import ModelSpec
from avatar.services.generator.engine import GeneratorEngine
from avatar.services.generator.lora import load_lora
from avatar.services.generator.weights import random_dit

SEED = 3  # the tiny DiT's random weights: ModelSpec(seed=SEED) builds the same model
BLOCKS = 3  # one clip of 2 blocks and the first of the next (after the sink refresh)


def _job():
    return Job(
        width=64,
        height=64,
        fps=25,
        infer_frames=24,
        latent_frames_per_block=3,
        num_blocks=BLOCKS,
        total_frames=BLOCKS * 12,
        sample_steps=2,
        seed=420,
        model="tiny",
    )


def _inputs():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(7, 32, generator=g)
    ref = torch.randn(16, 1, 8, 8, generator=g)
    motion = torch.randn(16, 19, 8, 8, generator=g)
    return text, ref, motion, [torch.randn(12, 5, 32, generator=g) for _ in range(BLOCKS)]


def _render(engine, lora_id=""):
    text, ref, motion, audio = _inputs()
    session = engine.open_session(_job(), text, ref, motion, lora_id=lora_id)
    try:
        return torch.stack([session.generate_block(a) for a in audio])
    finally:
        session.close()


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Three LoRAs of the upstream layout (prefixed peft keys), different weights each."""
    folder = tmp_path_factory.mktemp("loras")
    paths = {}
    for i, name in enumerate(("acme", "globex", "initech")):
        paths[name] = folder / name / "lora.safetensors"
        paths[name].parent.mkdir()
        write_lora(paths[name], _dit(), rank=4, seed=10 + i, scale=0.2)
    return paths


def _engine(loras, names=("acme", "globex"), max_loras=2):
    spec = ModelSpec(name="tiny", seed=SEED, avatar_loras=tuple((n, str(loras[n])) for n in names), max_loras=max_loras)
    return GeneratorEngine(spec)


def _dit():
    return random_dit("tiny", "cpu", torch.float32, seed=SEED)


def _merged_engine(path):
    dit = _dit()
    load_lora(dit, path)  # merged, as `--lora_path` does at start-up (upstream's way)
    return GeneratorEngine(ModelSpec(name="tiny", seed=SEED), dit=dit)


def _peft_engine(path):
    dit = _dit()
    load_lora(dit, path, merge=False)  # peft's LoRA layers, unmerged: base(x) + B(A(x)) * scale
    return GeneratorEngine(ModelSpec(name="tiny", seed=SEED), dit=dit)


# Merged (upstream's way), scale*B@A is folded into W before the product; unmerged (ours, and
# peft's before merging), x@A^T@(scale*B)^T is added after it: the same sum rounded in another
# order. peft's own unmerged and merged forwards differ by 3e-5 and 1.6e-3 (values up to 3.9)
# for these two LoRAs on the tiny random DiT, and over a session (3 blocks of 2 steps, a sink
# refresh) by 3e-5 and 2.3e-4 of the latents' norm (measured). A LoRA applied wrongly (scale,
# transposition, a layer missed) or not at all moves them by more than 1e-2 of the norm.
SESSION_RTOL = 1e-3


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_each_session_renders_with_its_own_lora_like_a_generator_loaded_with_it(loras):
    engine = _engine(loras)
    acme, globex, base = _render(engine, "acme"), _render(engine, "globex"), _render(engine)
    assert torch.equal(base, _render(GeneratorEngine(ModelSpec(name="tiny", seed=SEED))))  # "": the base, exactly
    for name, got in (("acme", acme), ("globex", globex)):
        assert torch.equal(got, _render(_peft_engine(loras[name])))  # bit for bit: the same products
        assert _relative(got, _render(_merged_engine(loras[name]))) < SESSION_RTOL
    assert _relative(acme, globex) > 1e-2 and _relative(acme, base) > 1e-2 and _relative(globex, base) > 1e-2
    # bit-identical to a generator that holds this LoRA alone: nothing of another LoRA leaks in
    assert torch.equal(acme, _render(_engine(loras, ("acme",), max_loras=1), "acme"))


def test_switching_back_and_forth_and_lru_eviction_beyond_max_loras(loras):
    from avatar import metrics

    engine = _engine(loras, ("acme", "globex", "initech"), max_loras=2)
    loads_before = metrics.LORA_LOADS.labels("acme")._value.get()
    first = {name: _render(engine, name) for name in ("acme", "globex")}
    assert engine.loaded_loras() == ["globex", "acme"] and engine.loras.evictions == 0
    initech = _render(engine, "initech")  # a third: acme, the least recently used, is dropped
    assert engine.loras.loaded() == ["initech", "globex"] and engine.loras.evictions == 1
    assert engine.loras.registered["acme"].weights is None
    again = _render(engine, "acme")  # back: loaded again from its file, globex dropped
    assert engine.loras.loaded() == ["acme", "initech"] and engine.loras.loads == 4
    assert torch.equal(again, first["acme"]) and not torch.equal(initech, first["globex"])
    assert torch.equal(_render(engine, "globex"), first["globex"])
    assert metrics.LORA_LOADS.labels("acme")._value.get() - loads_before == 2
    assert metrics.LORAS_LOADED._value.get() == 2


def test_sessions_of_different_loras_run_at_once_on_one_generator(loras):
    """Blocks of two sessions interleaved, then in two threads at once: each equals its solo run."""
    engine = _engine(loras)
    solo = {name: _render(engine, name) for name in ("acme", "globex")}
    text, ref, motion, audio = _inputs()
    sessions = {name: engine.open_session(_job(), text, ref, motion, lora_id=name) for name in solo}
    assert engine.loras.in_use() == {"acme": 1, "globex": 1}
    out = {name: [] for name in solo}
    for a in audio:
        for name, session in sessions.items():
            out[name].append(session.generate_block(a))
    for session in sessions.values():
        session.close()
    assert engine.loras.in_use() == {}
    assert all(torch.equal(torch.stack(out[name]), solo[name]) for name in solo)

    results, errors = {}, []

    def run(name):
        try:
            results[name] = _render(engine, name)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in (*solo, *solo)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(torch.equal(results[name], solo[name]) for name in solo)


def test_a_lora_in_use_is_never_dropped(loras):
    engine = _engine(loras, ("acme", "globex", "initech"), max_loras=2)
    text, ref, motion, _ = _inputs()
    held = [engine.open_session(_job(), text, ref, motion, lora_id=n) for n in ("acme", "globex")]
    with pytest.raises(ResourceExhausted, match=r"'initech' is not loaded and all 2 loaded LoRAs .* in use"):
        engine.open_session(_job(), text, ref, motion, lora_id="initech")
    held[0].close()
    held[0].close()  # closing twice releases once
    assert engine.loras.in_use() == {"globex": 1}
    engine.open_session(_job(), text, ref, motion, lora_id="initech").close()
    assert engine.loras.loaded() == ["initech", "globex"]
    held[1].close()


def test_unknown_lora_id_names_the_registered_ones(loras):
    engine = _engine(loras)
    with pytest.raises(InvalidInput, match=r"unknown lora_id 'nobody': this generator serves acme, globex"):
        _render(engine, "nobody")
    assert engine.loras.in_use() == {} and engine.loras.loaded() == []
    plain = GeneratorEngine(ModelSpec(name="tiny", seed=SEED))
    with pytest.raises(InvalidInput, match=r"'acme': this generator serves no per-avatar LoRAs .*--avatar-lora"):
        _render(plain, "acme")
    text, ref, motion, _ = _inputs()
    with pytest.raises(InvalidInput, match="infer_frames"):  # a refused session gives its LoRA back
        engine.open_session(Job(**{**_job().__dict__, "infer_frames": 13}), text, ref, motion, lora_id="acme")
    assert engine.loras.in_use() == {}


def _bad_loras(tmp_path):
    """(what is wrong, file, the reason registration must give)."""
    model = _dit()
    good = write_lora(tmp_path / "good.safetensors", model, rank=4)
    cases = []

    def case(label, tensors, reason):
        path = tmp_path / f"{label}.safetensors"
        save_file(tensors, str(path))
        cases.append((label, path, reason))

    key = "base_model.model.blocks.0.self_attn.q.lora_"
    case(
        "missing pair",
        {k: v for k, v in good.items() if not k.startswith(key)},
        r"cover 51 of the 52 .*blocks\.0\.self_attn\.q",
    )
    case("half pair", {k: v for k, v in good.items() if not k.startswith(key + "B")}, "without their pair")
    case("wrong shape", {**good, key + "A.default.weight": torch.zeros(4, 48)}, r"shape mismatch.*expected A \(4, 64\)")
    case(
        "two ranks",
        {**good, key + "A.default.weight": torch.zeros(8, 64), key + "B.default.weight": torch.zeros(64, 8)},
        "ranks differ",
    )
    case("base tensors", {**good, "base_model.model.blocks.0.norm3.weight": torch.ones(64)}, "base-model tensor")
    case(
        "unknown layer",
        {
            **good,
            "base_model.model.head.head.lora_A.default.weight": torch.zeros(4, 64),
            "base_model.model.head.head.lora_B.default.weight": torch.zeros(64, 4),
        },
        "match no",
    )
    case("integer", {**good, key + "A.default.weight": torch.zeros(4, 64, dtype=torch.int32)}, "dtype int32")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "good.safetensors").read_bytes()[:-1000])
    cases.append(("truncated", truncated, "truncated"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 12) + b"not json at all")
    cases.append(("not safetensors", garbage, "corrupt safetensors header"))
    cases.append(("no file", tmp_path / "absent.safetensors", "no such file"))
    return cases


def test_a_bad_lora_is_refused_at_registration_with_the_reason(tmp_path):
    for label, path, reason in _bad_loras(tmp_path):
        spec = ModelSpec(name="tiny", seed=SEED, avatar_loras=(("acme", str(path)),))
        with pytest.raises(WeightsError, match=reason) as failure:
            GeneratorEngine(spec)
        assert str(failure.value).startswith("avatar LoRA acme") and str(path) in str(failure.value), label


def test_bad_names_and_max_loras_are_refused():
    with pytest.raises(InvalidInput, match="avatar LoRA name 'a b'"):
        ModelSpec(avatar_loras=(("a b", "x"),))
    with pytest.raises(InvalidInput, match="acme is registered twice"):
        ModelSpec(avatar_loras=(("acme", "x"), ("acme", "y")))
    with pytest.raises(InvalidInput, match="--max-loras must be at least 1"):
        ModelSpec(max_loras=0)


def test_without_avatar_loras_the_model_has_no_hooks(loras):
    plain = GeneratorEngine(ModelSpec(name="tiny", seed=SEED))
    assert plain.loras is None and plain.loaded_loras() == []
    assert not any(m._forward_hooks for m in plain.dit.modules())
    hooked = _engine(loras)
    assert sum(bool(m._forward_hooks) for m in hooked.dit.modules()) == 52


def test_generator_rpcs_take_lora_id_and_list_the_loras(loras):
    """GeneratorService in-process: Generate's SessionStart.lora_id, Loras for a router."""
    import asyncio

    from avatar import wire
    from avatar.grpc_util import create_server
    from avatar.services.generator.server import GeneratorServicer
    from avatar.v1 import encoder_pb2, generator_pb2, generator_pb2_grpc

    engine = _engine(loras, ("acme", "globex", "initech"), max_loras=2)
    text, ref, motion, audio = _inputs()

    def start(lora_id):
        return generator_pb2.GeneratorInput(
            start=generator_pb2.SessionStart(
                job=_job().to_proto(),
                text=wire.to_proto(text),
                ref_latent=wire.to_proto(ref),
                motion_latents=wire.to_proto(motion),
                lora_id=lora_id,
            )
        )

    async def main():
        server, port = create_server("127.0.0.1:0")
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(engine), server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = generator_pb2_grpc.GeneratorServiceStub(ch)
                empty = await stub.Loras(generator_pb2.LorasRequest())
                assert (list(empty.registered), list(empty.loaded), empty.max_loras) == (
                    ["acme", "globex", "initech"],
                    [],
                    2,
                )
                call = stub.Generate()
                await call.write(start("globex"))
                assert (await call.read()).WhichOneof("event") == "ready"
                busy = await stub.Loras(generator_pb2.LorasRequest())
                assert list(busy.loaded) == ["globex"] and dict(busy.in_use) == {"globex": 1} and busy.loads == 1
                for a in audio:
                    await call.write(
                        generator_pb2.GeneratorInput(audio=encoder_pb2.AudioFeatures(features=wire.to_proto(a)))
                    )
                await call.done_writing()
                got = torch.stack([wire.tensor_arg((await call.read()).block.latent, "latent") for _ in audio])
                assert torch.equal(got, _render(engine, "globex"))
                refused = stub.Generate()
                await refused.write(start("nobody"))
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await refused.read()
                assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert (
                    "unknown lora_id 'nobody': this generator serves acme, globex, initech" in failure.value.details()
                )
                after = await stub.Loras(generator_pb2.LorasRequest())
                assert dict(after.in_use) == {} and list(after.loaded) == ["globex"] and after.evictions == 0
        finally:
            await server.stop(0)

    asyncio.run(main())


# --- through the mesh: gateway -> generator over gRPC ----------------------------------------


def _request(lora_id: str, audio: bytes):
    from avatar.v1 import avatar_pb2

    return avatar_pb2.GenerateRequest(
        image=(ASSETS / "astronaut.png").read_bytes(), audio=audio, size="64*64", seed=7, lora_id=lora_id
    )


def _video(address: str, lora_id: str, audio: bytes, path) -> bytes:
    s = generate(address, _request(lora_id, audio), timeout_s=120)
    check_video(s.write_mp4(path), 1.0)
    return b"".join(f.data for _, f in s.fragments)


def test_avatars_through_the_mesh_switch_back_and_forth(start_service, tmp_path):
    from avatar.v1 import avatar_pb2, avatar_pb2_grpc

    paths = {}
    for i, name in enumerate(("acme", "globex")):
        paths[name] = tmp_path / f"{name}.safetensors"
        write_lora(paths[name], random_dit("tiny", "cpu", torch.float32, seed=0), rank=4, seed=20 + i, scale=0.2)
    server = start_service(
        "all",
        *("--avatar-lora", f"acme={paths['acme']}", "--avatar-lora", f"globex={paths['globex']}"),
        *("--max-loras", "1", "--metrics-port", "0"),
        trace=True,
    )
    audio = tone_wav(1.0)
    videos = {}
    for n, lora_id in enumerate(("acme", "globex", "acme", "")):
        videos.setdefault(lora_id, []).append(_video(server.address, lora_id, audio, tmp_path / f"{n}.mp4"))
    # acme again after globex took the only slot: reloaded, the same video byte for byte
    assert videos["acme"][0] == videos["acme"][1]
    assert len({videos["acme"][0], videos["globex"][0], videos[""][0]}) == 3

    with grpc.insecure_channel(server.address) as ch:
        stub = avatar_pb2_grpc.AvatarServiceStub(ch)
        for lora_id, words in (
            ("nobody", "unknown lora_id 'nobody': this generator serves acme, globex"),
            ("a b", "cannot name an avatar LoRA"),
        ):
            with pytest.raises(grpc.RpcError) as failure:
                list(stub.Generate(_request(lora_id, audio), timeout=60))
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in failure.value.details()

        def converse():
            yield avatar_pb2.ConverseRequest(
                header=avatar_pb2.ConverseHeader(
                    image=(ASSETS / "astronaut.png").read_bytes(), size="64*64", sample_rate=16000, lora_id="nobody"
                )
            )
            yield avatar_pb2.ConverseRequest(end=avatar_pb2.EndOfStream())

        with pytest.raises(grpc.RpcError) as failure:
            list(stub.Converse(converse(), timeout=60))
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "this generator serves acme, globex" in failure.value.details()

    # grpcurl, as docs/operations.md shows it: lora_id in the JSON request
    body = json.dumps(
        {
            "image": base64.b64encode((ASSETS / "astronaut.png").read_bytes()).decode(),
            "audio": base64.b64encode(audio).decode(),
            "size": "64*64",
            "seed": 7,
            "lora_id": "globex",
        }
    )
    out = grpcurl("-d", "@", server.address, "avatar.v1.AvatarService/Generate", stdin=body)
    assert out.returncode == 0, out.stderr
    frags = [base64.b64decode(m["fragment"]["data"]) for m in _json_stream(out.stdout) if "fragment" in m]
    assert b"".join(frags) == videos["globex"][0]
    body = json.dumps(
        {
            "image": base64.b64encode((ASSETS / "astronaut.png").read_bytes()).decode(),
            "audio": base64.b64encode(audio).decode(),
            "lora_id": "nobody",
        }
    )
    out = grpcurl("-d", "@", server.address, "avatar.v1.AvatarService/Generate", stdin=body)
    assert out.returncode != 0 and "InvalidArgument" in out.stderr and "serves acme, globex" in out.stderr

    samples = metrics_of(server)
    # acme, globex, acme, base, globex (grpcurl) with one LoRA held: every LoRA session loaded its own
    assert samples['avatar_lora_loads_total{lora_id="acme"}'] == 2
    assert samples['avatar_lora_loads_total{lora_id="globex"}'] == 2
    assert samples["avatar_lora_evictions_total"] == 3 and samples["avatar_loras_loaded"] == 1
    assert samples['avatar_lora_sessions_total{lora_id="globex"}'] == 2
    blocks = [sp for sp in server.spans() if sp["name"] == "dit_block"]
    assert {sp["attributes"].get("lora_id") for sp in blocks} == {"acme", "globex", ""}


def test_a_router_reads_a_generators_loras_with_grpcurl(start_service, tmp_path):
    path = tmp_path / "acme.safetensors"
    write_lora(path, random_dit("tiny", "cpu", torch.float32, seed=0), rank=4)
    generator = start_service("generator", "--avatar-lora", f"acme={path}", "--max-loras", "3")
    out = grpcurl("-d", "{}", generator.address, "avatar.v1.GeneratorService/Loras")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["registered"] == ["acme"] and reply["max_loras"] == 3 and "loaded" not in reply


def grpcurl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    from test_grpcurl import GRPCURL

    cmd = [str(GRPCURL), "-plaintext", "-max-msg-sz", str(64 << 20), *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def _json_stream(text: str) -> list[dict]:
    decoder, i, out = json.JSONDecoder(), 0, []
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        message, i = decoder.raw_decode(text, i)
        out.append(message)
    return out


@pytest.mark.mesh
def test_cli_generate_renders_an_avatar_and_refuses_an_unknown_one(tmp_path, env):
    """`avatar generate` without --server: its own mesh registers --avatar-lora, --lora-id picks it."""
    path = tmp_path / "acme.safetensors"
    write_lora(path, random_dit("tiny", "cpu", torch.float32, seed=0), rank=4, scale=0.2)
    (tmp_path / "hi.wav").write_bytes(tone_wav(1.0))
    common = ["generate", "--image", str(ASSETS / "astronaut.png"), "--audio", str(tmp_path / "hi.wav")]
    common += ["--size", "64*64", "--avatar-lora", f"acme={path}"]
    for lora_id, rc, words in (("nobody", 2, "unknown lora_id 'nobody': this generator serves acme"), ("acme", 0, "")):
        out = tmp_path / f"{lora_id}.mp4"
        r = subprocess.run(
            [*AVATAR, *common, "--lora-id", lora_id, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert r.returncode == rc, r.stderr
        if rc:
            assert words in r.stderr and r.stderr.count("\n") == 1 and not out.exists(), r.stderr
    check_video(tmp_path / "acme.mp4", 1.0)
    assert json.loads((tmp_path / "acme.json").read_text())["parameters"]["lora_id"] == "acme"


def test_serve_refuses_a_bad_lora_at_start_with_one_line(tmp_path, env):
    bad = tmp_path / "bad.safetensors"
    tensors = write_lora(bad, random_dit("tiny", "cpu", torch.float32, seed=0), rank=4)
    save_file({k: v for k, v in tensors.items() if ".blocks.1.ffn.0." not in k}, str(bad))
    for flag, words in (
        (f"acme={bad}", f"avatar LoRA acme ({bad}): 102 LoRA tensors cover 51 of the 52"),
        ("acme", "expected NAME=PATH"),
        (f"a/b={bad}", "avatar LoRA name 'a/b'"),
        (f"acme={bad} --role gateway", "pass it to --role generator, not gateway"),
    ):
        r = subprocess.run(
            [*AVATAR, "serve", "--listen", "127.0.0.1:0", "--avatar-lora", *flag.split()],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr, r.stderr
