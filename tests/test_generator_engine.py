"""GeneratorEngine on the tiny DiT: block-causal sessions, reproducibility, flat KV memory, inputs."""

import pytest
import torch
from ckpt_fixtures.dit import fail_holding_a_cache_view, one_torch_thread, write_dit_checkpoint, write_lora  # noqa: F401 (one_torch_thread: autouse)

from avatar.errors import InvalidInput
from avatar.jobs import Job
from avatar.presets import GeneratorOptions, ModelSpec
from avatar.services.generator.engine import GeneratorEngine
from avatar.services.generator.weights import random_dit

H = W = 64  # pixels: latent 8 x 8
INFER_FRAMES = 24  # one clip = 6 latent frames = 2 blocks of 3


def _job(seed=420, steps=4, **kw):
    fields = dict(
        width=W,
        height=H,
        fps=25,
        infer_frames=INFER_FRAMES,
        latent_frames_per_block=3,
        num_blocks=40,
        total_frames=480,
        sample_steps=steps,
        seed=seed,
        model="tiny",
    )
    return Job(**{**fields, **kw})


def _inputs(seed=0, blocks=4):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(7, 32, generator=g)
    ref = torch.randn(16, 1, 8, 8, generator=g)
    motion = torch.randn(16, 19, 8, 8, generator=g)
    audio = [torch.randn(12, 5, 32, generator=g) for _ in range(blocks)]
    return text, ref, motion, audio


@pytest.fixture(scope="module")
def engine():
    return GeneratorEngine(ModelSpec(name="tiny", seed=0))


def _generate(engine, job, blocks=4, inputs=None, **session_kw):
    text, ref, motion, audio = inputs or _inputs(blocks=blocks)
    session = engine.open_session(job, text, ref, motion)
    for key, value in session_kw.items():
        setattr(session, key, value)
    try:
        return [session.generate_block(a) for a in audio[:blocks]]
    finally:
        session.close()


def test_two_clips_are_reproducible_and_depend_on_the_seed(engine):
    first = _generate(engine, _job(seed=420))
    again = _generate(engine, _job(seed=420))
    other = _generate(engine, _job(seed=421))
    assert len(first) == 4 and all(b.shape == (16, 3, 8, 8) and b.dtype == torch.float32 for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.allclose(a, b) for a, b in zip(first, other))
    assert all(torch.isfinite(b).all() for b in first)


def test_kv_cache_memory_is_flat_in_the_number_of_clips(engine):
    text, ref, motion, audio = _inputs(blocks=1)
    session = engine.open_session(_job(), text, ref, motion)
    spec = session.kv.spec
    assert (spec.window_frames, spec.frame_tokens, spec.num_sets) == (6, 16, 4)
    assert session.kv_cache_bytes == spec.nbytes(torch.float32)
    sizes = {}
    for block in range(20):  # 10 clips of 2 blocks
        session.generate_block(audio[0])
        if block + 1 in (4, 20):  # after clip 2 and after clip 10
            sizes[block + 1] = (session.kv_cache_bytes, session.kv.keys.data_ptr())
    assert sizes[4] == sizes[20]
    assert session.last_block_ms > 0
    session.close()
    assert session.kv_cache_bytes == 0
    with pytest.raises(InvalidInput, match="closed"):
        session.generate_block(audio[0])


def test_any_step_count_and_the_clean_context_variant(engine):
    one = _generate(engine, _job(steps=1), blocks=3)
    assert all(torch.isfinite(b).all() for b in one)
    forcing = _generate(engine, _job(steps=3), blocks=3)
    clean = GeneratorEngine(
        ModelSpec(name="tiny", seed=0, generator_options=GeneratorOptions(cache_sets=1)), dit=engine.dit
    )
    single = _generate(clean, _job(steps=3), blocks=3)
    # The first block sees only itself and the sink. The two cache layouts feed attention in a
    # different order: float32 rounding only (max 1.7e-5 on an AMD EPYC, values up to 5; later
    # blocks differ by ~0.3 because they see a different, clean, context).
    torch.testing.assert_close(single[0], forcing[0], rtol=1e-4, atol=1e-4)
    assert (single[1] - forcing[1]).abs().max() > 1e-2
    with pytest.raises(InvalidInput, match="sample_steps"):
        engine.open_session(_job(steps=0), *_inputs(blocks=0)[:3])
    with pytest.raises(InvalidInput, match="cache_sets"):
        GeneratorOptions(cache_sets=2)


