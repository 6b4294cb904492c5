"""Multi-GPU generator (TPP) on CPU ranks over gloo: R local processes give the same latents, bit
for bit, as one GeneratorSession (a cache set per step) for any R and S, one session or several
in flight; a rank's failure ends its session; a rank that dies takes the group down."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ckpt_fixtures.dit import fail_holding_a_cache_view, one_torch_thread  # noqa: F401 (one_torch_thread: autouse)
from conftest import free_port, run_ranks

from avatar.jobs import Job
from avatar.presets import ModelSpec
from avatar.services.generator.distributed.tpp import rank_steps, step_rank
from avatar.services.generator.engine import GeneratorEngine

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 4  # 24 frames a clip = 2 blocks of 3 latent frames: two clips, so the sink refresh runs

# One rank of the group. Rank 0 drives TPPEngine as the gRPC servicer would, from a plan (JSON):
# "alone": sessions one after another, each submitting every block at once (they overlap across
# ranks); "together": groups of sessions in flight at the same time, blocks submitted
# interleaved; "fail": a session whose block 1 fails on the last rank, then one that runs.
# Every session is [steps, seed, input seed]; rank 0 saves each session's latents by its key.
RANK = textwrap.dedent("""
    import json, os, sys, time, torch
    torch.set_num_threads(1)
    from avatar.errors import ResourceExhausted
    from avatar.jobs import Job
    from avatar.presets import ModelSpec
    from avatar.services.generator.distributed import tpp
    from avatar.services.generator.engine import GeneratorEngine
    out, blocks, plan = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])

    def job(steps, seed):
        return Job(width=64, height=64, fps=25, infer_frames=24, latent_frames_per_block=3, num_blocks=blocks,
                   total_frames=blocks * 12, sample_steps=steps, seed=seed, model="tiny")

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(7, 32, generator=g), torch.randn(16, 1, 8, 8, generator=g),
                torch.randn(16, 19, 8, 8, generator=g), [torch.randn(12, 5, 32, generator=g) for _ in range(blocks)])

    def open_(tppe, steps, seed, input_seed):
        text, ref, motion, audio = inputs(input_seed)
        return tppe.open_session(job(steps, seed), text, ref, motion), audio

    group, spec = tpp.init_group(ModelSpec(name="tiny", seed=0))
    engine = GeneratorEngine(spec)
    if group.rank:
        run = tpp._denoise

        def failing(session, x, audio, index, first):   # a rank's failure: session seed 99, block 1
            if session.seed == 99 and index == 1 and group.rank == group.last:
                raise RuntimeError("injected failure")
            if session.seed == 98 and index == 1:
                print(f"DIES AT {time.time():.3f}", flush=True)
                os._exit(3)   # a rank that dies
            return run(session, x, audio, index, first)
        tpp._denoise = failing
        tpp.run_worker(group, engine)
    else:
        tppe = tpp.TPPEngine(group, engine, max_sessions=plan.get("max_sessions", 1))
        n = group.world_size
        if plan.get("die"):
            s, audio = open_(tppe, 2, 98, 1)
            futures = [s.submit(a) for a in audio]
            first = str(futures[0].result(timeout=60).shape)
            with open(out + ".json", "w") as f:
                json.dump({"first": first}, f)
            try:
                futures[1].result(timeout=60)
            except Exception as e:
                print(f"FAILED AT {time.time():.3f}", flush=True)
                print("BLOCK 1 FAILED:", e, flush=True)
            time.sleep(30)   # rank 0 exits on its own (status 1) so the orchestrator restarts the group
            sys.exit(0)
        results, meta = {}, {}
        for steps, seed, input_seed in plan.get("alone", []):
            s, audio = open_(tppe, steps, seed, input_seed)
            futures = [s.submit(a) for a in audio]
            results[f"{steps}-{seed}-{input_seed}"] = [f.result(timeout=120) for f in futures]
            s.close()
        for together in plan.get("together", []):
            opened = [open_(tppe, *spec) for spec in together]
            try:
                open_(tppe, *together[0])
                meta["admitted beyond max_sessions"] = True
            except ResourceExhausted as e:
                meta["refused"] = str(e)
            meta.setdefault("offsets", []).append([s.offset for s, _ in opened])
            futures = [[] for _ in opened]
            for b in range(blocks):   # interleaved: every session's block b before any block b + 1
                for i, (s, audio) in enumerate(opened):
                    futures[i].append(s.submit(audio[b]))
            for spec, fs, (s, _) in zip(together, futures, opened):
                results["together-" + "-".join(map(str, spec))] = [f.result(timeout=120) for f in fs]
                s.close()
        if plan.get("fail"):
            s, audio = open_(tppe, n, 99, 2)
            futures = [s.submit(a) for a in audio[:3]]
            errors = []
            for f in futures:
                try:
                    f.result(timeout=120)
                    errors.append(None)
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")
            s.close()
            meta["errors"] = errors
            s, audio = open_(tppe, n, 7, 2)
            results[f"{n}-7-2"] = [s.generate_block(a) for a in audio]
            s.close()
        torch.save(results, out + ".pt")
        tppe.close()
        with open(out + ".json", "w") as f:
            json.dump(meta, f)
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


