"""Multi-GPU generator (TPP) on CPU ranks over gloo: N local processes give the same latents, bit
for bit, as one GeneratorSession with N cache sets; wrong step counts are refused."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ckpt_fixtures.dit import fail_holding_a_cache_view, one_torch_thread  # noqa: F401 (one_torch_thread: autouse)

from avatar.jobs import Job
from avatar.presets import ModelSpec
from avatar.services.generator.engine import GeneratorEngine, GeneratorSession

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 4  # 24 frames a clip = 2 blocks of 3 latent frames: two clips, so the sink refresh runs

# One rank of the group. Rank 0 drives TPPEngine as the gRPC servicer would: session 1 submits
# every block at once (they overlap across ranks), session 2 runs block by block; then the refusal.
RANK = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from avatar.errors import InvalidInput
    from avatar.jobs import Job
    from avatar.presets import ModelSpec
    from avatar.services.generator.distributed import tpp
    from avatar.services.generator.engine import GeneratorEngine
    out, blocks = sys.argv[1], int(sys.argv[2])

    def job(steps, seed):
        return Job(width=64, height=64, fps=25, infer_frames=24, latent_frames_per_block=3, num_blocks=blocks,
                   total_frames=blocks * 12, sample_steps=steps, seed=seed, model="tiny")

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(7, 32, generator=g), torch.randn(16, 1, 8, 8, generator=g),
                torch.randn(16, 19, 8, 8, generator=g), [torch.randn(12, 5, 32, generator=g) for _ in range(blocks)])

    group, spec = tpp.init_group(ModelSpec(name="tiny", seed=0))
    engine = GeneratorEngine(spec)
    if group.rank:
        run = tpp._denoise

        def failing(session, x, audio, index, first):   # a rank's failure: session seed 99, block 1
            if session.seed == 99 and index == 1 and group.rank == group.last:
                raise RuntimeError("injected failure")
            if session.seed == 98 and index == 1:
                os._exit(3)   # a rank that dies
            return run(session, x, audio, index, first)
        tpp._denoise = failing
        tpp.run_worker(group, engine)
    else:
        tppe = tpp.TPPEngine(group, engine)
        n = group.world_size
        if sys.argv[3] == "die":
            text, ref, motion, audio = inputs(1)
            s = tppe.open_session(job(n, 98), text, ref, motion)
            futures = [s.submit(a) for a in audio]
            with open(out + ".json", "w") as f:
                json.dump({"first": str(futures[0].result(timeout=60).shape)}, f)
            try:
                futures[1].result(timeout=60)
            except Exception as e:
                print("BLOCK 1 FAILED:", e, flush=True)
            import time
            time.sleep(30)   # rank 0 exits on its own (status 1) so the orchestrator restarts the group
            sys.exit(0)
        text, ref, motion, audio = inputs(1)
        s = tppe.open_session(job(n, 420), text, ref, motion)
        futures = [s.submit(a) for a in audio]
        first = [f.result(timeout=120) for f in futures]
        s.close()
        text, ref, motion, audio = inputs(2)
        s = tppe.open_session(job(n, 99), text, ref, motion)
        futures = [s.submit(a) for a in audio[:3]]
        errors = []
        for f in futures:
            try:
                f.result(timeout=120)
                errors.append(None)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        s.close()
        s = tppe.open_session(job(n, 7), text, ref, motion)
        second = [s.generate_block(a) for a in audio[:2]]
        s.close()
        refused = []
        for steps in (n - 1, n + 1):
            try:
                tppe.open_session(job(steps, 1), text, ref, motion).close()
            except InvalidInput as e:
                refused.append(str(e))
        torch.save({"first": first, "second": second}, out + ".pt")
        tppe.close()
        with open(out + ".json", "w") as f:
            json.dump({"refused": refused, "errors": errors}, f)
""")


def _job(steps, seed, blocks=BLOCKS):
    return Job(
        width=64,
        height=64,
        fps=25,
        infer_frames=24,
        latent_frames_per_block=3,
        num_blocks=blocks,
        total_frames=blocks * 12,
        sample_steps=steps,
        seed=seed,
        model="tiny",
    )


