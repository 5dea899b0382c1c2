// CUDA registration of fastadapt::paged_decode_attention, fastadapt::paged_prefix_attention and
// fastadapt::merge_attention_states (compiled only when torch has CUDA). Index contents are
// validated when FASTADAPT_CHECK_INDICES=1 (see paged_kv_checks.h); otherwise the Python objects
// that build the page tables guarantee them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/paged_attention_cuda.h"
#include "paged_attention_checks.h"

namespace fastadapt {
namespace {

AttnDType attn_dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? AttnDType::F16
         : t.scalar_type() == at::kBFloat16 ? AttnDType::BF16 : AttnDType::F32;
}

int num_sms_of(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0)
    n = 108;
  return n;
}

std::tuple<at::Tensor, at::Tensor> run_paged_cuda(
    const char* op, const PagedAttnShape& s, bool prefix, const at::Tensor& q,
    const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& indptr,
    const at::Tensor& indices, const at::Tensor& lens, double scale,
    const std::optional<at::Tensor>& score_acc) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.B, s.Tq, s.Hq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.Tq, s.Hq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor qc = q.contiguous(), ip = indptr.contiguous(), ix = indices.contiguous(),
                   ln = lens.contiguous();
  PagedAttnCudaParams p;
  p.q = qc.data_ptr();
  p.q_dtype = attn_dtype_of(q);
  p.k_pages = k_pages.data_ptr();
  p.v_pages = v_pages.data_ptr();
  p.kv_dtype = attn_dtype_of(k_pages);
  p.indptr = ip.data_ptr<int32_t>();
  p.indices = ix.data_ptr<int32_t>();
  p.lens = ln.data_ptr<int32_t>();
  p.B = s.B;
  p.Tq = s.Tq;
  p.Hq = s.Hq;
  p.Hkv = s.Hkv;
  p.D = s.D;
  p.page_size = s.S;
  p.prefix = prefix;
  const int64_t rows = lens.numel();
  p.avg_row_capacity = rows > 0 ? (indices.numel() * s.S + rows - 1) / rows : 0;
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.score_acc = score_acc.has_value() ? score_acc->data_ptr<float>() : nullptr;
  p.num_sms = num_sms_of(q.device().index());
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  p.vec_loads = (s.D * k_pages.element_size()) % 16 == 0 && aligned16(p.k_pages) &&
                aligned16(p.v_pages);
  at::Tensor ws = at::empty({paged_attention_workspace_floats(p)}, q.options().dtype(at::kFloat));
  p.workspace = ws.data_ptr<float>();
  const cudaError_t err = launch_paged_attention(p, c10::cuda::getCurrentCUDAStream(q.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastadapt::", op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> paged_decode_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
    const at::Tensor& page_indptr, const at::Tensor& page_indices, const at::Tensor& kv_lens,
    double scale, const std::optional<at::Tensor>& score_acc) {
  TORCH_CHECK(q.is_cuda(), "fastadapt::paged_decode_attention: this is the CUDA kernel, q is on ",
              q.device());
  const PagedAttnShape s = check_paged_decode_args(q, k_pages, v_pages, page_indptr, page_indices,
                                                   kv_lens, score_acc);
  return run_paged_cuda("paged_decode_attention", s, false, q, k_pages, v_pages, page_indptr,
                        page_indices, kv_lens, scale, score_acc);
}

std::tuple<at::Tensor, at::Tensor> paged_prefix_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
    const at::Tensor& prefix_indptr, const at::Tensor& prefix_indices,
    const at::Tensor& prefix_lens, double scale) {
  TORCH_CHECK(q.is_cuda(), "fastadapt::paged_prefix_attention: this is the CUDA kernel, q is on ",
              q.device());
  const PagedAttnShape s = check_paged_prefix_args(q, k_pages, v_pages, prefix_indptr,
                                                   prefix_indices, prefix_lens);
  return run_paged_cuda("paged_prefix_attention", s, true, q, k_pages, v_pages, prefix_indptr,
                        prefix_indices, prefix_lens, scale, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& out_a,
                                                               const at::Tensor& lse_a,
                                                               const at::Tensor& out_b,
                                                               const at::Tensor& lse_b) {
  TORCH_CHECK(out_a.is_cuda(), "fastadapt::merge_attention_states: this is the CUDA kernel, "
              "out_a is on ", out_a.device());
  const auto [rows, D] = check_merge_states_args(out_a, lse_a, out_b, lse_b);
  const c10::cuda::CUDAGuard guard(out_a.device());
  at::Tensor out = at::empty(out_a.sizes(), out_a.options());
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options());
  if (rows == 0) return {out, lse};
  const at::Tensor a = out_a.contiguous();
  const at::Tensor b = out_b.scalar_type() == out_a.scalar_type() ? out_b.contiguous()
                                                                  : out_b.to(out_a.scalar_type()).contiguous();
  const at::Tensor la = lse_a.contiguous(), lb = lse_b.contiguous();
  MergeStatesCudaParams p;
  p.out_a = a.data_ptr();
  p.lse_a = la.data_ptr<float>();
  p.out_b = b.data_ptr();
  p.lse_b = lb.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.rows = rows;
  p.D = D;
  p.dtype = attn_dtype_of(out_a);
  const cudaError_t err = launch_merge_attention_states(p, c10::cuda::getCurrentCUDAStream(out_a.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastadapt::merge_attention_states: CUDA launch failed: ",
              cudaGetErrorString(err));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_cuda);
  m.impl("paged_prefix_attention", &paged_prefix_attention_cuda);
  m.impl("merge_attention_states", &merge_attention_states_cuda);
}

}  // namespace fastadapt
