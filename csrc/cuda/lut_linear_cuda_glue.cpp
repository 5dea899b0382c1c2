// CUDA registration of fastadapt::lut_linear (compiled only when torch has CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/lut_linear_cuda.h"
#include "lut_linear_checks.h"

namespace fastadapt {
namespace {

at::Tensor lut_linear_cuda(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zoffs, const std::optional<at::Tensor>& bias,
                           int64_t bits, int64_t out_features, int64_t group_size, int64_t zoff) {
  const LutShape s = check_lut_linear_args(x, planes, scales, zoffs, bias, bits, out_features, group_size, zoff);
  TORCH_CHECK(x.is_cuda(), "fastadapt::lut_linear: this is the CUDA kernel, x is on ", x.device());
  TORCH_CHECK(s.M <= 65535 && s.G <= 65535, "fastadapt::lut_linear: x rows (", s.M, ") and groups (", s.G,
              ") must be <= 65535 on CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (s.M == 0 || s.N == 0) return y;
  const at::Tensor xc = x.reshape({s.M, s.K}).contiguous();
  at::Tensor bc;
  if (bias.has_value()) bc = bias->to(x.scalar_type()).contiguous();
  at::Tensor xq = at::empty({s.M, s.K}, x.options().dtype(at::kChar));
  at::Tensor hs = at::empty({s.M, s.G}, x.options().dtype(at::kFloat));
  at::Tensor sq = at::empty({s.M, s.G}, x.options().dtype(at::kInt));
  LutCudaParams p;
  p.x = xc.data_ptr();
  p.M = s.M;
  p.K = s.K;
  p.N = s.N;
  p.bits = bits;
  p.group_size = group_size;
  p.groups = s.G;
  p.planes = planes.data_ptr<uint8_t>();
  p.scales = scales.data_ptr<float>();
  p.zoffs = zoffs.has_value() ? zoffs->data_ptr<int8_t>() : nullptr;
  p.zoff = static_cast<int32_t>(zoff);
  p.bias = bc.defined() ? bc.data_ptr() : nullptr;
  p.xq = xq.data_ptr<int8_t>();
  p.half_scale = hs.data_ptr<float>();
  p.xq_sum = sq.data_ptr<int32_t>();
  p.y = y.data_ptr();
  p.dtype = x.scalar_type() == at::kHalf ? LutDType::F16
            : x.scalar_type() == at::kBFloat16 ? LutDType::BF16 : LutDType::F32;
  const cudaError_t err = launch_lut_linear(p, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastadapt::lut_linear: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) { m.impl("lut_linear", &lut_linear_cuda); }

}  // namespace fastadapt