def test_blocks_depend_on_their_audio_and_earlier_blocks_only(engine):
    text, ref, motion, audio = _inputs()
    base = _generate(engine, _job(), inputs=(text, ref, motion, audio))
    changed = list(audio)
    changed[2] = torch.randn(12, 5, 32)
    other = _generate(engine, _job(), inputs=(text, ref, motion, changed))
    assert all(torch.equal(a, b) for a, b in zip(base[:2], other[:2]))  # causal: the past is untouched
    assert not torch.allclose(base[2], other[2])
    assert not torch.allclose(base[3], other[3])  # later blocks attend to it


def test_sink_is_refreshed_with_the_first_generated_frame_after_clip_one(engine):
    refreshed = _generate(engine, _job(), blocks=3)
    kept = _generate(engine, _job(), blocks=3, refresh_sink=False)
    assert all(torch.equal(a, b) for a, b in zip(refreshed[:2], kept[:2]))
    assert not torch.allclose(refreshed[2], kept[2])


def test_bad_inputs_are_rejected_with_reasons(engine):
    text, ref, motion, audio = _inputs(blocks=1)
    with pytest.raises(InvalidInput, match=r"ref_latent must be \[16, 1, 8, 8\]"):
        engine.open_session(_job(), text, ref[:, :, :4], motion)
    with pytest.raises(InvalidInput, match="text embeddings"):
        engine.open_session(_job(), torch.randn(7, 31), ref, motion)
    with pytest.raises(InvalidInput, match="infer_frames"):
        engine.open_session(_job(infer_frames=30), text, ref, motion)
    with pytest.raises(InvalidInput, match="at least 8x8"):
        engine.open_session(_job(width=48, height=48), text, torch.randn(16, 1, 6, 6), torch.randn(16, 19, 6, 6))
    session = engine.open_session(_job(), text, ref, motion)
    with pytest.raises(InvalidInput, match=r"audio features must be \[12, 5, 32\]"):
        session.generate_block(torch.randn(12, 25, 32))
    session.close()


def test_engine_loads_an_upstream_layout_checkpoint_and_lora(tmp_path):
    written = write_dit_checkpoint(tmp_path / "Wan2.2-S2V-14B", seed=0)
    write_lora(tmp_path / "liveavatar.safetensors", written, rank=4)
    spec = ModelSpec(name="s2v-14b", ckpt_dir=str(tmp_path / "Wan2.2-S2V-14B"))
    plain = GeneratorEngine(spec)
    with_lora = GeneratorEngine(spec.with_(lora_path=str(tmp_path / "liveavatar.safetensors")))
    a, b = _generate(plain, _job(), blocks=1), _generate(with_lora, _job(), blocks=1)
    assert a[0].shape == (16, 3, 8, 8) and not torch.allclose(a[0], b[0])
    # the loaded (bf16-rounded) tiny model is the random one it was written from
    rounded = random_dit("tiny", "cpu", torch.float32, seed=0)
    for p in rounded.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    torch.testing.assert_close(_generate(GeneratorEngine(ModelSpec(), dit=rounded), _job(), blocks=1)[0], a[0])


def test_fp8_linears_run_the_same_session():
    fp8 = GeneratorEngine(ModelSpec(name="tiny", seed=0, fp8=True))
    assert type(fp8.dit.blocks[0].ffn[0]).__name__ == "FP8Linear"
    assert isinstance(fp8.dit.head.head, torch.nn.Linear)  # kept in high precision
    out = _generate(fp8, _job(), blocks=2)
    ref = _generate(GeneratorEngine(ModelSpec(name="tiny", seed=0)), _job(), blocks=2)
    assert all(torch.isfinite(b).all() for b in out)
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(out, ref))
    assert 0 < rel < 0.05, rel  # ~2% on the tiny model


