// CPU implementation of the mixture-of-experts ops: AdaMoE routing (softmax over real + null
// experts, top-k, renormalisation, counting sort into per-expert groups), the grouped quantized
// matmul (the qlinear row kernels run on each expert's segment of gathered rows; tasks are
// (expert, output-row chunk) pairs split over threads), and the weighted combine. Null experts
// get no rows, so they cost nothing past the routing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/kernels/isa.h"
#include "cpu/kernels/moe_kernels.h"
#include "cpu/kernels/qlinear_kernels.h"
#include "moe_checks.h"

namespace fastadapt::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(
    const at::Tensor& logits, int64_t top_k, int64_t num_null, bool renormalize) {
  const MoeRouteShape s = check_moe_route_args(logits, top_k, num_null);
  TORCH_CHECK(logits.device().is_cpu(), "fastadapt::moe_route: this is the CPU kernel, logits is on ",
              logits.device());
  const at::Tensor l32 = logits.to(at::kFloat).contiguous();
  auto i32 = logits.options().dtype(at::kInt);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor token_ids = at::empty({s.T * s.k}, i32), row_w = at::empty({s.T * s.k}, f32);
  at::Tensor offsets = at::empty({s.E + 1}, i32);
  at::Tensor topk_ids = at::empty({s.T, s.k}, i32), topk_rows = at::empty({s.T, s.k}, i32);
  at::Tensor topk_w = at::empty({s.T, s.k}, f32);
  auto fn = active_isa() == Isa::AVX2 ? moe_topk_rows_avx2 : moe_topk_rows_generic;
  const float* lp = l32.data_ptr<float>();
  int32_t* ip = topk_ids.data_ptr<int32_t>();
  float* wp = topk_w.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / (s.E_all * s.k));
  at::parallel_for(0, s.T, grain, [&](int64_t b, int64_t e) {
    fn(lp, s.E_all, s.E, s.k, renormalize, b, e, ip, wp);
  });
  moe_group_rows(ip, wp, s.T, s.k, s.E, token_ids.data_ptr<int32_t>(), row_w.data_ptr<float>(),
                 offsets.data_ptr<int32_t>(), topk_rows.data_ptr<int32_t>());
  return {token_ids, offsets, row_w, topk_ids, topk_rows};
}

// Rows per task of the output features: whole gemm panels, enough work per task to amortise it.
constexpr int64_t kChunkN = 64;
constexpr int64_t kGemvMaxM = 8;  // as qlinear: gemv for small segments, gemm above

struct Task {
  int64_t e, n0, n1;
};

