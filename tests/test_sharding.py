"""FSDP2-sharded generator on 2 CPU ranks over gloo: the same latents as one process (float32 and
FP8 weights), each rank holding part of the weights; --parallel validation."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ckpt_fixtures.dit import one_torch_thread  # noqa: F401 (autouse)
from conftest import free_port, run_ranks

from avatar.jobs import Job
from avatar.presets import ModelSpec
from avatar.services.generator.distributed.parallel_config import ParallelConfig
from avatar.services.generator.engine import GeneratorEngine

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 4  # 24 frames a clip = 2 blocks: two clips, so the sink refresh runs

# One rank. Both ranks first run the DiT's forward directly (in lockstep); then rank 0 drives
# ShardedEngine as the gRPC servicer would (two sessions interleaved, a refused one between)
# while rank 1 runs the worker loop; the same again with FP8 weights.
RANK = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from avatar.errors import InvalidInput
    from avatar.jobs import Job
    from avatar.presets import GeneratorOptions, ModelSpec
    from avatar.services.generator.distributed import leave_group, sharding
    from avatar.services.generator.distributed.parallel_config import ParallelConfig
    from avatar.services.generator.kv_cache import KVCache, KVCacheSpec
    out, blocks = sys.argv[1], int(sys.argv[2])

    def job(seed, steps=2):
        return Job(width=64, height=64, fps=25, infer_frames=24, latent_frames_per_block=3, num_blocks=blocks,
                   total_frames=blocks * 12, sample_steps=steps, seed=seed, model="tiny")

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(7, 32, generator=g), torch.randn(16, 1, 8, 8, generator=g),
                torch.randn(16, 19, 8, 8, generator=g), [torch.randn(12, 5, 32, generator=g) for _ in range(blocks)])

    def forward(dit):
        text, ref, motion, audio = inputs(5)
        kv = KVCache(KVCacheSpec.for_model(dit, 8, 8, 6, num_sets=2), dit.dtype, dit.device)
        context = dit.embed_text(text[None])
        dit.prefill_sink(ref[None], motion[None], context, kv)
        tokens = dit.encode_audio(audio[0].permute(1, 2, 0)[None])
        x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(6))
        return dit.forward(x, torch.full((1,), 500.0), context, tokens, kv, 1, 0, 31)

    spec = ModelSpec(name="tiny", seed=0)
    group, spec = sharding.init_shard_group(spec, ParallelConfig(fsdp=2))
    result, meta = {}, {}
    lean = GeneratorOptions(cache_sets=1, kv_dtype="float8_e4m3fn")   # the 24 GiB layout's settings
    variants = (("f32", spec), ("fp8", spec.with_(fp8=True)), ("lean", spec.with_(fp8=True, generator_options=lean)))
    for name, s in variants:
        engine = sharding.build_sharded_engine(s, group.mesh)
        meta[name + "_local_bytes"] = sharding.local_weight_bytes(engine.dit)
        result[name + "_forward"] = forward(engine.dit)
        if group.rank:
            sharding.run_shard_worker(group, engine)
            continue
        shard = sharding.ShardedEngine(group, engine)
        from avatar.metrics import GENERATOR_PARALLEL
        meta["gauge_fsdp"] = GENERATOR_PARALLEL.labels("fsdp")._value.get()
        text, ref, motion, audio = inputs(1)
        a = shard.open_session(job(420), text, ref, motion)
        try:
            shard.open_session(job(420), text, ref[:, :, :4], motion)
        except InvalidInput as e:
            meta[name + "_refused"] = str(e)
        text2, ref2, motion2, audio2 = inputs(2)
        b = shard.open_session(job(7, steps=3), text2, ref2, motion2)
        got_a, got_b = [], []
        for i in range(blocks):
            got_a.append(a.generate_block(audio[i]))
            got_b.append(b.generate_block(audio2[i]))
        a.close(); b.close()
        result[name + "_a"], result[name + "_b"] = got_a, got_b
        shard._call(sharding.Stop()).result(60)
    if group.rank == 0:
        torch.save(result, out + ".pt")
    json.dump(meta, open(f"{out}.{group.rank}.json", "w"))
    leave_group(group.control)  # a bare destroy aborted rank 1 at exit in about 1 run of 10
""")


