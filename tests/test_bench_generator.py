"""The GPU benchmark's code paths, run on CPU with the tiny model (a model change that breaks
the bench shows up in CI)."""

import json
import sys

import pytest

sys.path.insert(0, "bench")
import bench_generator  # noqa: E402


def test_bench_runs_every_cpu_path_and_writes_json(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "bench_generator.py",
            "--tiny",
            "--device",
            "cpu",
            "--sizes",
            "384*256",
            "--only",
            "bf16,fp8,vae,engine,legacy",
            "--blocks",
            "2",
            "--warm",
            "1",
            "--flat-blocks",
            "0",
            "--out",
            str(out),
        ],
    )
    bench_generator.main()
    res = json.loads(out.read_text())
    assert res["errors"] == {}
    runs = {(r["variant"], r["kv_sets"]) for r in res["runs"]}
    assert runs == {("bf16", 4), ("bf16", 1), ("fp8", 4), ("fp8", 1), ("fp8-legacy-kv", 4)}
    for r in res["runs"]:
        assert r["step_ms"] > 0 and r["block_ms"] >= r["step_ms"] and len(r["block_ms_all"]) == 2
        assert (r["clean_pass_ms"] > 0) == (r["kv_sets"] == 1)
    assert res["fp8"]["swapped_linears"] > 0
    vae = res["vae"][0]
    assert vae["vae_ms"] > 0 and vae["mux_smooth_ms"] > 0
    assert res["engine"][0]["block_ms"] > 0


def test_the_legacy_kv_reads_give_the_same_latents(monkeypatch):
    """The before/after comparison is fair only if the emulated old reads compute the same thing.
    Checked without norm3's bf16 rounding: the two key orders differ in the last float32 bit, and
    a bf16 rounding that flips on such a bit moves the latents by ~1e-4."""
    import torch

    from avatar.services.generator import causal_s2v_dit

    monkeypatch.setattr(causal_s2v_dit, "CROSS_ATTN_NORM_DTYPE", torch.float32)
    dit = bench_generator.build_dit("tiny", "cpu")
    for sets in (4, 1):
        cfg = bench_generator.LoopConfig(192, 128, num_sets=sets)
        now = bench_generator.step_latents(dit, cfg, "cpu", blocks=5)  # 15 frames: the 12-frame ring wraps
        with bench_generator.legacy_kv_reads():
            before = bench_generator.step_latents(dit, cfg, "cpu", blocks=5)
        for a, b in zip(now, before):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_bench_steps_with_the_engines_schedule():
    """The bench runs the engine's sessions, so it samples with the engine's (upstream's) sigmas; its
    own formula, which it used to keep, put step 2 at 0.75 instead of upstream's 0.602."""
    from avatar.services.generator.scheduler import FlowMatchEuler

    loop = bench_generator.TimedSession(
        bench_generator.build_dit("tiny", "cpu"),
        bench_generator.LoopConfig(128, 128),
        "cpu",
        bench_generator.Clock("cpu"),
    )
    s = loop.sampler.sigmas
    loop.close()
    assert s == FlowMatchEuler.create(4, shift=3.0).sigmas
    assert s[0] == 1.0 and s[-1] == 0.0 and len(s) == 5 and all(a > b for a, b in zip(s, s[1:]))


def test_the_profile_times_a_steady_block():
    """The kernel profile must be of a block that reads the full ring, as every block after the
    first clip does; the second block read 8976 of 15312 keys at 704*384, which hid ~20 ms of
    attention per step in runs F1/F2."""
    dit = bench_generator.build_dit("tiny", "cpu")
    loop = bench_generator.steady_session(dit, bench_generator.LoopConfig(128, 128), "cpu", warm_blocks=0)
    spec = loop.session.kv.spec
    first = bench_generator.keys_read(loop.session)
    loop.close()
    loop = bench_generator.steady_session(dit, bench_generator.LoopConfig(128, 128), "cpu")
    assert first < spec.sink_tokens + spec.ring_tokens
    assert bench_generator.keys_read(loop.session) == spec.sink_tokens + spec.ring_tokens
    loop.close()


def test_pipeline_bench_runs_its_cpu_paths_and_writes_json(tmp_path, monkeypatch):
    import bench_pipeline

    out = tmp_path / "pipeline.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "bench_pipeline.py",
            "--tiny",
            "--device",
            "cpu",
            "--sizes",
            "64*64",
            "--only",
            "graphs,pipeline,24gb",
            "--out",
            str(out),
        ],
    )
    assert bench_pipeline.main() == 0
    res = json.loads(out.read_text())
    assert res["errors"] == {}
    labels = [r["label"] for r in res["runs"]]
    assert labels[1:] == [
        "cpu",
        "cpu+graphs",
        "cpu+graphs, pipeline",
        "24gb, pipeline, infer_frames 24",
        "24gb+graphs, pipeline, infer_frames 24",
        "24gb, pipeline, infer_frames 36",
    ]
    assert res["graphs_vs_eager_max_abs_diff"]["64*64"] == {"max_abs": 0.0, "rel": 0.0}
    for r in res["runs"][1:]:
        assert 0 < r["first_fragment_s"] and r["fps"] > 0 and r["dit_block_ms"] > 0
        assert ("vae_ms" in r) == r["decoder"] and (r["fragment_kb"] > 0 if r["decoder"] else True)
    assert res["offload_text_projections"]["text_kv_identical"] is True