def test_bfloat16_model_follows_the_float32_one():
    """The GPU dtype path (bf16 weights and activations, float32 modulation/residuals) on CPU."""
    bf16 = random_dit("tiny", "cpu", torch.bfloat16, seed=0)
    out = _generate(GeneratorEngine(ModelSpec(), dit=bf16), _job(), blocks=3)
    ref = _generate(
        GeneratorEngine(ModelSpec(), dit=random_dit("tiny", "cpu", torch.float32, seed=0)), _job(), blocks=3
    )
    assert all(b.dtype == torch.bfloat16 for b in out)
    rel = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(out, ref)]
    assert max(rel) < 0.02, rel  # ~0.5% measured


def test_session_refuses_cleanly_when_the_memory_planner_says_it_does_not_fit(engine):
    from avatar.errors import ResourceExhausted
    from avatar.memory_planner import GiB

    text = torch.randn(7, 32)
    ref, motion = torch.randn(16, 1, 48, 88), torch.randn(16, 19, 48, 88)
    job = _job(width=704, height=384)
    engine.free_memory = lambda: 1 * GiB  # the planner's fake free memory: a full GPU
    try:
        with pytest.raises(ResourceExhausted) as e:
            engine.open_session(job, text, ref, motion)
        msg = str(e.value)
        assert "not enough free GPU memory to open a 704*384 session" in msg and "1.1 GB free" in msg
        assert "one KV cache set (--cache-sets 1): needs" in msg
    finally:
        engine.free_memory = None


def test_out_of_memory_in_a_block_frees_the_session_and_raises_the_ladder(engine, monkeypatch):
    from avatar.errors import ResourceExhausted
    from avatar.memory_planner import GiB

    text, ref, motion, audio = _inputs(blocks=2)
    engine.free_memory = lambda: 80 * GiB
    try:
        session = engine.open_session(_job(), text, ref, motion)
        session.generate_block(audio[0])
        assert session.kv.nbytes > 0

        def oom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.83 GiB")

        monkeypatch.setattr(session.dit, "encode_audio", oom)
        with pytest.raises(ResourceExhausted) as e:
            session.generate_block(audio[1])
        assert "ran out of GPU memory" in str(e.value) and "Tried to allocate 4.83 GiB" in str(e.value)
        assert session.kv.nbytes == 0  # the caches are freed at once
        with pytest.raises(InvalidInput, match="closed"):
            session.generate_block(audio[1])
    finally:
        engine.free_memory = None


def test_fp8_kv_cache_halves_the_cache_and_stays_close(engine):
    fp8_options = GeneratorOptions(kv_dtype="float8_e4m3fn")
    fp8kv = GeneratorEngine(ModelSpec(name="tiny", seed=0, generator_options=fp8_options), dit=engine.dit)
    text, ref, motion, audio = _inputs(blocks=3)
    session = fp8kv.open_session(_job(), text, ref, motion)
    try:
        assert session.kv.keys.dtype == torch.float8_e4m3fn
        assert session.kv_cache_bytes * 4 == session.kv.spec.nbytes(torch.float32)
    finally:
        session.close()
    got = torch.stack(_generate(fp8kv, _job(), blocks=3))
    ref_out = torch.stack(_generate(engine, _job(), blocks=3))
    assert torch.isfinite(got).all()
    rel = ((got - ref_out).norm() / ref_out.norm()).item()
    assert 0 < rel < 0.01, rel  # 0.1% on the tiny model: attention averages the rounding
    with pytest.raises(InvalidInput, match="kv_dtype"):
        GeneratorOptions(kv_dtype="int4")


def test_cli_kv_fp8_flag_reaches_the_session_cache(engine):
    import argparse

    from avatar.app import cli

    parser = argparse.ArgumentParser()
    cli._add_model_flags(parser)
    spec = cli.model_spec(parser.parse_args(["--kv-fp8", "--cache-sets", "1"]))
    assert spec.generator_options == GeneratorOptions(cache_sets=1, kv_dtype="float8_e4m3fn")
    text, ref, motion, _ = _inputs(blocks=1)
    session = GeneratorEngine(spec, dit=engine.dit).open_session(_job(), text, ref, motion)
    try:
        assert session.kv.keys.dtype == torch.float8_e4m3fn and session.kv.spec.num_sets == 1
    finally:
        session.close()


