// CPU implementation of fastadapt::rms_norm: checks, fp32 staging of 16-bit inputs, rows split
// over threads, ISA-specific kernel (cpu/kernels/rms_norm_*.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels/elementwise_kernels.h"
#include "cpu/kernels/isa.h"
#include "rms_norm_checks.h"

namespace fastadapt::cpu {
namespace {

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps,
                        const std::optional<at::Tensor>& residual) {
  const auto [rows, D] = check_rms_norm_args(x, weight, residual);
  TORCH_CHECK(x.device().is_cpu(), "fastadapt::rms_norm: this is the CPU kernel, x is on ", x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (rows == 0) return y;
  const bool f32 = x.scalar_type() == at::kFloat;
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor w32 = weight.to(at::kFloat).contiguous();
  // 16-bit residuals are updated in fp32 and written back once
  at::Tensor r32 = residual.has_value() ? (f32 ? *residual : residual->to(at::kFloat)) : at::Tensor();
  at::Tensor y32 = f32 ? y : at::empty(x.sizes(), x32.options());
  auto fn = active_isa() == Isa::AVX2 ? rms_norm_rows_avx2 : rms_norm_rows_generic;
  const float* xp = x32.data_ptr<float>();
  float* rp = r32.defined() ? r32.data_ptr<float>() : nullptr;
  const float* wp = w32.data_ptr<float>();
  float* yp = y32.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / D);
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    fn(xp, rp, wp, yp, b, e, D, static_cast<float>(eps));
  });
  if (!f32) {
    y.copy_(y32);
    if (residual.has_value()) residual->copy_(r32);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }

}  // namespace fastadapt::cpu