at::Tensor moe_grouped_qlinear_cpu(const at::Tensor& x, const at::Tensor& qdata,
                                   const std::optional<at::Tensor>& scales,
                                   const std::optional<at::Tensor>& zeros, c10::string_view fmt,
                                   int64_t in_features, int64_t group_size,
                                   const at::Tensor& expert_offsets,
                                   const std::optional<at::Tensor>& token_ids) {
  const MoeGroupedShape s = check_moe_grouped_args(x, qdata, scales, zeros, std::string(fmt), in_features,
                                                   group_size, expert_offsets, token_ids);
  TORCH_CHECK(x.device().is_cpu(), "fastadapt::moe_grouped_qlinear: this is the CPU kernel, x is on ",
              x.device());
  const int64_t K = s.q.K, N = s.q.N, E = s.E, P = s.P;
  const at::Tensor offs = expert_offsets.contiguous();
  const at::Tensor tid = token_ids.has_value() ? token_ids->contiguous() : at::Tensor();
  check_moe_grouped_indices(offs, tid.defined() ? tid.data_ptr<int32_t>() : nullptr, P, x.size(0));
  const int32_t* o = offs.data_ptr<int32_t>();
  const int64_t used = o[E];
  at::Tensor out = at::zeros({P, N}, x.options());
  if (used == 0 || N == 0) return out;

  // gathered activations [used, K] fp32 (the rows of x each expert reads, grouped)
  at::Tensor xg = tid.defined() ? x.index_select(0, tid.narrow(0, 0, used).to(at::kLong))
                                : x.narrow(0, 0, used);
  xg = xg.to(at::kFloat).contiguous();
  const int64_t unit = is_gguf(s.q.fmt) ? 16 : s.q.group_size;
  at::Tensor xsum = at::empty({used, K / unit}, xg.options());
  prepare_x_sums(xg.data_ptr<float>(), used, K, K, unit, xsum.data_ptr<float>());
  const bool direct = out.scalar_type() == at::kFloat;
  at::Tensor y32 = direct ? out : at::zeros({P, N}, xg.options());

  QLinearProblem base;
  base.K = K;
  base.x_stride = K;
  base.xsum_unit = unit;
  base.fmt = s.q.fmt;
  base.N = N;
  base.row_bytes = qdata.size(2);
  base.group_size = s.q.group_size;
  base.groups = s.q.groups;
  base.y_stride = N;
  const ScaleType st = scales.has_value() ? scale_type_of(*scales) : ScaleType::F32;
  const int64_t scale_elt = scales.has_value() ? scales->element_size() : 0;
  const int64_t per_expert_groups = N * s.q.groups;
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e) {
    if (o[e + 1] == o[e]) continue;  // no rows (every token chose other or null experts): no work
    for (int64_t n0 = 0; n0 < N; n0 += kChunkN) tasks.push_back({e, n0, std::min(N, n0 + kChunkN)});
  }
  const Isa isa = active_isa();
  const auto gemv = isa == Isa::AVX2 ? qlinear_gemv_avx2 : qlinear_gemv_generic;
  const auto gemm = isa == Isa::AVX2 ? qlinear_gemm_avx2 : qlinear_gemm_generic;
  const uint8_t* qd = qdata.data_ptr<uint8_t>();
  const char* sc = scales.has_value() ? static_cast<const char*>(scales->data_ptr()) : nullptr;
  const uint8_t* zp = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  const float* xgp = xg.data_ptr<float>();
  const float* xsp = xsum.data_ptr<float>();
  float* yp = y32.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      const Task& t = tasks[i];
      const int64_t r0 = o[t.e], m = o[t.e + 1] - o[t.e];
      QLinearProblem p = base;
      p.x = xgp + r0 * K;
      p.M = m;
      p.xsum = xsp + r0 * (K / unit);
      p.qdata = qd + t.e * N * p.row_bytes;
      p.scales = sc ? sc + t.e * per_expert_groups * scale_elt : nullptr;
      p.scale_type = st;
      p.zeros = zp ? zp + t.e * per_expert_groups : nullptr;
      p.y = yp + r0 * N;
      (m > kGemvMaxM ? gemm : gemv)(p, t.n0, t.n1);
    }
  });
  if (!direct) out.copy_(y32);
  return out;
}

at::Tensor moe_combine_cpu(const at::Tensor& y, const at::Tensor& row_weights, const at::Tensor& topk_rows) {
  check_moe_combine_args(y, row_weights, topk_rows);
  TORCH_CHECK(y.device().is_cpu(), "fastadapt::moe_combine: this is the CPU kernel, y is on ", y.device());
  const int64_t P = y.size(0), N = y.size(1), T = topk_rows.size(0), k = topk_rows.size(1);
  const at::Tensor rows = topk_rows.contiguous();
  const int32_t* rp = rows.data_ptr<int32_t>();
  for (int64_t i = 0; i < T * k; ++i)
    TORCH_CHECK(rp[i] >= -1 && rp[i] < P, "fastadapt::moe_combine: topk_rows holds ", rp[i],
                ", out of range [-1, ", P, ")");
  at::Tensor out = at::empty({T, N}, y.options());
  if (T == 0 || N == 0) return out;
  const at::Tensor y32 = y.to(at::kFloat).contiguous();
  const at::Tensor w = row_weights.contiguous();
  at::Tensor o32 = y.scalar_type() == at::kFloat ? out : at::empty({T, N}, y32.options());
  auto fn = active_isa() == Isa::AVX2 ? moe_combine_rows_avx2 : moe_combine_rows_generic;
  const float* yp = y32.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = o32.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, N * k));
  at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) { fn(yp, N, wp, rp, k, b, e, op); });
  if (!o32.is_same(out)) out.copy_(o32);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_grouped_qlinear", &moe_grouped_qlinear_cpu);
  m.impl("moe_combine", &moe_combine_cpu);
}

}  // namespace fastadapt::cpu
