// CPU implementation of fastadapt::rope and fastadapt::silu_mul: checks, rows split over threads
// (at::parallel_for, so torch.set_num_threads governs it), ISA-specific kernels
// (cpu/kernels/rope_swiglu_*.cpp). Both work on the caller's dtype directly: no fp32 staging.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels/isa.h"
#include "cpu/kernels/rope_swiglu_kernels.h"
#include "rope_swiglu_checks.h"

namespace fastadapt::cpu {
namespace {

ElemType elem_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? ElemType::F16
         : t.scalar_type() == at::kBFloat16 ? ElemType::BF16 : ElemType::F32;
}

void rope_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin,
              bool interleaved) {
  const RopeShape s = check_rope_args(q, k, positions, cos_sin);
  TORCH_CHECK(q.device().is_cpu(), "fastadapt::rope: this is the CPU kernel, q is on ", q.device());
  const int64_t rows = s.T * (s.Hq + s.Hk);
  if (rows == 0) return;
  const at::Tensor pos = positions.contiguous();
  check_rope_positions(pos, s.max_pos);
  RopeProblem p;
  p.q = q.data_ptr();
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k = k.data_ptr();
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.T = s.T;
  p.Hq = s.Hq;
  p.Hk = s.Hk;
  p.D = s.D;
  p.positions = pos.data_ptr();
  p.positions_i64 = pos.scalar_type() == at::kLong;
  p.cos_sin = cos_sin.data_ptr<float>();
  p.cs_stride = cos_sin.stride(0);
  p.interleaved = interleaved;
  p.dtype = elem_type_of(q);
  auto fn = active_isa() == Isa::AVX2 ? rope_rows_avx2 : rope_rows_generic;
  // a task rotates at least ~16K elements: a decode step's few head rows stay on one thread
  const int64_t grain = std::max<int64_t>(1, 16384 / s.D);
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { fn(p, b, e); });
}

void silu_mul_cpu_into(const at::Tensor& x, at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu(), "fastadapt::silu_mul: this is the CPU kernel, x is on ", x.device());
  if (out.numel() == 0) return;
  const at::Tensor x2 = silu_mul_rows_view(x);
  SiluMulProblem p;
  p.x = x2.data_ptr();
  p.x_stride = x2.stride(0);
  p.y = out.data_ptr();
  p.rows = x2.size(0);
  p.F = x2.size(1) / 2;
  p.dtype = elem_type_of(x);
  auto fn = active_isa() == Isa::AVX2 ? silu_mul_rows_avx2 : silu_mul_rows_generic;
  const int64_t grain = std::max<int64_t>(1, 16384 / p.F);
  at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) { fn(p, b, e); });
}

at::Tensor silu_mul_cpu(const at::Tensor& x) {
  const auto shape = check_silu_mul_args(x);
  at::Tensor out = at::empty(shape, x.options());
  silu_mul_cpu_into(x, out);
  return out;
}

void silu_mul_out_cpu(const at::Tensor& x, at::Tensor& out) {
  const auto shape = check_silu_mul_args(x);
  check_silu_mul_out(out, x, shape);
  silu_mul_cpu_into(x, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("silu_mul.out", &silu_mul_out_cpu);
}

}  // namespace fastadapt::cpu
