// CUDA registration of fastadapt::rms_norm (compiled only when torch has CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/rms_norm_cuda.h"
#include "rms_norm_checks.h"

namespace fastadapt {
namespace {

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps,
                         const std::optional<at::Tensor>& residual) {
  const auto [rows, D] = check_rms_norm_args(x, weight, residual);
  TORCH_CHECK(x.is_cuda(), "fastadapt::rms_norm: this is the CUDA kernel, x is on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor w32 = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  RmsNormCudaParams p;
  p.x = xc.data_ptr();
  p.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  p.w = w32.data_ptr<float>();
  p.y = y.data_ptr();
  p.rows = rows;
  p.D = D;
  p.eps = static_cast<float>(eps);
  p.dtype = x.scalar_type() == at::kHalf ? NormDType::F16
            : x.scalar_type() == at::kBFloat16 ? NormDType::BF16 : NormDType::F32;
  const cudaError_t err = launch_rms_norm(p, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastadapt::rms_norm: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) { m.impl("rms_norm", &rms_norm_cuda); }

}  // namespace fastadapt
