// FlashInfer's Hopper FP8 attention (its FlashAttention-3-derived template, from the
// flashinfer-python package's headers) behind a C function, loaded with ctypes whatever the torch
// version (fp8_attention_flashinfer.py builds it). One tile configuration per object file:
// FI_CTA_Q, FI_CTA_KV, FI_STAGES name it, FI_NAME is the exported symbol.
#include <cuda_runtime.h>

#include <flashinfer/attention/hopper/attention_updater.cuh>
#include <flashinfer/attention/hopper/quantization/prefill_sm90.cuh>
#include <flashinfer/attention/hopper/variant_helper.cuh>
#include <flashinfer/attention/hopper/variants.cuh>
#include <flashinfer/cutlass_utils.cuh>

using namespace flashinfer;

namespace fi_bench {

using DTypeQ = cutlass_dtype_t<__nv_fp8_e4m3>;
using DTypeKV = DTypeQ;
using DTypeO = cutlass_dtype_t<__nv_bfloat16>;
using IdType = int32_t;

struct Params {  // the fields FlashInfer's single-prefill template reads (its customize config)
  using DTypeQ = fi_bench::DTypeQ;
  using DTypeKV = fi_bench::DTypeKV;
  using DTypeO = fi_bench::DTypeO;
  using IdType = fi_bench::IdType;
  DTypeQ* q_ptr;
  DTypeKV* k_ptr;
  DTypeKV* v_ptr;
  DTypeO* o_ptr;
  float* lse_ptr;
  struct AdditionalParams {
    float* maybe_scale_q;
    float* maybe_scale_k;
    float* maybe_scale_v;
    double sm_scale;
    double scale_q_scalar;
    double scale_k_scalar;
    double scale_v_scalar;
  } additional_params;
  int64_t q_stride_n, k_stride_n, v_stride_n, o_stride_n;
  int64_t q_stride_h, k_stride_h, v_stride_h, o_stride_h;
  int qo_len, kv_len, head_dim, num_qo_heads, num_kv_heads, group_size, window_left;
  bool causal;
};

using Traits = FP8AttentionKernelTraits</*USE_TMA_LOAD_KV=*/true, /*HEAD_DIM=*/128, FI_CTA_Q, FI_CTA_KV,
                                        FI_STAGES, DTypeQ, DTypeKV, DTypeO, IdType, DefaultFP8Attention>;

}  // namespace fi_bench

using namespace fi_bench;

// q [qo_len, H, 128], k/v [kv_len, H, 128] e4m3 (strides in elements), o [qo_len, H, 128] bf16.
// scale_q: device float[H] (q's dequantisation scale per head); k and v at scale 1; no mask.
extern "C" int FI_NAME(int device, void* q, void* k, void* v, void* o, int qo_len, int kv_len, int heads,
                       int64_t q_sn, int64_t q_sh, int64_t k_sn, int64_t k_sh, int64_t v_sn, int64_t v_sh,
                       int64_t o_sn, int64_t o_sh, float* scale_q, double sm_scale, void* stream) {
  cudaError_t status = cudaSetDevice(device);  // this library's runtime: the stream's device
  if (status != cudaSuccess) return static_cast<int>(status);
  Params p{};
  p.q_ptr = static_cast<DTypeQ*>(q);
  p.k_ptr = static_cast<DTypeKV*>(k);
  p.v_ptr = static_cast<DTypeKV*>(v);
  p.o_ptr = static_cast<DTypeO*>(o);
  p.lse_ptr = nullptr;
  p.additional_params = {scale_q, nullptr, nullptr, sm_scale, 1.0, 1.0, 1.0};
  p.q_stride_n = q_sn, p.q_stride_h = q_sh, p.k_stride_n = k_sn, p.k_stride_h = k_sh;
  p.v_stride_n = v_sn, p.v_stride_h = v_sh, p.o_stride_n = o_sn, p.o_stride_h = o_sh;
  p.qo_len = qo_len, p.kv_len = kv_len, p.head_dim = 128;
  p.num_qo_heads = p.num_kv_heads = heads, p.group_size = 1, p.window_left = -1, p.causal = false;
  status = SingleFP8PrefillWithKVCacheKernelTraitsDispatched<Traits, /*LEFT_SLIDING_WINDOW=*/false,
                                                                       /*CAUSAL=*/false>(
      p, static_cast<cudaStream_t>(stream));
  if (status == cudaSuccess) status = cudaGetLastError();
  return static_cast<int>(status);
}