def _job(seed, steps=2):
    return Job(
        width=64,
        height=64,
        fps=25,
        infer_frames=24,
        latent_frames_per_block=3,
        num_blocks=BLOCKS,
        total_frames=BLOCKS * 12,
        sample_steps=steps,
        seed=seed,
        model="tiny",
    )


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(7, 32, generator=g),
        torch.randn(16, 1, 8, 8, generator=g),
        torch.randn(16, 19, 8, 8, generator=g),
        [torch.randn(12, 5, 32, generator=g) for _ in range(BLOCKS)],
    )


def run_shards(n: int, tmp_path: Path, timeout: float = 240.0):
    """n ranks as torchrun starts them (env rendezvous on loopback); always reaped."""
    import json

    script = tmp_path / "rank.py"
    script.write_text(RANK)
    out = tmp_path / "shard"
    ranks = run_ranks(n, [sys.executable, str(script), str(out), str(BLOCKS)], timeout, "shard group")
    for r, (code, log) in enumerate(ranks):
        assert code == 0, f"rank {r} exited {code}:\n{log[-3000:]}"
    metas = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(n)]
    return torch.load(f"{out}.pt"), metas


def _session(engine, seed, input_seed, steps):
    text, ref, motion, audio = _inputs(input_seed)
    session = engine.open_session(_job(seed, steps), text, ref, motion)  # the engine's cache sets and dtype
    try:
        return [session.generate_block(a) for a in audio]
    finally:
        session.close()


def _forward(dit):
    from avatar.services.generator.kv_cache import KVCache, KVCacheSpec

    text, ref, motion, audio = _inputs(5)
    kv = KVCache(KVCacheSpec.for_model(dit, 8, 8, 6, num_sets=2), dit.dtype, dit.device)
    context = dit.embed_text(text[None])
    dit.prefill_sink(ref[None], motion[None], context, kv)
    tokens = dit.encode_audio(audio[0].permute(1, 2, 0)[None])
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    return dit.forward(x, torch.full((1,), 500.0), context, tokens, kv, 1, 0, 31)


@pytest.mark.mesh
def test_sharded_generator_equals_one_process_bit_for_bit(tmp_path):
    """FSDP2 all-gathers the exact weights and every rank runs the same operations, so on CPU
    float32 the latents are bit-identical, with FP8 weights too (quantised before sharding), and
    with the 24 GiB layout's one FP8 cache set (--fp8 --cache-sets 1 --kv-fp8)."""
    from avatar.presets import GeneratorOptions

    got, metas = run_shards(2, tmp_path)
    lean = GeneratorOptions(cache_sets=1, kv_dtype="float8_e4m3fn")  # --cache-sets 1 --kv-fp8: the 24 GiB layout
    for name, spec in (
        ("f32", ModelSpec(name="tiny", seed=0)),
        ("fp8", ModelSpec(name="tiny", seed=0, fp8=True)),
        ("lean", ModelSpec(name="tiny", seed=0, fp8=True, generator_options=lean)),
    ):
        engine = GeneratorEngine(spec)
        want_forward = _forward(engine.dit)
        assert torch.equal(got[name + "_forward"], want_forward), name
        want_a, want_b = _session(engine, 420, 1, 2), _session(engine, 7, 2, 3)
        assert len(got[name + "_a"]) == len(got[name + "_b"]) == BLOCKS
        for a, b in zip(got[name + "_a"] + got[name + "_b"], want_a + want_b):
            assert a.shape == (16, 3, 8, 8)
            assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item()}"
        assert not torch.equal(got[name + "_a"][0], got[name + "_a"][2])  # not trivially equal
        # a refused session (bad conditioning) ends only itself, on every rank alike
        assert "ref_latent must be [16, 1, 8, 8]" in metas[0][name + "_refused"]
        assert metas[0]["gauge_fsdp"] == 2  # avatar_generator_parallel_degree{kind="fsdp"}
        # each rank holds part of the weights: together about one copy, each well under it
        full = sum(t.numel() * t.element_size() for t in (*engine.dit.parameters(), *engine.dit.buffers()))
        local = [m[name + "_local_bytes"] for m in metas]
        assert all(b < 0.7 * full for b in local), (local, full)
        assert full <= sum(local) <= 1.1 * full, (local, full)
    assert torch.allclose(got["f32_a"][0], got["fp8_a"][0], atol=0.5)  # FP8 really differs, a little
    assert not torch.equal(got["f32_a"][0], got["fp8_a"][0])


# ---------------------------------------------------------------- --parallel


