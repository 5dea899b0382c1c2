// Argument checks of fastadapt::rms_norm shared by the CPU and CUDA glue.
#pragma once
#include <ATen/ATen.h>

namespace fastadapt {

// Returns (rows, D).
inline std::pair<int64_t, int64_t> check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "fastadapt::rms_norm: x must have a non-empty last "
              "dimension, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "fastadapt::rms_norm: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && at::isFloatingType(weight.scalar_type()),
              "fastadapt::rms_norm: weight must be a floating 1-D tensor of size ", D, ", got ",
              weight.scalar_type(), " of shape ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), "fastadapt::rms_norm: weight must be on ", x.device());
  if (residual.has_value()) {
    const auto& r = *residual;
    TORCH_CHECK(r.sizes() == x.sizes() && r.scalar_type() == x.scalar_type(),
                "fastadapt::rms_norm: residual must match x (", x.scalar_type(), ", ", x.sizes(),
                "), got ", r.scalar_type(), " of shape ", r.sizes());
    TORCH_CHECK(r.is_contiguous() && r.device() == x.device(),
                "fastadapt::rms_norm: residual must be contiguous and on ", x.device());
  }
  return {x.numel() / D, D};
}

}  // namespace fastadapt
