// CPU implementation of fastadapt::logit_confidence and fastadapt::hidden_cosine: checks, rows
// (and, for a few long rows, vocabulary slices merged exactly) over threads, ISA-specific kernels
// (cpu/kernels/confidence_*.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "confidence_checks.h"
#include "cpu/kernels/confidence_kernels.h"
#include "cpu/kernels/isa.h"

namespace fastadapt::cpu {
namespace {

int dtype_code(at::ScalarType t) { return t == at::kHalf ? 1 : t == at::kBFloat16 ? 2 : 0; }

std::tuple<at::Tensor, at::Tensor> logit_confidence_cpu(const at::Tensor& logits, double temperature) {
  const auto [B, V] = check_logit_confidence_args(logits, temperature);
  TORCH_CHECK(logits.device().is_cpu(), "fastadapt::logit_confidence: this is the CPU kernel, logits is on ",
              logits.device());
  at::Tensor stats = at::empty({B, 3}, logits.options().dtype(at::kFloat));
  at::Tensor argmax = at::empty({B}, logits.options().dtype(at::kLong));
  if (B == 0) return {stats, argmax};
  const at::Tensor x = logits.contiguous();
  auto fn = active_isa() == Isa::AVX2 ? confidence_slice_avx2 : confidence_slice_generic;
  // a decode step has B = 1 and V ~ 50k: split each row into slices so every thread works
  constexpr int64_t kMinSlice = 8192;
  const int64_t nt = at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(B >= nt ? 1 : nt / B, V / kMinSlice));
  const int64_t per = (V + splits - 1) / splits;
  std::vector<ConfState> parts(static_cast<size_t>(B * splits));
  const char* base = static_cast<const char*>(x.data_ptr());
  const int64_t row_bytes = V * static_cast<int64_t>(x.element_size());
  const int code = dtype_code(x.scalar_type());
  const float inv_temp = static_cast<float>(1.0 / temperature);
  at::parallel_for(0, B * splits, 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t r = j / splits, sl = j % splits;
      const int64_t v0 = sl * per, v1 = std::min(V, v0 + per);
      parts[j] = fn(base + r * row_bytes, code, v0, v1, inv_temp);
    }
  });
  float* sp = stats.data_ptr<float>();
  int64_t* ap = argmax.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r) {
    ConfState st = parts[r * splits];
    for (int64_t sl = 1; sl < splits; ++sl) st = confidence_merge(st, parts[r * splits + sl]);
    confidence_finish(st, sp + 3 * r, sp + 3 * r + 1, sp + 3 * r + 2);
    ap[r] = st.i1;
  }
  return {stats, argmax};
}

at::Tensor hidden_cosine_cpu(const at::Tensor& a, const at::Tensor& b, double eps) {
  const auto [rows, H] = check_hidden_cosine_args(a, b, eps);
  TORCH_CHECK(a.device().is_cpu(), "fastadapt::hidden_cosine: this is the CPU kernel, a is on ", a.device());
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end() - 1);
  at::Tensor out = at::empty(shape, a.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  auto fn = active_isa() == Isa::AVX2 ? hidden_cosine_rows_avx2 : hidden_cosine_rows_generic;
  const int code = dtype_code(a.scalar_type());
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / H);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    fn(ac.data_ptr(), bc.data_ptr(), code, H, r0, r1, static_cast<float>(eps), op);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("logit_confidence", &logit_confidence_cpu);
  m.impl("hidden_cosine", &hidden_cosine_cpu);
}

}  // namespace fastadapt::cpu
