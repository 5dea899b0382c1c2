// CUDA registration of fastadapt::rope and fastadapt::silu_mul (compiled only when torch has CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "cuda/rope_swiglu_cuda.h"
#include "rope_swiglu_checks.h"

namespace fastadapt {
namespace {

EwDType ew_dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? EwDType::F16
         : t.scalar_type() == at::kBFloat16 ? EwDType::BF16 : EwDType::F32;
}

// Index contents are validated on CPU always; on CUDA (a device sync) only when asked.
bool check_indices_on_device() {
  const char* v = std::getenv("FASTADAPT_CHECK_INDICES");
  return v && std::strcmp(v, "0") != 0 && v[0] != '\0';
}

void rope_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin,
               bool interleaved) {
  const RopeShape s = check_rope_args(q, k, positions, cos_sin);
  TORCH_CHECK(q.is_cuda(), "fastadapt::rope: this is the CUDA kernel, q is on ", q.device());
  if (s.T * (s.Hq + s.Hk) == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor pos = positions.contiguous();
  if (check_indices_on_device()) check_rope_positions(pos.cpu(), s.max_pos);
  RopeCudaParams p;
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
  p.max_pos = s.max_pos;
  p.interleaved = interleaved;
  p.dtype = ew_dtype_of(q);
  const cudaError_t err = launch_rope(p, c10::cuda::getCurrentCUDAStream(q.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastadapt::rope: CUDA launch failed: ", cudaGetErrorString(err));
}

void silu_mul_cuda_into(const at::Tensor& x, at::Tensor& out) {
  TORCH_CHECK(x.is_cuda(), "fastadapt::silu_mul: this is the CUDA kernel, x is on ", x.device());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = silu_mul_rows_view(x);
  SiluMulCudaParams p;
  p.x = x2.data_ptr();
  p.x_stride = x2.stride(0);
  p.y = out.data_ptr();
  p.rows = x2.size(0);
  p.F = x2.size(1) / 2;
  p.dtype = ew_dtype_of(x);
  const cudaError_t err = launch_silu_mul(p, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastadapt::silu_mul: CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor silu_mul_cuda(const at::Tensor& x) {
  const auto shape = check_silu_mul_args(x);
  at::Tensor out = at::empty(shape, x.options());
  silu_mul_cuda_into(x, out);
  return out;
}

void silu_mul_out_cuda(const at::Tensor& x, at::Tensor& out) {
  const auto shape = check_silu_mul_args(x);
  check_silu_mul_out(out, x, shape);
  silu_mul_cuda_into(x, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
  m.impl("silu_mul.out", &silu_mul_out_cuda);
}

}  // namespace fastadapt
