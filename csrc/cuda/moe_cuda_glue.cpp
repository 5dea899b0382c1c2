// CUDA registration of the mixture-of-experts ops (compiled only when torch has CUDA). The
// grouped matmul copies the E + 1 expert offsets to the host (one synchronisation per call) and
// launches the qlinear kernel on each non-empty expert segment of the gathered rows; a
// device-side segmented launch (one grid over all experts) would remove that sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/moe_cuda.h"
#include "cuda/qlinear_cuda.h"
#include "moe_checks.h"

namespace fastadapt {
namespace {

MoeDType moe_dtype(at::ScalarType t) {
  return t == at::kHalf ? MoeDType::F16 : t == at::kBFloat16 ? MoeDType::BF16 : MoeDType::F32;
}
QLinearDType ql_dtype(at::ScalarType t) {
  return t == at::kHalf ? QLinearDType::F16 : t == at::kBFloat16 ? QLinearDType::BF16 : QLinearDType::F32;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastadapt::", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& logits, int64_t top_k, int64_t num_null, bool renormalize) {
  const MoeRouteShape s = check_moe_route_args(logits, top_k, num_null);
  TORCH_CHECK(logits.is_cuda(), "fastadapt::moe_route: this is the CUDA kernel, logits is on ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor l32 = logits.to(at::kFloat).contiguous();
  auto i32 = logits.options().dtype(at::kInt);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor token_ids = at::empty({s.T * s.k}, i32), row_w = at::empty({s.T * s.k}, f32);
  at::Tensor offsets = at::empty({s.E + 1}, i32);
  at::Tensor topk_ids = at::empty({s.T, s.k}, i32), topk_rows = at::empty({s.T, s.k}, i32);
  at::Tensor topk_w = at::empty({s.T, s.k}, f32);
  MoeRouteCudaParams p;
  p.logits = l32.data_ptr<float>();
  p.T = s.T;
  p.E_all = s.E_all;
  p.E = s.E;
  p.k = s.k;
  p.renorm = renormalize;
  p.topk_ids = topk_ids.data_ptr<int32_t>();
  p.topk_w = topk_w.data_ptr<float>();
  p.topk_rows = topk_rows.data_ptr<int32_t>();
  p.token_ids = token_ids.data_ptr<int32_t>();
  p.row_w = row_w.data_ptr<float>();
  p.offsets = offsets.data_ptr<int32_t>();
  check_launch(launch_moe_route(p, c10::cuda::getCurrentCUDAStream(logits.device().index())), "moe_route");
  return {token_ids, offsets, row_w, topk_ids, topk_rows};
}

at::Tensor moe_grouped_qlinear_cuda(const at::Tensor& x, const at::Tensor& qdata,
                                    const std::optional<at::Tensor>& scales,
                                    const std::optional<at::Tensor>& zeros, c10::string_view fmt,
                                    int64_t in_features, int64_t group_size,
                                    const at::Tensor& expert_offsets,
                                    const std::optional<at::Tensor>& token_ids) {
  const MoeGroupedShape s = check_moe_grouped_args(x, qdata, scales, zeros, std::string(fmt), in_features,
                                                   group_size, expert_offsets, token_ids);
  TORCH_CHECK(x.is_cuda(), "fastadapt::moe_grouped_qlinear: this is the CUDA kernel, x is on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const int64_t K = s.q.K, N = s.q.N, E = s.E, P = s.P;
  const at::Tensor offs = expert_offsets.to(at::kCPU).contiguous();  // synchronises
  check_moe_grouped_indices(offs, nullptr, P, x.size(0));
  const int32_t* o = offs.data_ptr<int32_t>();
  const int64_t used = o[E];
  at::Tensor out = at::zeros({P, N}, x.options());
  if (used == 0 || N == 0) return out;
  const int64_t rb = qdata.size(2);
  const int64_t selt = scales.has_value() ? scales->element_size() : 0;
  TORCH_CHECK((N * rb) % 16 == 0, "fastadapt::moe_grouped_qlinear: on CUDA each expert's packed weight "
              "(out_features x row_bytes = ", N * rb, " bytes) must be a multiple of 16 bytes");
  at::Tensor xg;
  if (token_ids.has_value()) {
    xg = at::empty({used, K}, x.options());
    const at::Tensor xc = x.contiguous();
    MoeGatherCudaParams g;
    g.x = xc.data_ptr();
    g.token_ids = token_ids->contiguous().data_ptr<int32_t>();
    g.out = xg.data_ptr();
    g.rows = used;
    g.K = K;
    g.elem_bytes = static_cast<int32_t>(x.element_size());
    check_launch(launch_moe_gather(g, stream), "moe_grouped_qlinear");
  } else {
    xg = x.narrow(0, 0, used).contiguous();
  }
  const int64_t xe = x.element_size();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = o[e + 1] - o[e];
    if (m == 0) continue;  // null-routed or unused experts cost nothing
    QLinearCudaParams p;
    p.x = static_cast<const char*>(xg.data_ptr()) + o[e] * K * xe;
    p.qdata = qdata.data_ptr<uint8_t>() + e * N * rb;
    if (scales.has_value()) {
      p.scales = static_cast<const char*>(scales->data_ptr()) + e * N * s.q.groups * selt;
      p.scale_type = scale_type_of(*scales);
    }
    p.zeros = zeros.has_value() ? zeros->data_ptr<uint8_t>() + e * N * s.q.groups : nullptr;
    p.out = static_cast<char*>(out.data_ptr()) + o[e] * N * xe;
    p.M = m;
    p.N = N;
    p.K = K;
    p.x_row_stride = K;
    p.out_row_stride = N;
    p.group_size = s.q.group_size;
    p.fmt = s.q.fmt;
    p.act_dtype = ql_dtype(x.scalar_type());
    p.bias_dtype = p.act_dtype;
    check_launch(launch_qlinear(p, stream), "moe_grouped_qlinear");
  }
  return out;
}

at::Tensor moe_combine_cuda(const at::Tensor& y, const at::Tensor& row_weights, const at::Tensor& topk_rows) {
  check_moe_combine_args(y, row_weights, topk_rows);
  TORCH_CHECK(y.is_cuda(), "fastadapt::moe_combine: this is the CUDA kernel, y is on ", y.device());
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous(), w = row_weights.contiguous(), rows = topk_rows.contiguous();
  at::Tensor out = at::empty({rows.size(0), y.size(1)}, y.options());
  MoeCombineCudaParams p;
  p.y = yc.data_ptr();
  p.row_w = w.data_ptr<float>();
  p.rows = rows.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.T = rows.size(0);
  p.k = rows.size(1);
  p.N = y.size(1);
  p.dtype = moe_dtype(y.scalar_type());
  check_launch(launch_moe_combine(p, c10::cuda::getCurrentCUDAStream(y.device().index())), "moe_combine");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_grouped_qlinear", &moe_grouped_qlinear_cuda);
  m.impl("moe_combine", &moe_combine_cuda);
}

}  // namespace fastadapt
