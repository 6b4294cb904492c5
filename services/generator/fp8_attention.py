"""FP8 self-attention over the KV cache (opt-in: `--fp8-attention`): on Hopper either cuDNN's fused
FP8 attention through the cuDNN frontend (`pip install nvidia-cudnn-frontend`), our Triton kernel
of the same arithmetic (fp8_attention_triton.py) or FlashInfer's (fp8_attention_flashinfer.py: its
probabilities scaled by 448, its output in bf16), chosen by `--fp8-attention-kernel`;
elsewhere (the CPU tests) a torch reference of each.

Numerics: keys and values are read as the FP8 KV cache stores them (e4m3, unscaled: the option
implies `--kv-fp8`, and no upcast copy of the cache slice is made); the queries are quantised to
e4m3 with one scale per call: amax / 448, or, with `--fused-norms`, a scale fixed by the q-norm's
weight that bounds every value (fused_norms.rms_rope_fp8: the codes come out of the norm's kernel,
no reduction over the queries first; e4m3 is a floating-point format, so the finer or coarser
scale changes the error little: docs/performance.md); the softmax numerators enter the second product as
e4m3 scaled by 256 (a power of two); the output is e4m3 (on Hopper cuDNN writes FP8 attention
output only in FP8), turned back to bf16 for the output projection, or, with `--fused-norms`
and an FP8 projection, handed to it as they are (no second rounding to per-row scales).
Products accumulate in float32. Speed and error against bf16 attention: docs/performance.md ("FP8 attention").
"""

from __future__ import annotations

import math
import os
import threading

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
P_SCALE = 256.0  # the probabilities' scale into e4m3 (cuDNN's scale_s)


def fp8_attention(q: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor) -> torch.Tensor:
    """q [B, Lq, H, D] (bf16), k8/v8 [B, Lk, H, D] e4m3 (views into the cache) -> [B, Lq, H*D] in q's dtype."""
    return fp8_attention_codes(q, k8, v8).to(q.dtype)


def fp8_attention_codes(q: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, kernel: str = "cudnn") -> torch.Tensor:
    """fp8_attention's output as the kernels write it: e4m3 [B, Lq, H*D] at scale 1 (the codes are
    the values). An FP8 projection can take them as they are (FP8Rows with scales of 1).
    kernel: "cudnn", "triton" (which reads v8 fastest keys-last: KVCache's layout for it) or
    "flashinfer" (its bf16 output rounded to the same codes; the model takes fp8_attention_bf16)."""
    return fp8_attention_codes_q8(*_quantize_queries(q), k8, v8, kernel)


def fp8_attention_codes_q8(
    q8: torch.Tensor, descale_q: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, kernel: str = "cudnn"
) -> torch.Tensor:
    """fp8_attention_codes of queries already in e4m3 (q8 [B, Lq, H, D], their values q8 * descale_q
    [1, 1, 1, 1]), e.g. from fused_norms.rms_rope_fp8."""
    return torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale_q, kernel).flatten(2)


def fp8_attention_bf16(q: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor) -> torch.Tensor:
    """FlashInfer's FP8 attention with its output as it writes it, bf16 [B, Lq, H*D]: an FP8
    projection quantises each row to its own scale, finer than e4m3 codes at scale 1 (run Q1:
    most of the FP8 attention's error against exact attention is that output rounding)."""
    return fp8_attention_bf16_q8(*_quantize_queries(q), k8, v8)


def fp8_attention_bf16_q8(
    q8: torch.Tensor, descale_q: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor
) -> torch.Tensor:
    """fp8_attention_bf16 of queries already in e4m3 (as fp8_attention_codes_q8)."""
    return torch.ops.avatar.fp8_sdpa_bf16(q8, k8, v8, descale_q).flatten(2)