def test_parallel_config_parses_and_maps_ranks():
    c = ParallelConfig.parse("tpp=2,fsdp=2")
    assert (c.tpp, c.fsdp, c.world_size, c.sharded) == (2, 2, 4, True)
    assert [c.coordinates(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert c.shard_ranks(1) == [2, 3]
    assert ParallelConfig.parse(" fsdp=4 ") == ParallelConfig(tpp=1, fsdp=4)
    assert ParallelConfig.for_world(None, 4) == ParallelConfig(tpp=4)  # no flag: TPP over every rank
    assert ParallelConfig.for_world(None, 1) == ParallelConfig()
    assert ParallelConfig.for_world("fsdp=2", 2).describe() == "tpp=1,fsdp=2"


@pytest.mark.parametrize(
    "text, world, message",
    [
        ("tpp=2,fsdp=2", 2, "--parallel tpp=2,fsdp=2: tpp 2 x fsdp 2 = 4 ranks, but 2 processes"),
        ("fsdp=2", 1, "= 2 ranks, but 1 process (start it with torchrun --nproc-per-node N)"),
        ("fsdp=3", 4, "tpp 1 x fsdp 3 = 3 ranks, but 4 processes"),
        ("pp=2", 2, "unknown name 'pp'; use tpp, fsdp"),
        ("ulysses=2", 2, "Ulysses sequence parallelism is not built"),
        ("fsdp=two", 2, "fsdp needs a whole number"),
        ("fsdp", 2, "fsdp needs a whole number"),
        ("fsdp=0", 2, "degrees are whole numbers of at least 1"),
        ("fsdp=2,fsdp=2", 4, "fsdp is given twice"),
        (",", 1, "name at least one degree"),
    ],
)
def test_parallel_config_refuses_with_the_degrees(text, world, message):
    with pytest.raises(ValueError) as info:
        ParallelConfig.for_world(text, world)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_sharding_refuses_options_it_does_not_combine_with():
    from avatar.errors import InvalidInput
    from avatar.presets import GeneratorOptions
    from avatar.services.generator.distributed.sharding import check_sharding

    check_sharding(ModelSpec(name="tiny", fp8=True))  # FP8 weights shard fine
    with pytest.raises(InvalidInput, match="--compile with --parallel fsdp"):
        check_sharding(ModelSpec(name="tiny", compile=True))
    with pytest.raises(InvalidInput, match="already sharded"):
        check_sharding(ModelSpec(name="tiny", generator_options=GeneratorOptions(offload_text_projections=True)))
    with pytest.raises(InvalidInput, match="--fused-norms with --parallel fsdp"):
        check_sharding(ModelSpec(name="tiny", fp8=True, generator_options=GeneratorOptions(fused_norms=True)))


# ---------------------------------------------------------------- through `avatar serve`


def _latents(address: str, job: Job, inputs) -> list[torch.Tensor]:
    """A GeneratorService session straight to a generator: every block's latent."""
    import grpc

    from avatar import wire
    from avatar.grpc_util import MESSAGE_OPTIONS
    from avatar.v1 import encoder_pb2, generator_pb2, generator_pb2_grpc

    text, ref, motion, audio = inputs
    messages = [
        generator_pb2.GeneratorInput(
            start=generator_pb2.SessionStart(
                job=job.to_proto(),
                text=wire.to_proto(text),
                ref_latent=wire.to_proto(ref),
                motion_latents=wire.to_proto(motion),
            )
        ),
        *(
            generator_pb2.GeneratorInput(audio=encoder_pb2.AudioFeatures(first_frame=12 * i, features=wire.to_proto(a)))
            for i, a in enumerate(audio)
        ),
    ]
    with grpc.insecure_channel(address, options=MESSAGE_OPTIONS) as ch:
        outs = generator_pb2_grpc.GeneratorServiceStub(ch).Generate(iter(messages), timeout=180)
        return [wire.from_proto(o.block.latent) for o in outs if o.WhichOneof("event") == "block"]


@pytest.mark.mesh
def test_torchrun_serve_with_parallel_fsdp_gives_the_one_process_latents(tmp_path, env, start_service):
    """`torchrun --nproc-per-node 2 avatar serve --role generator --parallel fsdp=2` (2 CPU ranks)
    answers a session with the same latents, bit for bit, as a one-process generator; a bad input
    is INVALID_ARGUMENT and the group goes on; SIGTERM stops both ranks."""
    import signal

    import grpc
    from conftest import AVATAR, wait_serving

    plain = start_service("generator", wait=False)
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "generator-fsdp.log"
    torchrun = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--no-python",
    ]
    with open(log, "wb") as out:
        gen = subprocess.Popen(
            [
                *torchrun,
                *AVATAR,
                "serve",
                "--role=generator",
                f"--listen={address}",
                "--parallel=fsdp=2",
                f"--trace-file={tmp_path / 'spans.jsonl'}",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_serving(plain.address, 120, plain.proc, plain.log)
        wait_serving(address, 180, gen, log)
        text, ref, motion, audio = _inputs(3)
        with pytest.raises(grpc.RpcError) as err:
            _latents(address, _job(1), (text, ref[:, :, :4], motion, audio))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ref_latent must be" in err.value.details()
        sharded = _latents(address, _job(420), (text, ref, motion, audio))
        one = _latents(plain.address, _job(420), (text, ref, motion, audio))
        assert len(sharded) == len(one) == BLOCKS
        for a, b in zip(sharded, one):
            assert torch.equal(a, b), f"max diff {(a - b).abs().max().item()}"
        gen.send_signal(signal.SIGTERM)
        gen.wait(timeout=60)
        # each block's lockstep command is a span inside the block's dit_block span
        import json

        spans = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
        blocks = {s["span_id"] for s in spans if s["name"] == "dit_block"}
        steps = [s for s in spans if s["name"] == "fsdp_command" and s["attributes"].get("command") == "Step"]
        assert len(steps) == BLOCKS and all(s["parent_id"] in blocks for s in steps), spans
        text = log.read_text()
        assert "FSDP shard 1/2 ready" in text and "FSDP shard 1: stop" in text, text[-3000:]
        assert "avatar serve: stopping" in text and "[rank1]" not in text, text[-3000:]
    finally:
        if gen.poll() is None:
            os.killpg(gen.pid, signal.SIGKILL)
            gen.wait()


DIE = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from avatar.jobs import Job
    from avatar.presets import ModelSpec
    from avatar.services.generator.distributed import sharding
    from avatar.services.generator.distributed.parallel_config import ParallelConfig

    group, spec = sharding.init_shard_group(ModelSpec(name="tiny", seed=0), ParallelConfig(fsdp=2))
    engine = sharding.build_in_turn(group, spec)
    g = torch.Generator().manual_seed(1)
    text, ref = torch.randn(7, 32, generator=g), torch.randn(16, 1, 8, 8, generator=g)
    motion = torch.randn(16, 19, 8, 8, generator=g)
    job = Job(width=64, height=64, infer_frames=24, sample_steps=2, num_blocks=3, total_frames=36, model="tiny")
    if group.rank:
        apply = sharding._apply
        def dying(group, engine, sessions, command):
            if isinstance(command, sharding.Step) and sessions[command.sid].block_index == 1:
                raise RuntimeError("injected crash")   # not an agreed error: this rank exits
            return apply(group, engine, sessions, command)
        sharding._apply = dying
        sharding.run_shard_worker(group, engine)
    else:
        shard = sharding.ShardedEngine(group, engine)
        s = shard.open_session(job, text, ref, motion)
        s.generate_block(torch.randn(12, 5, 32, generator=g))
        print("BLOCK 0 OK", flush=True)
        try:
            s.generate_block(torch.randn(12, 5, 32, generator=g))
        except Exception as e:
            print("BLOCK 1 FAILED:", e, flush=True)
        import time
        time.sleep(30)   # rank 0 exits on its own (status 1): the orchestrator restarts the group
""")


@pytest.mark.mesh
def test_a_shard_that_fails_takes_the_group_down_and_rank_0_exits(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DIE)
    ranks = run_ranks(2, [sys.executable, str(script)], 120, "the group")
    logs = [log for _, log in ranks]
    assert [code for code, _ in ranks] == [1, 1], logs
    assert "BLOCK 0 OK" in logs[0] and "BLOCK 1 FAILED: a generator shard failed" in logs[0], logs[0][-3000:]
    assert "restarting the group" in logs[0]
    assert "FSDP shard 1 failed; exiting so the group restarts" in logs[1] and "injected crash" in logs[1]


def test_only_errors_raised_before_any_collective_are_agreed():
    """A refusal every rank makes alike keeps the group; out of memory inside a forward may hit
    one rank only (the others wait in an all-gather), so the rank exits instead."""
    from avatar.errors import InvalidInput, ResourceExhausted
    from avatar.services.generator.distributed.sharding import _agreed

    assert _agreed(InvalidInput("bad ref_latent")) and _agreed(ResourceExhausted("not enough free GPU memory"))
    oom = ResourceExhausted("ran out of GPU memory")
    oom.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert not _agreed(oom) and not _agreed(RuntimeError("a kernel failed"))
