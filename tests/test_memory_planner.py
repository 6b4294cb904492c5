"""Memory planner: choices from fake free-memory numbers, refusals that carry the numbers and the ladder."""

import pytest

from avatar.errors import InvalidInput, ResourceExhausted
from avatar.memory_planner import (
    GB,
    GiB,
    MemoryRequest,
    PlannerOptions,
    check_session_memory,
    dit_bytes,
    estimate,
    kv_set_bytes,
    plan_memory,
    session_bytes,
    session_oom_error,
    sink_bytes,
)

HD = MemoryRequest(704, 384, infer_frames=48, sample_steps=4)
PREVIEW = MemoryRequest(384, 256, infer_frames=32, sample_steps=3)
H100 = int(79.6 * GiB)  # what an H100 80GB reports free with no context yet
CARD_24 = 24 * GiB


def test_weights_and_cache_arithmetic_match_the_checkpoint_and_the_issue():
    assert dit_bytes(fp8=False) / GB == pytest.approx(32.6, abs=0.05)
    assert dit_bytes(fp8=True) / GB == pytest.approx(16.65, abs=0.1)
    # one bf16 KV set for a 12-latent-frame window at 704*384: about 10.4 GB (the issue's figure)
    assert kv_set_bytes(HD, 2) / GB == pytest.approx(10.4, abs=0.05)
    # the sink: reference frame (1056 tokens) + FramePack motion (1056 + 264 + 264) = 2640 tokens
    assert HD.sink_tokens == 2640 and sink_bytes(HD, 2) == 40 * 2 * 2640 * 5120 * 2
    # bf16 weights + 4 sets + 2 sink copies (one per pair of sets) + the reference keys: 73.5 GiB
    # (upstream keeps one sink, 71.1 GiB, and concatenates ring + sink in every layer instead)
    four = estimate(HD, fp8=False, encoder_device="cpu", kv_sets=4)
    assert four.parts["kv_cache"] == 4 * kv_set_bytes(HD, 2) + 2 * sink_bytes(HD, 2) + 40 * 1056 * 5120 * 2
    assert (four.parts["dit"] + four.parts["kv_cache"]) / GiB == pytest.approx(73.5, abs=0.1)
    assert kv_set_bytes(HD, 1) * 2 == kv_set_bytes(HD, 2)
    # the cache follows the window (infer_frames), not the video length
    assert kv_set_bytes(MemoryRequest(704, 384, infer_frames=32), 2) < kv_set_bytes(HD, 2)
    assert (
        estimate(MemoryRequest(704, 384, num_blocks=500), fp8=True, encoder_device="cpu", kv_sets=1).total
        == estimate(MemoryRequest(704, 384, num_blocks=2), fp8=True, encoder_device="cpu", kv_sets=1).total
    )


def test_a_big_card_gets_the_fast_faithful_configuration():
    p = plan_memory(PREVIEW, H100)
    assert (p.fp8, p.encoder_device, p.kv_sets, p.kv_dtype, p.kv_offload) == (False, "cuda", 3, "bfloat16", False)
    assert p.total <= H100 and p.headroom >= 0 and "bf16 DiT" in p.describe()


def test_hd_on_an_80gb_card_keeps_one_cache_set_per_step_by_dropping_weight_precision_or_encoders():
    p = plan_memory(HD, H100)
    assert p.kv_sets == 4 and p.total <= H100
    # bf16 weights + 4 bf16 sets + encoders would be ~90 GB: something had to give
    assert p.fp8 or p.encoder_device == "cpu"
    assert estimate(HD, fp8=False, encoder_device="cuda", kv_sets=4).total > H100


def test_user_asked_precision_is_respected():
    p = plan_memory(HD, H100, PlannerOptions(precision="bf16"))
    assert not p.fp8
    p = plan_memory(PREVIEW, H100, PlannerOptions(precision="fp8"))
    assert p.fp8 and p.encoder_device == "cuda"


