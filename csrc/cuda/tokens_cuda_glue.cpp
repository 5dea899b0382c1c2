// CUDA registration of the token merging and pruning ops (compiled only when torch has CUDA):
// checks (tokens_checks.h), dtype codes, device guard, scratch buffers, stream lookup. The
// kernels (tokens.cu) know no torch. Index contents are not validated on CUDA (DESIGN.md): the
// Python layer builds them; the Python wrappers validate them when FASTADAPT_DEBUG is set.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "cuda/tokens_cuda.h"
#include "tokens_checks.h"

namespace fastadapt {
namespace {

TokDType tok_dtype(at::ScalarType t) {
  return t == at::kHalf ? TokDType::F16 : t == at::kBFloat16 ? TokDType::BF16 : TokDType::F32;
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()); }

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fastadapt::", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "fastadapt::", op, ": this is the CUDA kernel, the input is on ", t.device());
}

at::Tensor bipartite_soft_matching_cuda(const at::Tensor& metric, int64_t r, const std::optional<at::Tensor>& prot) {
  const auto [B, N, C] = check_bipartite_soft_matching_args(metric, r, prot);
  check_cuda("bipartite_soft_matching", metric);
  const c10::cuda::CUDAGuard guard(metric.device());
  at::Tensor dest = at::empty({B, N}, metric.options().dtype(at::kInt));
  const int64_t Na = (N + 1) / 2;
  const at::Tensor mc = metric.contiguous();
  const at::Tensor p8 = prot.has_value() ? prot->contiguous().to(at::kByte) : at::Tensor();
  at::Tensor inv = at::empty({B, N}, metric.options().dtype(at::kFloat));
  at::Tensor best = at::empty({B, Na}, inv.options());
  at::Tensor best_idx = at::empty({B, Na}, dest.options());
  TokensMatchParams p;
  p.metric = mc.data_ptr();
  p.prot = p8.defined() ? p8.data_ptr<uint8_t>() : nullptr;
  p.inv = inv.data_ptr<float>();
  p.best = best.data_ptr<float>();
  p.best_idx = best_idx.data_ptr<int32_t>();
  p.dest = dest.data_ptr<int32_t>();
  p.B = B, p.N = N, p.C = C, p.r = r;
  p.dtype = tok_dtype(metric.scalar_type());
  check_launch("bipartite_soft_matching", launch_bipartite_soft_matching(p, stream_of(metric)));
  return dest;
}

std::tuple<at::Tensor, at::Tensor> merge_tokens_cuda(const at::Tensor& x, const at::Tensor& dest, int64_t num_out,
                                                     const std::optional<at::Tensor>& sizes) {
  const auto [B, N, C] = check_merge_tokens_args(x, dest, num_out, sizes);
  check_cuda("merge_tokens", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor dc = dest.contiguous();
  const at::Tensor s32 = sizes.has_value() ? sizes->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, num_out, C}, x.options());
  at::Tensor out_sizes = at::empty({B, num_out}, x.options().dtype(at::kFloat));
  at::Tensor acc = at::empty({B, num_out, C}, out_sizes.options());
  TokensMergeParams p;
  p.x = xc.data_ptr();
  p.sizes = s32.defined() ? s32.data_ptr<float>() : nullptr;
  p.dest = dc.data_ptr<int32_t>();
  p.acc = acc.data_ptr<float>();
  p.out = out.data_ptr();
  p.out_sizes = out_sizes.data_ptr<float>();
  p.B = B, p.N = N, p.M = num_out, p.C = C;
  p.dtype = tok_dtype(x.scalar_type());
  check_launch("merge_tokens", launch_merge_tokens(p, stream_of(x)));
  return {out, out_sizes};
}

at::Tensor unmerge_tokens_cuda(const at::Tensor& x, const at::Tensor& dest, const std::optional<at::Tensor>& fill) {
  const auto [B, N, M, C] = check_unmerge_tokens_args(x, dest, fill);
  check_cuda("unmerge_tokens", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor dc = dest.contiguous();
  const at::Tensor fc = fill.has_value() ? fill->contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, N, C}, x.options());
  check_launch("unmerge_tokens", launch_gather_rows(xc.data_ptr(), dc.data_ptr<int32_t>(),
                                                    fc.defined() ? fc.data_ptr() : nullptr, out.data_ptr(), B, N, M,
                                                    C, x.element_size(), stream_of(x)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_cuda(const at::Tensor& x, const at::Tensor& scores, int64_t keep,
                                                     const std::optional<at::Tensor>& prot) {
  const auto [B, N, C] = check_prune_tokens_args(x, scores, keep, prot);
  check_cuda("prune_tokens", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor s32 = scores.to(at::kFloat).contiguous();
  const at::Tensor p8 = prot.has_value() ? prot->contiguous().to(at::kByte) : at::Tensor();
  at::Tensor out = at::empty({B, keep, C}, x.options());
  at::Tensor kept = at::empty({B, keep}, x.options().dtype(at::kInt));
  const cudaStream_t st = stream_of(x);
  check_launch("prune_tokens", launch_prune_select(s32.data_ptr<float>(), p8.defined() ? p8.data_ptr<uint8_t>() : nullptr,
                                                   kept.data_ptr<int32_t>(), B, N, keep, st));
  check_launch("prune_tokens", launch_gather_rows(xc.data_ptr(), kept.data_ptr<int32_t>(), nullptr, out.data_ptr(), B,
                                                  keep, N, C, x.element_size(), st));
  return {out, kept};
}

at::Tensor proportional_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& sizes, std::optional<double> scale) {
  const auto [B, H, Nq, Nk, D] = check_proportional_attention_args(q, k, v, sizes);
  check_cuda("proportional_attention", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor s32 = sizes.has_value() ? sizes->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, H, Nq, D}, q.options());
  PropAttnParams p;
  p.q = qc.data_ptr(), p.k = kc.data_ptr(), p.v = vc.data_ptr();
  p.sizes = s32.defined() ? s32.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.B = B, p.H = H, p.Nq = Nq, p.Nk = Nk, p.D = D;
  p.scale = scale.has_value() ? static_cast<float>(*scale) : 1.f / std::sqrt(static_cast<float>(D));
  p.dtype = tok_dtype(q.scalar_type());
  check_launch("proportional_attention", launch_proportional_attention(p, stream_of(q)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("bipartite_soft_matching", &bipartite_soft_matching_cuda);
  m.impl("merge_tokens", &merge_tokens_cuda);
  m.impl("unmerge_tokens", &unmerge_tokens_cuda);
  m.impl("prune_tokens", &prune_tokens_cuda);
  m.impl("proportional_attention", &proportional_attention_cuda);
}

}  // namespace fastadapt