def test_a_failure_inside_the_model_frees_the_kv_cache_while_the_error_is_still_held(engine, monkeypatch):
    text, ref, motion, audio = _inputs(blocks=1)
    session = engine.open_session(_job(), text, ref, motion)
    fail_holding_a_cache_view(monkeypatch, engine.dit, "denoise", session.kv, lambda: session.generate_block(audio[0]))
    assert session._closed


def test_cli_graph_and_offload_flags_reach_the_engine(monkeypatch):
    import argparse

    from avatar.app import cli

    parser = argparse.ArgumentParser()
    cli._add_model_flags(parser)
    assert cli.model_spec(parser.parse_args([])).generator_options.cuda_graphs is None  # default: on for CUDA
    spec = cli.model_spec(parser.parse_args(["--no-cuda-graphs", "--offload-text-kv"]))
    assert spec.generator_options == GeneratorOptions(cuda_graphs=False, offload_text_projections=True)
    from avatar.services.generator.engine import cuda_graphs_wanted

    assert not cuda_graphs_wanted(spec, torch.device("cuda"))
    assert cuda_graphs_wanted(ModelSpec(name="tiny"), torch.device("cuda"))
    graphs_on = ModelSpec(name="tiny", generator_options=GeneratorOptions(cuda_graphs=True))
    assert not cuda_graphs_wanted(graphs_on, torch.device("cpu"))
    moved = []
    monkeypatch.setattr(
        "avatar.services.generator.causal_s2v_dit.CausalS2VDiT.offload_text_projections",
        lambda self: moved.append(self) or 0,
    )
    from avatar.services.generator.engine import build_generator_model

    dit = build_generator_model(spec.with_(name="tiny"))
    assert moved == [dit]


def test_warm_up_runs_every_ring_fill_level_of_each_size_and_skips_what_cannot_run(engine):
    from avatar.app.serve import warmup_sizes

    sizes = warmup_sizes(ModelSpec(name="tiny"))
    assert sizes == [(176, 96, 48, 4), (96, 64, 36, 3)]  # hd and preview at the tiny model's sizes
    opened = []
    real = engine.open_session
    engine.open_session = lambda *a: opened.append(real(*a)) or setattr(opened[-1], "_opened_with", a) or opened[-1]
    try:
        lines = engine.warm_up(sizes + [(100, 64, 48, 4)])
    finally:
        del engine.open_session
    assert [line.split(":")[0] for line in lines] == ["176*96", "96*64", "100*64"]
    assert "skipped" in lines[2] and "multiples of 8" in lines[2]
    # two clips and two blocks more: the ring fills, wraps, the graphs of the second clip are
    # captured and the last two blocks measure the steady block time; every session is closed again
    assert [s.block_index for s in opened] == [10, 8] and all(s._closed for s in opened)
    assert "steady" in lines[0] and "at 4 steps" in lines[0] and "steady" in lines[1]
    times = engine.block_times
    hd = times.block_ms(176, 96, forwards=4)
    assert hd > 0 and times.block_ms(176, 96, forwards=2) == pytest.approx(hd / 2)  # per forward
    assert times.block_ms(100, 64, forwards=4) is None  # skipped: never measured
    measured = set(times.by_size(forwards=3))  # with the sizes earlier tests' sessions ran long enough
    assert {"176*96", "96*64"} <= measured and "100*64" not in measured
    # what the generator's SessionReady tells the live guard before the session's first block
    from avatar.services.generator.server import _ready

    session = engine.open_session(*opened[0]._opened_with)
    try:
        ready = _ready(engine, session, depth=1)
    finally:
        session.close()
    assert ready.steady_block_ms == pytest.approx(hd) and ready.kv_cache_bytes > 0
    assert dict(ready.steady_block_ms_by_size) == pytest.approx(times.by_size(forwards=4))