def _inputs(seed, blocks=BLOCKS):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(7, 32, generator=g),
        torch.randn(16, 1, 8, 8, generator=g),
        torch.randn(16, 19, 8, 8, generator=g),
        [torch.randn(12, 5, 32, generator=g) for _ in range(blocks)],
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(n: int, tmp_path: Path, timeout: float = 120.0, mode: str = "run") -> tuple[dict, dict]:
    """Starts n ranks as torchrun would (env rendezvous on loopback); always reaps them."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    out = tmp_path / f"tpp{n}"
    port = _free_port()
    procs = []
    try:
        for r in range(n):
            env = {
                **os.environ,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(n),
                "LOCAL_WORLD_SIZE": str(n),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(out), str(BLOCKS), mode],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + timeout
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode())
            except subprocess.TimeoutExpired:
                pytest.fail(f"TPP group of {n} did not finish in {timeout:.0f} s")
        if mode == "die":
            return {"codes": [p.returncode for p in procs], "log": logs[0]}, json.loads(Path(f"{out}.json").read_text())
        for r, (p, log) in enumerate(zip(procs, logs)):
            assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{log[-3000:]}\nrank 0:\n{logs[0][-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return torch.load(f"{out}.pt"), json.loads(Path(f"{out}.json").read_text())


@pytest.fixture(scope="module")
def engine():
    return GeneratorEngine(ModelSpec(name="tiny", seed=0))


def _reference(engine, steps, seed, input_seed, blocks):
    text, ref, motion, audio = _inputs(input_seed)
    session = GeneratorSession(engine, _job(steps, seed), text, ref, motion, cache_sets=steps)
    try:
        return [session.generate_block(a) for a in audio[:blocks]]
    finally:
        session.close()


@pytest.mark.parametrize("n", [2, 3])
def test_tpp_matches_one_process_with_a_cache_set_per_step(engine, tmp_path, n):
    got, meta = run_group(n, tmp_path)
    first = _reference(engine, n, 420, 1, BLOCKS)
    second = _reference(engine, n, 7, 2, 2)
    assert len(got["first"]) == BLOCKS and len(got["second"]) == 2
    for a, b in zip(got["first"] + got["second"], first + second):
        assert a.shape == (16, 3, 8, 8) and a.dtype == torch.float32
        assert torch.equal(a, b), f"max diff {(a - b).abs().max().item()}"
    # not trivially equal: blocks differ from each other and from the other seed
    assert not torch.equal(got["first"][0], got["first"][2])
    assert not torch.allclose(got["first"][0], got["second"][0])
    # a rank that fails ends that session's later blocks with its error; the next session is fine
    assert (
        meta["errors"][0] is None
        and meta["errors"][1:] == [f"RuntimeError: generator rank {n - 1}: injected failure (RuntimeError)"] * 2
    )
    assert len(meta["refused"]) == 2
    for msg, steps in zip(meta["refused"], (n - 1, n + 1)):
        assert f"sample_steps must be {n}, got {steps}" in msg


def test_a_rank_that_dies_fails_the_session_and_rank_0_exits(tmp_path):
    got, meta = run_group(2, tmp_path, timeout=60, mode="die")
    assert meta["first"] == "torch.Size([16, 3, 8, 8])"  # block 0 came back before rank 1 died
    assert got["codes"] == [1, 3], got["log"][-3000:]  # rank 0 exits 1: the orchestrator restarts
    assert "BLOCK 1 FAILED: a generator rank failed" in got["log"]
    assert "restarting the group" in got["log"]


def test_torchrun_generator_serves_the_mesh_and_stops_cleanly(tmp_path, env, clip_5s, start_service):
    """`torchrun --nproc-per-node 2 --no-python avatar serve --role generator` (as the manifests
    run it, on 2 CPU ranks) behind a gateway: a real Generate gives a valid MP4, a wrong step count
    is refused, SIGTERM stops every rank."""
    import signal

    import grpc
    from conftest import AVATAR, check_video, generate, wait_serving

    from avatar import wire
    from avatar.v1 import avatar_pb2, generator_pb2, generator_pb2_grpc

    enc = start_service("encoder", wait=False)
    dec = start_service("decoder", wait=False)
    gen_addr = f"127.0.0.1:{_free_port()}"
    log = tmp_path / "generator-tpp.log"
    torchrun = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "--no-python",
    ]
    with open(log, "wb") as out:
        gen = subprocess.Popen(
            [*torchrun, *AVATAR, "serve", "--role=generator", f"--listen={gen_addr}", "--max-sessions=1"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        gw = start_service("gateway", "--encoder", enc.address, "--generator", gen_addr, "--decoder", dec.address)
        for svc in (enc, dec):
            wait_serving(svc.address, 120, svc.proc, svc.log)
        wait_serving(gen_addr, 120, gen, log)
        request = avatar_pb2.GenerateRequest(
            image=(ROOT / "assets" / "astronaut.png").read_bytes(),
            audio=clip_5s.read_bytes(),
            preset="preview",
            size="64*64",
            seed=7,
            sample_steps=2,
            num_clip=1,
        )
        s = generate(gw.address, request)
        assert s.status.blocks >= 2 and len(s.fragments) == s.status.blocks
        check_video(s.write_mp4(tmp_path / "tpp.mp4"), s.status.frames / 25)

        # A step count the group cannot run is refused with the reason, through the gateway (which
        # waits for the session to be ready before it sends audio) and straight to the generator.
        request.sample_steps = 4
        with pytest.raises(grpc.RpcError) as err:
            generate(gw.address, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "sample_steps must be 2, got 4" in err.value.details()
        text, ref, motion, _ = _inputs(3, blocks=0)
        start = generator_pb2.GeneratorInput(
            start=generator_pb2.SessionStart(
                job=_job(4, 1).to_proto(),
                text=wire.to_proto(text),
                ref_latent=wire.to_proto(ref),
                motion_latents=wire.to_proto(motion),
            )
        )
        with grpc.insecure_channel(gen_addr) as ch, pytest.raises(grpc.RpcError) as err:
            list(generator_pb2_grpc.GeneratorServiceStub(ch).Generate(iter([start]), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sample_steps must be 2, got 4" in err.value.details()

        # torchrun passes SIGTERM to both ranks: rank 0 drains and stops rank 1, which waits for it.
        # (torchrun itself reports the signal with exit status 1, whatever its workers did.)
        gen.send_signal(signal.SIGTERM)
        gen.wait(timeout=60)
        text = log.read_text()
        assert "TPP rank 1/2 ready" in text and "waiting for rank 0 to stop the group" in text
        assert "TPP rank 1: shutdown" in text and "avatar serve: stopping" in text
        assert "ChildFailedError" not in text and "[rank1]" not in text, text[-3000:]
    finally:
        if gen.poll() is None:
            os.killpg(gen.pid, signal.SIGKILL)
            gen.wait()


def test_only_the_generator_role_runs_under_torchrun(env):
    from conftest import AVATAR

    out = subprocess.run(
        [*AVATAR, "serve", "--role", "all", "--listen", "127.0.0.1:0"],
        cwd=ROOT,
        env={**env, "WORLD_SIZE": "2", "RANK": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "under torchrun only --role generator runs" in out.stderr


def test_a_rank_whose_step_fails_frees_its_cache_while_the_error_is_still_held(engine, monkeypatch):
    text, ref, motion, audio = _inputs(5, blocks=1)
    step = engine.open_step_session(_job(2, 1, blocks=1), text, ref, motion, 0)
    fail_holding_a_cache_view(
        monkeypatch, engine.dit, "denoise", step.kv, lambda: step.denoise_block(step.block_noise(0), audio[0])
    )
    assert step.kv_cache_bytes == 0