def test_the_fused_norms_part_times_both_paths_and_compares_their_latents(tmp_path, monkeypatch):
    """--only fused-norms (the kernels in Triton's interpreter here): the four kernels against the
    block's compiled torch code, both DiT variants, their latents."""
    import torch
    from triton_interpreter import exact_downcasts

    from avatar.services.generator.weights import random_dit

    # the kernels round as a bf16 model does: the tiny model in bf16 (the bench's CPU default is float32)
    monkeypatch.setattr(bench_generator, "build_dit", lambda preset, device: random_dit(preset, device, torch.bfloat16))
    out = tmp_path / "bench.json"
    argv = ["bench_generator.py", "--tiny", "--device", "cpu", "--sizes", "384*256", "--only", "fused-norms"]
    monkeypatch.setattr(sys, "argv", argv + ["--blocks", "2", "--warm", "1", "--out", str(out)])
    with exact_downcasts():
        bench_generator.main()
    res = json.loads(out.read_text())
    assert res["errors"] == {}
    kernels = res["norm_kernels"][0]
    names = ("norm1+modulate", "gated residual+norm3", "residual+norm2+modulate", "gelu")
    assert set(kernels) == {"size", "tokens", *names, "k rms+rope to the FP8 cache"}
    for name in names:
        assert kernels[name]["fused_ms"] > 0 and kernels[name]["compiled_ms"] > 0
        assert kernels[name]["codes_equal"] > 0.99 and kernels[name]["scale_max_rel_diff"] < 0.02, kernels[name]
    assert kernels["k rms+rope to the FP8 cache"]["codes_equal"] == 1.0
    assert kernels["gated residual+norm3"]["residual_equal"] and kernels["residual+norm2+modulate"]["residual_equal"]
    variants = ["fp8 fp8-attention", "fp8 fp8-attention fused-norms", "fp8 fp8-attention legacy-injections"]
    assert [r["variant"] for r in res["runs"]] == variants
    errors = res["fused_norms_quality"]["96*64"]
    assert len(errors) == 8 and max(errors) < 0.05, errors


def test_the_legacy_injections_compute_what_the_injections_compute():
    """The before/after of the audio injections' compilation is fair only if the emulated old
    call computes the same thing (eager here: the same ops in the same order)."""
    import torch

    dit = bench_generator.build_dit("tiny", "cpu")
    cfg = bench_generator.LoopConfig(192, 128)
    now = bench_generator.step_latents(dit, cfg, "cpu", blocks=1)
    with bench_generator.legacy_injections(dit, compiled=False):
        before = bench_generator.step_latents(dit, cfg, "cpu", blocks=1)
    assert len(now) == 4 and all(torch.equal(a, b) for a, b in zip(now, before))


def test_gpu_timeline_finds_the_idle_gaps_and_what_the_host_was_in(tmp_path):
    """Kernels 0-100 us and 150-250 us and 250-300 us on the GPU; the host in a stream sync
    inside an `aten::item` during the first gap, in a launch inside `aten::mm` at the second."""
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1000, "dur": 100},
            {"ph": "X", "cat": "kernel", "name": "norm", "ts": 1150, "dur": 100},
            {"ph": "X", "cat": "kernel", "name": "attn", "ts": 1240, "dur": 60},  # overlaps norm
            {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 1400, "dur": 20},
            {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 1090, "dur": 70},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 1095, "dur": 60},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1290, "dur": 200},
            {"ph": "X", "cat": "cpu_op", "name": "outer", "ts": 900, "dur": 1000},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1340, "dur": 20},
            {"ph": "i", "name": "marker", "ts": 1200},
        ]
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    t = bench_generator.gpu_timeline(str(path))
    assert t["span_ms"] == 0.42 and t["gaps"] == 2 and t["gaps_over_50us"] == 1
    assert abs(t["gpu_busy_ms"] - 0.27) < 1e-9 and abs(t["idle_ms"] - 0.15) < 1e-9
    assert [(c["cause"], round(c["ms"], 3)) for c in t["idle_by_cause"]] == [
        ("cudaLaunchKernel in aten::mm", 0.1),
        ("cudaStreamSynchronize in aten::item", 0.05),
    ]
    assert t["largest_gaps"][0] | {"at_ms": None} == {
        "us": 100.0,
        "at_ms": None,
        "cause": "cudaLaunchKernel in aten::mm",
        "after": "attn",
        "before": "Memset",
    }
    assert t["kernel_ms_by_kind"] == {"gemm": 0.1, "other": 0.1, "attention": 0.06, "copy / memset": 0.02}
    names = {
        "nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_ovscale_bias_TNT": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f8_knob_32_64x256x128_4x1x1_cga1x1": "attention",
        "triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_view_13": "inductor",
        "triton_red_fused__scaled_dot_product_cudnn_attention__to_copy_mean_mul_pow_rsqrt": "inductor",
        "_norm_quantize_kernel": "fused norms",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::Tenso": "copy / memset",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>": "other",
    }
    assert {n: bench_generator.kernel_kind(n) for n in names} == names
    assert [(k["kernel"], k["calls"]) for k in t["kernels"]] == [("gemm", 1), ("norm", 1), ("attn", 1), ("Memset", 1)]
    assert t["memsets_before"] == {"(the end)": 1}
    assert bench_generator.gpu_timeline(str(path)) == t