def test_24gb_card_hd_dit_fits_with_fp8_weights_fp8_cache_one_set_when_the_vae_is_elsewhere():
    opts = PlannerOptions(allow_fp8_kv=True, vae_on_gpu=False)
    p = plan_memory(HD, CARD_24, opts)
    assert (p.fp8, p.encoder_device, p.kv_sets, p.kv_dtype) == (True, "cpu", 1, "float8_e4m3fn")
    assert p.total <= CARD_24


def test_24gb_card_hd_with_the_vae_on_the_same_gpu_is_refused_and_points_to_384x256():
    # measured: DiT 22.1 GiB peak + the VAE's 3.2 GiB decode: over 24 GiB
    with pytest.raises(ResourceExhausted) as e:
        plan_memory(HD, CARD_24, PlannerOptions(allow_fp8_kv=True))
    msg = str(e.value)
    assert "a smaller size, 384*256: needs" in msg and "(fits)" in msg
    assert "infer_frames 32: needs" in msg


def test_24gb_card_preview_fits_with_bf16_cache():
    p = plan_memory(PREVIEW, CARD_24)
    assert p.fp8 and p.kv_dtype == "bfloat16" and p.total <= CARD_24


def test_refusal_carries_needed_available_and_the_ladder_with_numbers():
    with pytest.raises(ResourceExhausted) as e:
        plan_memory(HD, CARD_24)  # without allow_fp8_kv nothing fits at 704*384
    msg = str(e.value)
    assert "704*384" in msg and f"{CARD_24 / GB:.1f} GB available" in msg
    assert "needs" in msg and "a smaller size, 384*256" in msg and "infer_frames 32" in msg
    # the 384*256 rung is computed, and it fits on this card
    line = next(l for l in msg.splitlines() if "384*256" in l and l.strip().startswith("-"))
    assert "(fits)" in line


def test_offline_decode_and_length_show_up_in_the_refusal():
    req = MemoryRequest(704, 384, infer_frames=48, num_blocks=5000, online_decode=False)
    with pytest.raises(ResourceExhausted) as e:
        plan_memory(req, H100)
    msg = str(e.value)
    assert "online decode: needs" in msg and "fewer clips: needs" in msg


def test_a_card_without_fp8_never_gets_fp8():
    with pytest.raises(ResourceExhausted):
        plan_memory(HD, CARD_24, PlannerOptions(fp8_capable=False, allow_fp8_kv=True))
    with pytest.raises(InvalidInput, match="FP8"):
        plan_memory(PREVIEW, H100, PlannerOptions(precision="fp8", fp8_capable=False))


def test_kv_offload_is_the_last_resort():
    opts = PlannerOptions(allow_fp8_kv=True, allow_kv_offload=True, vae_on_gpu=False)
    p = plan_memory(HD, 20 * GiB, opts)
    assert p.kv_offload and p.fp8 and p.encoder_device == "cpu"
    assert not plan_memory(HD, CARD_24, opts).kv_offload


def test_bad_requests_are_invalid_input():
    with pytest.raises(InvalidInput, match="multiples of 16"):
        MemoryRequest(700, 384)
    with pytest.raises(InvalidInput, match="multiple of 4"):
        MemoryRequest(704, 384, infer_frames=30)
    with pytest.raises(InvalidInput, match="precision"):
        PlannerOptions(precision="int4")


def test_from_job_reads_a_jobspec():
    class Job:
        width, height, infer_frames, sample_steps, num_blocks = 384, 256, 48, 4, 11

    r = MemoryRequest.from_job(Job())
    assert (r.size, r.window_latent_frames, r.num_blocks) == ("384*256", 12, 11)


