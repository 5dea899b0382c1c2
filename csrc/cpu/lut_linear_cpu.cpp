// CPU implementation of fastadapt::lut_linear: checks, fp32 staging of x, one table build per call
// (shared by all threads), row blocks split over threads (cpu/kernels/lut_*.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels/isa.h"
#include "cpu/kernels/lut_kernels.h"
#include "lut_linear_checks.h"

namespace fastadapt::cpu {
namespace {

at::Tensor lut_linear_cpu(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zoffs, const std::optional<at::Tensor>& bias,
                          int64_t bits, int64_t out_features, int64_t group_size, int64_t zoff) {
  const LutShape s = check_lut_linear_args(x, planes, scales, zoffs, bias, bits, out_features, group_size, zoff);
  TORCH_CHECK(x.device().is_cpu(), "fastadapt::lut_linear: this is the CPU kernel, x is on ", x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (s.M == 0 || s.N == 0) return y;
  const at::Tensor x32 = x.reshape({s.M, s.K}).to(at::kFloat).contiguous();
  const bool f32 = x.scalar_type() == at::kFloat;
  at::Tensor y32 = f32 ? y : at::empty({s.M, s.N}, x32.options());
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  // workspace: tables [M, K/4, 32] bytes, then a_g/2 and sum(xq) per (row, group)
  at::Tensor tables = at::empty({s.M, s.K / 4, 32}, x32.options().dtype(at::kByte));
  at::Tensor half_scale = at::empty({s.M, s.G}, x32.options());
  at::Tensor xq_sum = at::empty({s.M, s.G}, x32.options().dtype(at::kInt));

  LutProblem p;
  p.x = x32.data_ptr<float>();
  p.M = s.M;
  p.K = s.K;
  p.x_stride = s.K;
  p.N = s.N;
  p.bits = bits;
  p.group_size = group_size;
  p.groups = s.G;
  p.planes = planes.data_ptr<uint8_t>();
  p.scales = scales.data_ptr<float>();
  p.zoffs = zoffs.has_value() ? zoffs->data_ptr<int8_t>() : nullptr;
  p.zoff = static_cast<int32_t>(zoff);
  p.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
  p.tables = tables.data_ptr<uint8_t>();
  p.half_scale = half_scale.data_ptr<float>();
  p.xq_sum = xq_sum.data_ptr<int32_t>();
  p.y = y32.data_ptr<float>();
  p.y_stride = s.N;

  const bool avx2 = active_isa() == Isa::AVX2;
  auto prep = avx2 ? lut_prepare_avx2 : lut_prepare_generic;
  auto gemv = avx2 ? lut_gemv_avx2 : lut_gemv_generic;
  // tables: O(M K) work, built once and read by every thread
  at::parallel_for(0, s.M, std::max<int64_t>(1, 8192 / s.K), [&](int64_t b, int64_t e) { prep(p, b, e); });
  // grain: >= ~32 KiB of weight bits per task, so the split costs nothing next to the work
  const int64_t block_bytes = s.K * bits * 4 * std::max<int64_t>(1, s.M);
  const int64_t grain = std::max<int64_t>(1, 32768 / block_bytes);
  at::parallel_for(0, s.NB, grain, [&](int64_t b, int64_t e) { gemv(p, b, e); });
  if (!f32) y.view({s.M, s.N}).copy_(y32);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) { m.impl("lut_linear", &lut_linear_cpu); }

}  // namespace fastadapt::cpu