def _quantize_queries(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 queries with one scale for the call (amax / 448) and that scale [1, 1, 1, 1]."""
    descale = q.abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    q8 = (q.float() / descale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q8, descale.reshape(1, 1, 1, 1)


def unavailable_reason(device: torch.device | str, kernel: str = "cudnn") -> str | None:
    """Why `--fp8-attention` with `kernel` cannot run on `device` (None: it can). The CPU runs the
    reference."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if kernel == "triton":  # FP8 tensor cores: Ada (8.9) and Hopper
        from avatar.services.generator.fp8_attention_triton import unavailable_reason as triton_reason

        return triton_reason(device)
    if kernel == "flashinfer":  # built from flashinfer-python's headers with nvcc, for Hopper
        from avatar.services.generator.fp8_attention_flashinfer import unavailable_reason as flashinfer_reason

        return flashinfer_reason(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return (
            f"--fp8-attention with cuDNN's kernel needs a Hopper GPU (compute capability 9.0); {device} is not "
            "(--fp8-attention-kernel triton runs from 8.9)"
        )
    try:
        import cudnn  # noqa: F401
    except ImportError:
        return (
            "--fp8-attention-kernel cudnn needs the cuDNN frontend: pip install nvidia-cudnn-frontend "
            "(or --fp8-attention-kernel triton)"
        )
    return None


@torch.library.custom_op("avatar::fp8_sdpa", mutates_args=())
def fp8_sdpa(
    q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor, impl: str = "cudnn"
) -> torch.Tensor:
    """Unmasked attention of e4m3 tensors [B, L, H, D] (q scaled by descale_q, k and v by 1) ->
    e4m3 [B, Lq, H, D]. An opaque op for torch.compile: inductor fuses the quantisation around it.
    impl: "cudnn", "triton" or "flashinfer" (not `kernel`: Inductor's fallback for the op has an
    argument of that name)."""
    if impl == "triton" and (q8.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from avatar.services.generator.fp8_attention_triton import fp8_sdpa_triton

        return fp8_sdpa_triton(q8, k8, v8, descale_q.reshape(1))  # the CPU: Triton's interpreter (tests)
    if impl == "flashinfer":  # its bf16 output as the codes the other kernels give
        return fp8_sdpa_bf16(q8, k8, v8, descale_q).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    if q8.is_cuda:
        return _CudnnFp8Sdpa.get(q8, k8, v8)(q8, k8, v8, descale_q)
    return reference(q8, k8, v8, descale_q)


@fp8_sdpa.register_fake
def _(q8, k8, v8, descale_q, impl="cudnn"):
    return q8.new_empty((*q8.shape[:-1], v8.shape[-1]))


@torch.library.custom_op("avatar::fp8_sdpa_bf16", mutates_args=())
def fp8_sdpa_bf16(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor) -> torch.Tensor:
    """FlashInfer's FP8 attention of e4m3 [B, L, H, D] tensors (q scaled by descale_q, k and v by
    1) -> bf16 [B, Lq, H, D], as its kernel writes it; on the CPU the reference of its arithmetic."""
    from avatar.services.generator import fp8_attention_flashinfer as fi

    if q8.is_cuda:
        return fi.fp8_sdpa_flashinfer(q8, k8, v8, descale_q)
    return reference(q8, k8, v8, descale_q, p_scale=fi.P_SCALE, bf16_out=True)


@fp8_sdpa_bf16.register_fake
def _(q8, k8, v8, descale_q):
    return q8.new_empty((*q8.shape[:-1], v8.shape[-1]), dtype=torch.bfloat16)


def reference(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descale_q: torch.Tensor,
    p_scale: float = P_SCALE,
    bf16_out: bool = False,
) -> torch.Tensor:
    """cuDNN's FP8 attention arithmetic in float32 torch (one softmax max instead of a running one:
    the same up to the e4m3 rounding of the probabilities): e4m3 codes out. p_scale 448 and
    bf16_out: FlashInfer's (its probabilities' scale; its output, bf16)."""
    q = q8.float() * descale_q.float().reshape(())
    s = torch.einsum("bmhd,bnhd->bhmn", q, k8.float()) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(-1, keepdim=True))
    norm = p.sum(-1).transpose(1, 2)[..., None]  # [B, Lq, H, 1]
    p8 = (p * p_scale).to(E4M3).float() / p_scale
    out = torch.einsum("bhmn,bnhd->bmhd", p8, v8.float()) / norm
    if bf16_out:
        return out.to(torch.bfloat16).contiguous()
    # contiguous, as cuDNN's output and the op's fake: compiled callers rely on those strides
    return out.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous()


class _CudnnFp8Sdpa:
    """One built cuDNN FP8 attention graph, for one set of shapes and strides (a session's few
    cache spans at one size: built on first use, outside any CUDA graph capture; see step_graphs)."""

    _built: dict[tuple, _CudnnFp8Sdpa] = {}
    _lock = threading.Lock()
    _handles = threading.local()

    @classmethod
    def get(cls, q8, k8, v8) -> _CudnnFp8Sdpa:
        key = (q8.device, *(tuple(t.shape) + t.stride() for t in (q8, k8, v8)))
        with cls._lock:
            if key not in cls._built:
                cls._built[key] = cls(q8, k8, v8)
            return cls._built[key]

    @classmethod
    def handle(cls, device: torch.device):
        import cudnn

        handles = cls._handles.__dict__.setdefault("by_device", {})
        if device not in handles:
            with torch.cuda.device(device):
                handles[device] = cudnn.create_handle()
        return handles[device]

    def __init__(self, q8, k8, v8, every_plan: bool = False):
        """every_plan: build each plan cuDNN offers, not only the heuristics' choice, so that a
        bench can run them one by one (use_plan; bench/bench_attention.py times them)."""
        import cudnn

        b, lq, h, d = q8.shape
        dev = q8.device
        self.out_shape = (b, lq, h, v8.shape[-1])
        g = cudnn.pygraph(
            io_data_type=cudnn.data_type.FP8_E4M3,
            intermediate_data_type=cudnn.data_type.FLOAT,
            compute_data_type=cudnn.data_type.FLOAT,
            handle=self.handle(dev),
        )

        def bhsd(t):  # our [B, L, H, D] as cuDNN's logical [B, H, L, D], same memory
            return dict(
                dim=[t.shape[0], t.shape[2], t.shape[1], t.shape[3]], stride=[t.stride(i) for i in (0, 2, 1, 3)]
            )

        def scalar(name):
            return g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)

        self.q, self.k, self.v = (
            g.tensor(name=n, data_type=cudnn.data_type.FP8_E4M3, **bhsd(t))
            for n, t in (("q", q8), ("k", k8), ("v", v8))
        )
        names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
        self.scales = {n: scalar(n) for n in names}
        o, _, amax_s, amax_o = g.sdpa_fp8(
            q=self.q,
            k=self.k,
            v=self.v,
            **self.scales,
            is_inference=True,
            attn_scale=1 / math.sqrt(d),
            use_causal_mask=False,
            name="fp8_sdpa",
        )
        out = torch.empty(self.out_shape, dtype=E4M3, device=dev)
        o.set_output(True).set_data_type(cudnn.data_type.FP8_E4M3).set_dim(bhsd(out)["dim"]).set_stride(
            bhsd(out)["stride"]
        )
        for amax in (amax_s, amax_o):  # outputs cuDNN insists on; nothing reads them
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        if every_plan:
            g.build_plans(cudnn.build_plan_policy.ALL)
        else:
            g.build_plans()
        self.graph, self.o, self.amax = g, o, (amax_s, amax_o)
        self.workspace_size = g.get_workspace_size()
        self.plan_index: int | None = None  # None: the heuristics' choice
        one = torch.ones(1, 1, 1, 1, device=dev)
        self.constants = {
            "descale_k": one,
            "descale_v": one,
            "descale_s": one / P_SCALE,
            "scale_s": one * P_SCALE,
            "scale_o": one,
        }
        self.amax_out = torch.empty(2, 1, 1, 1, 1, device=dev)
        self._run_lock = threading.Lock()  # sessions run in threads; one launch at a time per graph

    def use_plan(self, index: int) -> None:
        """Run plan `index` of the graph's list from now on (built with every_plan)."""
        self.workspace_size = max(self.workspace_size, self.graph.get_workspace_size_plan_at_index(index))
        self.plan_index = index

    def __call__(self, q8, k8, v8, descale_q) -> torch.Tensor:
        import cudnn

        dev = q8.device
        handle = self.handle(dev)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(dev).cuda_stream)
        out = torch.empty(self.out_shape, dtype=E4M3, device=dev)
        workspace = torch.empty(max(1, self.workspace_size), dtype=torch.uint8, device=dev)
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: out, self.amax[0]: self.amax_out[0]}
        pack[self.amax[1]] = self.amax_out[1]
        pack[self.scales["descale_q"]] = descale_q
        for name, value in self.constants.items():
            pack[self.scales[name]] = value
        with self._run_lock:
            if self.plan_index is None:
                self.graph.execute(pack, workspace, handle=handle)
            else:
                self.graph.execute_plan_at_index(pack, workspace, self.plan_index, handle=handle)
        return out