@pytest.mark.parametrize(
    "req, fp8, sets, kv_dtype, measured_gib",
    [
        # peak allocated on an H100, DiT only, with today's cache layout
        # (bench/results/2026-11-25-h100-h7-full.json, docs/performance.md run D)
        (HD, False, 4, "bfloat16", 74.22),
        (HD, False, 1, "bfloat16", 43.21),
        (HD, True, 4, "bfloat16", 59.33),
        (HD, True, 1, "bfloat16", 28.31),
        (HD, True, 1, "float8_e4m3fn", 22.27),
        (MemoryRequest(384, 256), False, 4, "bfloat16", 46.76),
        (MemoryRequest(384, 256), True, 4, "bfloat16", 31.87),
    ],
)
def test_estimates_track_measured_peaks(req, fp8, sets, kv_dtype, measured_gib):
    p = estimate(req, fp8=fp8, encoder_device="cpu", kv_sets=sets, kv_dtype=kv_dtype, vae_on_gpu=False)
    dit_only = (p.parts["dit"] + p.parts["kv_cache"] + p.parts["activations"]) / GiB
    # never under the measurement (a plan that fits must run), at most 3% over it
    assert measured_gib <= dit_only <= measured_gib * 1.03


@pytest.mark.parametrize(
    "req, measured_gib",
    [
        # run F (bench/results/2026-11-25-h100-pipeline-1.json): FP8, 4 bf16 sets, DiT only, with the
        # prompt's keys/values now held per session
        (HD, 59.73),
        (MemoryRequest(384, 256), 32.30),
    ],
)
def test_estimates_track_measured_peaks_with_the_text_context(req, measured_gib):
    p = estimate(req, fp8=True, encoder_device="cpu", kv_sets=4, vae_on_gpu=False)
    dit_only = (p.parts["dit"] + p.parts["kv_cache"] + p.parts["text"] + p.parts["activations"]) / GiB
    assert measured_gib <= dit_only <= measured_gib * 1.03


def test_a_session_out_of_memory_counts_its_own_memory_and_names_the_ladder_and_the_cuda_message():
    err = session_oom_error(
        HD, 4, 9 * GiB, kv_dtype_bytes=1, cause=RuntimeError("CUDA out of memory. Tried to allocate 4.83 GiB\nmore")
    )
    assert isinstance(err, ResourceExhausted)
    msg = str(err)
    need = sum(session_bytes(HD, 4, 1).values())
    head = "ran out of GPU memory in a 704*384 session (infer_frames 48, 4 FP8 KV cache set(s)): "
    head += f"needs {need / GB:.1f} GB"
    assert msg.startswith(head) and "9.7 GB free" in msg  # the loaded model's weights are not counted
    assert "one KV cache set (--cache-sets 1): needs" in msg and "a smaller size, 384*256: needs" in msg
    assert "Tried to allocate 4.83 GiB" in msg and "more" not in msg


def test_session_check_passes_when_the_cache_fits_and_refuses_with_the_ladder_otherwise():
    need = session_bytes(HD, 4)
    assert need["kv_cache"] == 4 * kv_set_bytes(HD, 2) + 2 * sink_bytes(HD, 2) + 40 * 1056 * 5120 * 2
    check_session_memory(HD, 4, available=sum(need.values()))  # exactly enough: no error
    with pytest.raises(ResourceExhausted) as e:
        check_session_memory(HD, 4, available=20 * GiB)  # a second HD session on an 80 GB card
    msg = str(e.value)
    assert "needs 47.7 GB (KV cache 46.3, prompt 0.4, activations 1.0), 21.5 GB free" in msg
    assert "one KV cache set (--cache-sets 1): needs 14.4 GB (fits)" in msg
    assert "a smaller size, 384*256: needs" in msg and "fewer sessions" in msg
    # an FP8 cache halves it
    assert session_bytes(HD, 1, 1)["kv_cache"] * 2 == session_bytes(HD, 1, 2)["kv_cache"]


# --- start-up planning: the ModelSpec a server runs, chosen from the GPU's free memory ------------