def run_group(n: int, tmp_path: Path, plan: dict, timeout: float = 180.0) -> tuple[dict, dict]:
    """Starts n ranks as torchrun would (env rendezvous on loopback); always reaps them."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    out = tmp_path / f"tpp{n}"
    ranks = run_ranks(n, [sys.executable, str(script), str(out), str(BLOCKS), json.dumps(plan)], timeout, "TPP group")
    codes, logs = [code for code, _ in ranks], [log for _, log in ranks]
    if plan.get("die"):
        meta = json.loads(Path(f"{out}.json").read_text()) if Path(f"{out}.json").exists() else {}
        return {"codes": codes, "log": logs[0], "logs": logs}, meta
    for r, (code, log) in enumerate(ranks):
        assert code == 0, f"rank {r} exited {code}:\n{log[-3000:]}\nrank 0:\n{logs[0][-3000:]}"
    return torch.load(f"{out}.pt"), json.loads(Path(f"{out}.json").read_text())


@pytest.fixture(scope="module")
def engine():
    return GeneratorEngine(ModelSpec(name="tiny", seed=0))


def _reference(engine, steps, seed, input_seed, blocks=BLOCKS):
    """The single-process generator's latents (GeneratorEngine.open_session: a cache set per step)."""
    text, ref, motion, audio = _inputs(input_seed)
    session = engine.open_session(_job(steps, seed), text, ref, motion)
    try:
        return [session.generate_block(a) for a in audio[:blocks]]
    finally:
        session.close()


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want) == BLOCKS
    for a, b in zip(got, want):
        assert a.shape == (16, 3, 8, 8) and a.dtype == torch.float32
        assert torch.equal(a, b), f"max diff {(a - b).abs().max().item()}"