def test_gpu_timeline_counts_the_work_each_memset_comes_before(tmp_path):
    """Run U1 had 2080 memsets a block of unknown origin: the kernel after each names its user."""
    kernel = {"ph": "X", "cat": "kernel", "dur": 10}
    memset = {"ph": "X", "cat": "gpu_memset", "name": "Memset (Unknown)", "dur": 1}
    events = [
        memset | {"ts": 0},
        kernel | {"name": "sdpa_fp8", "ts": 2},
        kernel | {"name": "gemm", "ts": 20},
        memset | {"ts": 40},
        kernel | {"name": "sdpa_fp8", "ts": 42},
        memset | {"ts": 60},
        kernel | {"name": "quantize", "ts": 62},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert bench_generator.gpu_timeline(str(path))["memsets_before"] == {"sdpa_fp8": 2, "quantize": 1}


def _engine_gaps(tmp_path, monkeypatch, *extra: str) -> dict:
    """bench_generator.py --only engine-gaps on the tiny DiT (bf16, random) on the CPU, the Triton
    kernels in the interpreter; its JSON results."""
    import torch
    from triton_interpreter import exact_downcasts

    from avatar.services.generator.weights import random_dit

    monkeypatch.setattr(bench_generator, "build_dit", lambda preset, device: random_dit(preset, device, torch.bfloat16))
    out = tmp_path / "bench.json"
    argv = ["bench_generator.py", "--tiny", "--device", "cpu", "--sizes", "384*256", "--only", "engine-gaps"]
    monkeypatch.setattr(sys, "argv", [*argv, "--blocks", "1", "--warm", "0", *extra, "--out", str(out)])
    with exact_downcasts():
        bench_generator.main()
    return json.loads(out.read_text())


def test_the_engine_gaps_part_runs_the_engine_both_ways(tmp_path, monkeypatch):
    """--only engine-gaps on the CPU (no profiler there): the engine with FP8 attention over the
    FP8 cache, without and with the fused norms, per size."""
    res = _engine_gaps(tmp_path, monkeypatch)
    assert res["errors"] == {}
    runs = res["engine_gaps"]
    assert [(r["size"], r["fused_norms"]) for r in runs] == [("96*64", True), ("96*64", False)]
    for r in runs:
        assert r["generator_options"] == {"kv_dtype": "float8_e4m3fn", "fp8_attention": True}
        assert len(r["block_ms_all"]) == 1 and r["block_ms"] > 0


def test_the_engine_gaps_part_runs_the_swept_launch_widths_beside_the_defaults(tmp_path, monkeypatch):
    """--norm-warps FILE (bench_norm_warps.py's --out): the fused engine at the default launch
    widths, then at the file's; fused_norms' own widths are put back afterwards."""
    from avatar.services.generator import fused_norms

    monkeypatch.setattr(fused_norms, "LAUNCH_WARPS", {"rope_into": 2})
    seen = []
    real = fused_norms._launch_shape
    monkeypatch.setattr(fused_norms, "_launch_shape", lambda c, k: seen.append((k, real(c, k)[1])) or real(c, k))
    warps = tmp_path / "warps.json"
    warps.write_text(json.dumps({"warps": {"norm_quantize": 16, "gelu_quantize": 2}}))
    res = _engine_gaps(tmp_path, monkeypatch, "--norm-warps", str(warps))
    assert res["errors"] == {}
    runs = res["engine_gaps"]
    assert [(r["fused_norms"], r["launch_warps"]) for r in runs] == [
        (True, {"rope_into": 2}),
        (True, {"norm_quantize": 16, "gelu_quantize": 2}),
    ]
    assert ("norm_quantize", 16) in seen and ("gelu_quantize", 2) in seen and ("rope_into", 2) in seen
    assert fused_norms.LAUNCH_WARPS == {"rope_into": 2}


def test_the_engine_gaps_part_runs_each_fp8_attention_kernel(tmp_path, monkeypatch):
    """--fp8-kernels triton,cudnn: the engine with each kernel (here the Triton one in the
    interpreter, the reference for cuDNN's), the cache laid out for it."""
    import torch

    from avatar.services.generator import fp8_attention_triton

    monkeypatch.setattr(fp8_attention_triton, "DEFAULT_CONFIG", fp8_attention_triton.DEFAULT_CONFIG)
    monkeypatch.setattr(fp8_attention_triton, "DEFAULT_WARP_SPECIALIZE", False)
    kernels = []
    real = torch.ops.avatar.fp8_sdpa
    monkeypatch.setattr(torch.ops.avatar, "fp8_sdpa", lambda *a: kernels.append(a[4]) or real(*a))
    # --triton-attention: the tiles of this run (e.g. bench_attention's fastest)
    res = _engine_gaps(tmp_path, monkeypatch, "--fp8-kernels", "triton,cudnn", "--triton-attention", "32,32,4,2")
    assert res["errors"] == {}
    runs = res["engine_gaps"]
    assert [(r["fused_norms"], r["fp8_attention_kernel"]) for r in runs] == [(True, "triton"), (True, "cudnn")]
    assert runs[0]["generator_options"]["fp8_attention_kernel"] == "triton"
    assert kernels.index("cudnn") > 0 and set(kernels[: kernels.index("cudnn")]) == {"triton"}
    assert fp8_attention_triton.DEFAULT_CONFIG == (32, 32, 4, 2) and not fp8_attention_triton.DEFAULT_WARP_SPECIALIZE


def test_the_engine_gaps_part_runs_each_variant(tmp_path, monkeypatch):
    """--variants: the fused engine once per variant (the FFN's products before their scales or not,
    q, k and v as one GEMM or three, the kernels' warps a program), each over the defaults;
    fused_norms' settings are put back."""
    import torch

    from avatar.services.generator import fused_norms

    seen = []
    real = torch.ops.avatar.gelu_quantize
    monkeypatch.setattr(
        torch.ops.avatar,
        "gelu_quantize",
        lambda x, *scales: (
            seen.append((bool(scales), fused_norms.LAUNCH_WARPS.get("gelu_quantize"))) or real(x, *scales)
        ),
    )
    defaults = dict(fused_norms.LAUNCH_WARPS)
    variants = [{}, {"ffn_products": False, "qkv_gemm": True}, {"warps": {"gelu_quantize": 16}}]
    res = _engine_gaps(tmp_path, monkeypatch, "--variants", json.dumps(variants))
    assert res["errors"] == {}
    runs = res["engine_gaps"]
    assert [r["variant"] for r in runs] == variants
    got = [(r["ffn_products"], r["qkv_gemm"], r["launch_warps"]) for r in runs]
    assert got == [(True, False, defaults), (False, True, defaults), (True, False, {**defaults, "gelu_quantize": 16})]
    default_gelu = defaults.get("gelu_quantize")
    # a product went into gelu_quantize, or not, at the variant's warps
    assert {(True, default_gelu), (False, default_gelu), (True, 16)} == set(seen)
    assert fused_norms.LAUNCH_WARPS == defaults


@pytest.mark.parametrize(
    "bad,why",
    [
        ("[{", "not JSON"),
        ("no-such-file.json", "neither JSON nor a readable file"),
        ("{}", "expected a non-empty list"),
        ('[{"ffn": true}]', "unknown key 'ffn'"),
        ('[{"ffn_products": 1}]', "must be a bool"),
        ('[{"qkv_gemm": "yes"}]', "qkv_gemm must be a bool"),
        ('[{"warps": [8]}]', "must be a dict"),
        ('[{"warps": {"gelu_quantize": "8"}}]', "warps must map"),
    ],
)
def test_bad_variants_exit_2_with_the_reason(bad, why, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_generator.py", "--tiny", "--device", "cpu", "--variants", bad])
    with pytest.raises(SystemExit) as exit_:
        bench_generator.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--variants: " in err and why in err and "Traceback" not in err, err


def test_variants_come_inline_or_from_a_file(tmp_path):
    variants = [{}, {"ffn_products": False, "warps": {"residual_norm_quantize": 8}}]
    path = tmp_path / "variants.json"
    path.write_text(json.dumps(variants))
    assert bench_generator.engine_variants(str(path)) == variants
    assert bench_generator.engine_variants(" " + json.dumps(variants)) == variants