def test_plan_for_device_picks_the_fastest_config_that_fits_and_the_spec_runs_it():
    from avatar.memory_planner import plan_for_device
    from avatar.presets import ModelSpec

    spec = ModelSpec(name="s2v-14b", random_weights=True, device="cuda")
    seen = []
    for gib in (140, 80, 48, 24):
        planned, plan, req = plan_for_device(spec, available=gib * GiB, fp8_capable=True)
        assert plan.total <= gib * GiB
        assert planned.fp8 == plan.fp8
        assert (planned.generator_options.cache_sets or req.sample_steps) == plan.kv_sets
        assert (planned.generator_options.kv_dtype or "bfloat16") == plan.kv_dtype
        assert (planned.encoder_device == "cpu") == (plan.encoder_device == "cpu")
        seen.append((plan, req))
    assert not seen[0][0].fp8 and seen[0][0].kv_sets == 4 and seen[0][1].size == "704*384"  # big card: bf16
    assert seen[1][1].size == "704*384"  # an 80 GB card plans for hd
    plan24, req24 = seen[-1]
    assert req24.size == "384*256" and plan24.encoder_device == "cpu"  # 24 GB: preview, like the measurements
    with pytest.raises(ResourceExhausted, match="needs"):
        plan_for_device(spec, available=12 * GiB, fp8_capable=True)


def test_cli_plans_memory_on_a_gpu_unless_the_user_chose(monkeypatch):
    import torch

    from avatar import memory_planner
    from avatar.app import cli
    from avatar.presets import GeneratorOptions

    monkeypatch.setattr(memory_planner, "gpu_available_bytes", lambda index=0: 40 * GiB)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    base = [
        "generate",
        "--image",
        "a.png",
        "--audio",
        "a.wav",
        "--out",
        "o.mp4",
        "--random-weights",
        "--device",
        "cuda",
    ]
    planned = cli.model_spec(cli.build_parser().parse_args(base))
    _, plan, _ = memory_planner.plan_for_device(planned.with_(fp8=False, generator_options=GeneratorOptions()))
    assert planned.fp8 == plan.fp8 and plan.fp8  # 40 GB: FP8 weights needed for hd
    chosen = cli.model_spec(cli.build_parser().parse_args(base + ["--cache-sets", "1"]))  # the user's choice stands
    assert not chosen.fp8 and chosen.generator_options == GeneratorOptions(cache_sets=1)
    off = cli.model_spec(cli.build_parser().parse_args(base + ["--memory-plan", "off"]))
    assert not off.fp8 and off.generator_options == GeneratorOptions()
    monkeypatch.setattr(memory_planner, "gpu_available_bytes", lambda index=0: 8 * GiB)
    with pytest.raises(cli.UserError, match="not enough GPU memory"):
        cli.model_spec(cli.build_parser().parse_args(base))
    monkeypatch.setenv("WORLD_SIZE", "4")  # a TPP rank: one cache set each, no single-GPU plan
    assert cli.model_spec(cli.build_parser().parse_args(base)).generator_options == GeneratorOptions()


def test_the_planners_numbers_are_the_models():
    """Dims, token counts and cache bytes come from the model's own config and KV layout (one source):
    the 14B model built on the meta device has the planner's parameter counts, sink and cache sizes."""
    import torch

    from avatar.memory_planner import DIT_FP8_PARAMS, DIT_PARAMS, kv_cache_bytes
    from avatar.services.generator.kv_cache import KVCacheSpec
    from avatar.services.generator.weights import build_dit

    dit = build_dit("s2v-14b", "meta")
    assert sum(p.numel() for p in dit.parameters()) == DIT_PARAMS
    assert (
        sum(
            m.weight.numel()
            for name, m in dit.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(("blocks.", "audio_injector."))
        )
        == DIT_FP8_PARAMS
    )
    for req in (HD, PREVIEW, MemoryRequest(688, 368, infer_frames=48)):
        h, w = req.height // 8, req.width // 8
        assert (req.sink_tokens, req.tokens_per_latent_frame) == (dit.sink_tokens(h, w), dit.frame_tokens(h, w))
        for sets in (1, 2, req.sample_steps):
            spec = KVCacheSpec.for_model(dit, h, w, req.window_latent_frames, sets)
            assert kv_cache_bytes(req, sets, 2) == spec.nbytes(torch.bfloat16)