def test_step_placement_covers_every_step_once_and_spreads_a_lone_session_from_rank_0():
    for world in (2, 3, 4):
        for steps in (1, 2, 3, 4, 5, 7):
            for offset in range(world):
                owned = [rank_steps(r, steps, offset, world) for r in range(world)]
                assert sorted(k for ks in owned for k in ks) == list(range(steps))
                # as even as it gets: every rank runs floor or ceil(S/R) steps
                assert {len(ks) for ks in owned} <= {steps // world, -(-steps // world)}
    assert rank_steps(1, 5, 0, 2) == [1, 3] and rank_steps(0, 5, 0, 2) == [0, 2, 4]
    assert [step_rank(k, 2, 4) for k in range(3)] == [2, 3, 0]


def test_a_rank_not_started_by_torchrun_or_with_a_bad_timeout_refuses_with_the_reason(monkeypatch):
    from avatar.services.generator.distributed import tpp

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(
        ValueError, match="TPP rank without MASTER_ADDR, MASTER_PORT: start the generator with torchrun"
    ):
        tpp.init_group(ModelSpec(name="tiny"))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    for bad in ("10", "soon"):
        monkeypatch.setenv(tpp.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"AVATAR_TPP_TIMEOUT_S must be a number of seconds >= 120, got '{bad}'"):
            tpp.init_group(ModelSpec(name="tiny"))
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"  # NVLink multicast stays off whatever was asked
    monkeypatch.setenv(tpp.TIMEOUT_ENV, "600")
    assert tpp.group_timeout().total_seconds() == 600


# R x S: every S in 2..5 for R = 2, 3 and 4 (S < R, = R, > R, not a multiple). Each R
# is one group (process start-up dominates on 2 cores: about 10-20 s a group).
GRID = {2: (2, 3, 4, 5), 3: (2, 3, 4, 5), 4: (2, 3, 4, 5)}
# sessions in flight together, [steps, seed, input seed]: S < R, = R and > R mixed in one ring
TOGETHER = {2: [[3, 11, 3], [5, 12, 4]], 4: [[3, 21, 5], [4, 22, 6], [5, 23, 7], [2, 24, 8]]}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tpp_matches_the_single_process_generator_for_any_steps(engine, tmp_path, n):
    alone = [[steps, 400 + steps, 1] for steps in GRID[n]]
    together = [TOGETHER[n]] if n in TOGETHER else []
    got, meta = run_group(
        n, tmp_path, {"alone": alone, "together": together, "fail": True, "max_sessions": len(TOGETHER.get(n, [1]))}
    )
    for steps, seed, input_seed in alone:
        _assert_same(got[f"{steps}-{seed}-{input_seed}"], _reference(engine, steps, seed, input_seed))
    # not trivially equal: blocks differ from each other, and from another step count
    first = got[f"{GRID[n][0]}-{400 + GRID[n][0]}-1"]
    assert not torch.equal(first[0], first[2])
    assert not torch.allclose(first[0], got[f"{GRID[n][1]}-{400 + GRID[n][1]}-1"][0])
    # several sessions in flight: each one's latents are its single-session latents
    for spec in together[0] if together else []:
        _assert_same(got["together-" + "-".join(map(str, spec))], _reference(engine, *spec))
    if together:
        assert "admitted beyond max_sessions" not in meta
        assert f"runs {len(together[0])} session(s) at once" in meta["refused"]
        # the group placed the sessions so that their steps spread evenly over the ranks
        load = [0] * n
        for (steps, _, _), offset in zip(together[0], meta["offsets"][0]):
            for r in range(n):
                load[r] += len(rank_steps(r, steps, offset, n))
        assert max(load) - min(load) <= 1, (load, meta["offsets"])
    # a rank that fails ends that session's later blocks with its error; the next session is fine
    assert (
        meta["errors"][0] is None
        and meta["errors"][1:] == [f"RuntimeError: generator rank {n - 1}: injected failure (RuntimeError)"] * 2
    )
    _assert_same(got[f"{n}-7-2"], _reference(engine, n, 7, 2))


def test_a_rank_that_dies_fails_the_session_and_rank_0_exits(tmp_path):
    got, meta = run_group(2, tmp_path, {"die": True}, timeout=240)
    assert meta.get("first") == "torch.Size([16, 3, 8, 8])", got["log"][-3000:]  # block 0 came back first
    assert got["codes"] == [1, 3], got["log"][-3000:]  # rank 0 exits 1: the orchestrator restarts
    assert "BLOCK 1 FAILED: a generator rank failed" in got["log"]
    assert "restarting the group" in got["log"]
    died = float(re.search(r"DIES AT ([\d.]+)", got["logs"][1]).group(1))
    failed = float(re.search(r"FAILED AT ([\d.]+)", got["log"]).group(1))
    assert failed - died < 5, f"rank 0 saw the death after {failed - died:.1f} s"


def test_torchrun_generator_serves_the_mesh_and_stops_cleanly(tmp_path, env, clip_5s, start_service):
    """`torchrun --nproc-per-node 2 --no-python avatar serve --role generator` (as the manifests
    run it, on 2 CPU ranks) behind a gateway: a real Generate of the preview preset (3 steps on 2
    ranks) gives a valid MP4, bad input is refused, SIGTERM stops every rank."""
    import signal

    import grpc
    from conftest import AVATAR, check_video, generate, wait_serving

    from avatar import wire
    from avatar.v1 import avatar_pb2, generator_pb2, generator_pb2_grpc

    enc = start_service("encoder", wait=False)
    dec = start_service("decoder", wait=False)
    gen_addr = f"127.0.0.1:{free_port()}"
    log = tmp_path / "generator-tpp.log"
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
            preset="preview",  # 3 sampling steps on 2 ranks: a lap and a half of the ring a block
            size="64*64",
            seed=7,
            num_clip=1,
        )
        s = generate(gw.address, request)
        assert s.status.blocks >= 2 and len(s.fragments) == s.status.blocks + 1  # block 0 in two fragments
        check_video(s.write_mp4(tmp_path / "tpp.mp4"), s.status.frames / 25)

        # Bad input is refused with the reason before any rank works on it.
        text, ref, motion, _ = _inputs(3, blocks=0)
        start = generator_pb2.GeneratorInput(
            start=generator_pb2.SessionStart(
                job=_job(3, 1).to_proto(),
                text=wire.to_proto(text),
                ref_latent=wire.to_proto(ref[:, :, :4]),
                motion_latents=wire.to_proto(motion),
            )
        )
        with grpc.insecure_channel(gen_addr) as ch, pytest.raises(grpc.RpcError) as err:
            list(generator_pb2_grpc.GeneratorServiceStub(ch).Generate(iter([start]), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ref_latent must be [16, 1, 8, 8], got [16, 1, 4, 8]" in err.value.details()

        # torchrun passes SIGTERM to both ranks: rank 0 drains and stops rank 1, which waits for it.
        # (torchrun itself reports the signal with exit status 1, whatever its workers did.)
        gen.send_signal(signal.SIGTERM)
        gen.wait(timeout=60)
        text = log.read_text()
        assert "TPP rank 1/2 ready" in text and "waiting for rank 0 to stop the group" in text
        assert "TPP rank 1: shutdown" in text and "avatar serve: stopping" in text
        assert "ChildFailedError" not in text and "[rank1]" not in text, text[-3000:]
    finally:
        _kill_all(gen, [])


def _descendants(pid: int) -> list[int]:
    """Live processes under `pid` (torchrun starts its ranks in sessions of their own, so its
    process group does not hold them), zombies left out."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pids: list[int]) -> list[int]:
    def live(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    return [p for p in pids if live(p)]


def _kill_all(proc: subprocess.Popen, pids: list[int]) -> None:
    """Ends a torchrun group a test started, its ranks by their ids too."""
    import signal

    for pid in {*pids, *_descendants(proc.pid)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_for_line(log: Path, pattern: str, timeout: float, proc: subprocess.Popen) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} in the log:\n{log.read_text(errors='replace')[-3000:]}")


def test_killing_a_rank_mid_stream_ends_the_stream_and_the_group(tmp_path, env):
    """`avatar serve --role generator` under torchrun (2 CPU ranks), a stream in progress, rank 1
    SIGKILLed: the stream ends with the reason within a few seconds, health says NOT_SERVING,
    torchrun exits non-zero and no process of the group is left."""
    import signal
    import threading

    import grpc
    from conftest import AVATAR
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from avatar import wire
    from avatar.v1 import encoder_pb2, generator_pb2, generator_pb2_grpc

    gen_addr = f"127.0.0.1:{free_port()}"
    log = tmp_path / "generator-tpp.log"
    torchrun = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "--no-python",
    ]
    with open(log, "wb") as out:
        gen = subprocess.Popen(
            [*torchrun, *AVATAR, "serve", "--role=generator", f"--listen={gen_addr}", "--max-sessions=2"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    statuses: list[int] = []
    stop = threading.Event()
    ranks: list[int] = []
    try:
        from conftest import wait_serving

        wait_serving(gen_addr, 240, gen, log)
        rank1 = int(_wait_for_line(log, r"TPP rank 1/2 ready on cpu \(pid (\d+)\)", 120, gen).group(1))
        ranks = _descendants(gen.pid)
        assert rank1 in ranks and len(ranks) == 2, ranks  # rank 0 and rank 1, children of torchrun

        def watch_health():  # Health.Watch: the server pushes each change, no poll can miss one
            with grpc.insecure_channel(gen_addr) as ch:
                try:
                    for change in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=300):
                        statuses.append(change.status)
                except grpc.RpcError:
                    pass  # the server went away

        watcher = threading.Thread(target=watch_health, daemon=True)
        watcher.start()
        _wait_until(lambda: statuses, 30)  # watching: SERVING came first
        blocks = 200  # far more than arrive before the kill: the stream is mid-way
        text, ref, motion, audio = _inputs(3, blocks=1)
        start = generator_pb2.GeneratorInput(
            start=generator_pb2.SessionStart(
                job=_job(3, 1, blocks=blocks).to_proto(),
                text=wire.to_proto(text),
                ref_latent=wire.to_proto(ref),
                motion_latents=wire.to_proto(motion),
            )
        )
        feats = generator_pb2.GeneratorInput(audio=encoder_pb2.AudioFeatures(features=wire.to_proto(audio[0])))

        def requests():
            yield start
            for _ in range(blocks):
                if stop.is_set():
                    return
                yield feats
                time.sleep(0.05)  # a live source: the stream lasts while the rank is killed

        got, killed_at = 0, None
        with grpc.insecure_channel(gen_addr) as ch, pytest.raises(grpc.RpcError) as err:
            for out in generator_pb2_grpc.GeneratorServiceStub(ch).Generate(requests(), timeout=120):
                if out.WhichOneof("event") == "block":
                    got += 1
                    if got == 2:
                        os.kill(rank1, signal.SIGKILL)
                        killed_at = time.monotonic()
        ended = time.monotonic() - killed_at
        assert killed_at is not None, "the stream ended before the kill"
        assert ended < 5, f"the stream ended {ended:.1f} s after the kill"
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value  # retry: the group restarts
        assert "a generator rank failed" in err.value.details(), err.value
        assert gen.wait(timeout=60) != 0
        watcher.join(timeout=10)
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING, statuses
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
        assert "restarting the group" in log.read_text()
        assert _alive(ranks) == [], log.read_text()[-3000:]  # torchrun has reaped both ranks
    finally:
        stop.set()
        _kill_all(gen, ranks)


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
