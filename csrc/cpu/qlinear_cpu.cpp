// CPU implementation of fastadapt::qlinear: checks, activation preparation, path choice
// (gemv / gemm / int8) and the split of output features over threads (at::parallel_for, so
// torch.set_num_threads governs it). The kernels themselves are torch-free (cpu/kernels/).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels/isa.h"
#include "cpu/kernels/qlinear_kernels.h"
#include "cpu/parallel_dynamic.h"
#include "qlinear_checks.h"

namespace fastadapt::cpu {
namespace {

// Largest M served by the gemv path (decoded chunks reused across rows of x in registers);
// above it the gemm path's dequantized panel and register blocking win (see bench/).
constexpr int64_t kGemvMaxM = 8;

using KernelFn = void (*)(const QLinearProblem&, int64_t, int64_t);

struct Kernels {
  KernelFn gemv, gemm, int8;
};

Kernels kernels_for(Isa isa) {
  if (isa == Isa::AVX2) return {qlinear_gemv_avx2, qlinear_gemm_avx2, qlinear_int8_avx2};
  return {qlinear_gemv_generic, qlinear_gemm_generic, qlinear_int8_generic};
}

void qlinear_cpu_into(const at::Tensor& x, const at::Tensor& qdata,
                      const std::optional<at::Tensor>& scales,
                      const std::optional<at::Tensor>& zeros,
                      const std::optional<at::Tensor>& bias, const std::string& fmt,
                      int64_t in_features, int64_t group_size, const std::string& act_quant,
                      at::Tensor& out) {
  const QLinearShape s =
      check_qlinear_args(x, qdata, scales, zeros, bias, fmt, in_features, group_size, act_quant);
  TORCH_CHECK(x.device().is_cpu(), "fastadapt::qlinear: this is the CPU kernel, x is on ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "fastadapt::qlinear: x must be float32, bfloat16 or float16 on CPU, got ",
              x.scalar_type());
  check_qlinear_out(out, x, s.N);
  if (s.M == 0 || s.N == 0) return;

  // Activations as contiguous fp32 [M, K] (widening bf16/fp16 costs M*K, nothing next to W).
  const at::Tensor x32 = x.reshape({s.M, s.K}).to(at::kFloat).contiguous();
  const at::Tensor bias32 =
      bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const bool direct = out.scalar_type() == at::kFloat;  // write straight into out
  at::Tensor y32 = direct ? out.view({s.M, s.N}) : at::empty({s.M, s.N}, x32.options());

  QLinearProblem p;
  p.x = x32.data_ptr<float>();
  p.M = s.M;
  p.K = s.K;
  p.x_stride = s.K;
  p.fmt = s.fmt;
  p.qdata = qdata.data_ptr<uint8_t>();
  p.N = s.N;
  p.row_bytes = qdata.size(1);
  if (scales.has_value()) {
    p.scales = scales->data_ptr();
    p.scale_type = scale_type_of(*scales);
  }
  p.zeros = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  p.group_size = s.group_size;
  p.groups = s.groups;
  p.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  p.y = y32.data_ptr<float>();
  p.y_stride = s.N;
  p.xsum_unit = is_gguf(s.fmt) ? 16 : s.group_size;

  const int64_t units = s.K / p.xsum_unit;
  at::Tensor xsum = at::empty({s.M, units}, x32.options());
  at::Tensor xq, xscale;
  p.xsum = xsum.data_ptr<float>();
  if (s.int8_act) {
    xq = at::empty({s.M, s.K}, x32.options().dtype(at::kChar));
    xscale = at::empty({s.M}, x32.options());
    prepare_x_int8(p.x, s.M, s.K, s.K, p.xsum_unit, xq.data_ptr<int8_t>(),
                   xscale.data_ptr<float>(), xsum.data_ptr<float>());
    p.xq = xq.data_ptr<int8_t>();
    p.xscale = xscale.data_ptr<float>();
  } else {
    prepare_x_sums(p.x, s.M, s.K, s.K, p.xsum_unit, xsum.data_ptr<float>());
  }

  const Kernels k = kernels_for(active_isa());
  if (!s.int8_act && s.M > kGemvMaxM) {
    // whole panels per task; a task is at least one panel
    const int64_t panels = (s.N + kGemmPanel - 1) / kGemmPanel;
    parallel_chunks(panels, 1, [&](int64_t b, int64_t e) {
      k.gemm(p, b * kGemmPanel, std::min(s.N, e * kGemmPanel));
    });
  } else {
    const KernelFn fn = s.int8_act ? k.int8 : k.gemv;
    // chunks: enough rows that a chunk costs far more than taking it, and about 8 per thread
    // so that a slow core takes fewer of them (cpu/parallel_dynamic.h)
    const int64_t min_rows = std::max<int64_t>(4, 16384 / std::max<int64_t>(1, s.K * s.M));
    const int64_t per_thread = (s.N + 8 * at::get_num_threads() - 1) / (8 * at::get_num_threads());
    const int64_t chunk = (std::max(min_rows, per_thread) + 3) / 4 * 4;
    parallel_chunks(s.N, chunk, [&](int64_t b, int64_t e) { fn(p, b, e); });
  }
  if (!direct) out.view({s.M, s.N}).copy_(y32);
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& qdata,
                       const std::optional<at::Tensor>& scales,
                       const std::optional<at::Tensor>& zeros,
                       const std::optional<at::Tensor>& bias, c10::string_view fmt,
                       int64_t in_features, int64_t group_size, c10::string_view act_quant) {
  const int64_t N = qdata.dim() == 2 ? qdata.size(0) : 0;
  at::Tensor out = at::empty(qlinear_out_shape(x, N), x.options());
  qlinear_cpu_into(x, qdata, scales, zeros, bias, std::string(fmt), in_features, group_size,
                   std::string(act_quant), out);
  return out;
}

void qlinear_out_cpu(const at::Tensor& x, const at::Tensor& qdata,
                            const std::optional<at::Tensor>& scales,
                            const std::optional<at::Tensor>& zeros,
                            const std::optional<at::Tensor>& bias, c10::string_view fmt,
                            int64_t in_features, int64_t group_size, c10::string_view act_quant,
                            at::Tensor& out) {
  qlinear_cpu_into(x, qdata, scales, zeros, bias, std::string(fmt), in_features, group_size,
                   std::string(act_quant), out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("qlinear", &qlinear_cpu);
  m.impl("qlinear.out", &qlinear_out_cpu);
}

}  // namespace fastadapt::cpu