def test_sample_steps_beyond_the_one_limit_are_refused_everywhere():
    from avatar.dit_config import MAX_SAMPLE_STEPS
    from avatar.services.generator.scheduler import FlowMatchEuler

    assert MemoryRequest(384, 256, sample_steps=MAX_SAMPLE_STEPS).sample_steps == MAX_SAMPLE_STEPS
    with pytest.raises(InvalidInput, match=f"between 1 and {MAX_SAMPLE_STEPS}"):
        MemoryRequest(384, 256, sample_steps=MAX_SAMPLE_STEPS + 1)
    assert FlowMatchEuler.create(MAX_SAMPLE_STEPS).num_steps == MAX_SAMPLE_STEPS
    with pytest.raises(ValueError, match=f"between 1 and {MAX_SAMPLE_STEPS}"):
        FlowMatchEuler.create(MAX_SAMPLE_STEPS + 1)


def test_the_fp8_hint_quotes_the_planners_own_weight_sizes():
    with pytest.raises(ResourceExhausted) as e:
        plan_memory(HD, CARD_24, PlannerOptions(precision="bf16"))
    assert f"from {dit_bytes(False) / GB:.1f} to {dit_bytes(True) / GB:.1f} GB" in str(e.value)


# --- per rank, for the multi-GPU layouts (docs/operations.md, "Memory per rank") -----------------


def test_fsdp_units_add_up_to_the_checkpoint_and_match_the_model():
    """The planner's unit sizes come from the config; the model built on the meta device agrees."""
    import torch

    from avatar.memory_planner import DIT_FP8_PARAMS, DIT_PARAMS, dit_unit_params
    from avatar.services.generator.causal_s2v_dit import CausalS2VDiT

    u = dit_unit_params()
    with torch.device("meta"):
        dit = CausalS2VDiT()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    block = dit.blocks[0]
    assert u["block"] == count(block)
    assert u["text_projections"] == sum(
        count(m) for m in (block.cross_attn.k, block.cross_attn.v, block.cross_attn.norm_k)
    )
    assert u["injector"] == count(dit.audio_injector.injector[0]) + count(dit.audio_injector.injector_adain_layers[0])
    assert u["blocks"] + u["injectors"] + u["root"] == DIT_PARAMS == count(dit)
    assert 40 * u["block_linear_weights"] + 12 * u["injector_linear_weights"] == DIT_FP8_PARAMS


def test_rank_bytes_at_704x384_on_24_gib_cards():
    """docs/operations.md's table: which layout fits a 24 GiB card (22 GiB peak, issue 15's bar)."""
    from avatar.memory_planner import dit_bytes, rank_bytes, sharded_dit_bytes

    bar = 22 * GiB

    def total(layout, degree, **kw):
        return sum(rank_bytes(HD, layout, degree, **kw).values())

    fp8_1set = dict(fp8=True, kv_sets=1, kv_dtype="float8_e4m3fn")
    # a full copy per rank does not fit, one GPU or TPP (each TPP rank still holds a whole step set)
    assert total("single", 1, **fp8_1set) > bar and total("tpp", 4, fp8=True, kv_dtype="float8_e4m3fn") > bar
    # FSDP2 fits with FP8 weights and one FP8 cache set, over 2 or 4 cards; 4 sets do not fit
    assert total("fsdp", 2, **fp8_1set) < 18 * GiB and total("fsdp", 4, **fp8_1set) < 14 * GiB
    assert total("fsdp", 4, fp8=True, kv_dtype="float8_e4m3fn") > bar
    # FSDP shards the weights only: 4 ranks hold a quarter each (+ the root and two gathered blocks)
    w = sharded_dit_bytes(True, 4)
    assert 4 * w["shards"] == pytest.approx(dit_bytes(True) - w["root"], rel=1e-6)
    # the VAE on rank 0 (no decoder GPU of its own) costs 3.2 GiB there
    assert total("fsdp", 4, vae_on_gpu=True, **fp8_1set) - total("fsdp", 4, **fp8_1set) > 3 * GiB
    with pytest.raises(InvalidInput, match="layout must be one of"):
        rank_bytes(HD, "pipeline", 2, fp8=True)
