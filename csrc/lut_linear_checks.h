// Argument checks of fastadapt::lut_linear shared by the CPU and CUDA glue.
#pragma once
#include <ATen/ATen.h>

#include "cpu/kernels/lut_format.h"

namespace fastadapt {

struct LutShape {
  int64_t M, K, N, NB, G;
};

inline LutShape check_lut_linear_args(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& scales,
                                      const std::optional<at::Tensor>& zoffs,
                                      const std::optional<at::Tensor>& bias, int64_t bits,
                                      int64_t out_features, int64_t group_size, int64_t zoff) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "fastadapt::lut_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "fastadapt::lut_linear: x must have at least 1 dimension [..., in_features]");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0 && K % 32 == 0, "fastadapt::lut_linear: x's last dimension (in_features) must be a "
              "positive multiple of 32, got ", K);
  TORCH_CHECK(bits >= 1 && bits <= 4, "fastadapt::lut_linear: bits must be 1, 2, 3 or 4, got ", bits);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0 && group_size <= kLutMaxGroup,
              "fastadapt::lut_linear: group_size must be a positive multiple of 32 dividing in_features (",
              K, ") and at most 2^20, got ", group_size);
  TORCH_CHECK(out_features >= 0, "fastadapt::lut_linear: out_features must be >= 0, got ", out_features);
  TORCH_CHECK(zoff >= -128 && zoff <= 127, "fastadapt::lut_linear: zoff must be in [-128, 127], got ", zoff);
  const int64_t NB = (out_features + kLutRowBlock - 1) / kLutRowBlock, G = K / group_size;
  TORCH_CHECK(planes.scalar_type() == at::kByte && planes.dim() == 4 && planes.size(0) == NB &&
                  planes.size(1) == K / 8 && planes.size(2) == bits && planes.size(3) == 32,
              "fastadapt::lut_linear: planes must be uint8 [ceil(out_features/32), in_features/8, bits, 32] = [",
              NB, ", ", K / 8, ", ", bits, ", 32], got ", planes.scalar_type(), " ", planes.sizes());
  TORCH_CHECK(planes.is_contiguous(), "fastadapt::lut_linear: planes must be contiguous");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 3 && scales.size(0) == NB &&
                  scales.size(1) == G && scales.size(2) == 32 && scales.is_contiguous(),
              "fastadapt::lut_linear: scales must be contiguous float32 [", NB, ", ", G, ", 32], got ",
              scales.scalar_type(), " ", scales.sizes());
  if (zoffs.has_value()) {
    const auto& z = *zoffs;
    TORCH_CHECK(z.scalar_type() == at::kChar && z.dim() == 3 && z.size(0) == NB && z.size(1) == G &&
                    z.size(2) == 32 && z.is_contiguous(),
                "fastadapt::lut_linear: zoffs must be contiguous int8 [", NB, ", ", G, ", 32], got ",
                z.scalar_type(), " ", z.sizes());
    TORCH_CHECK(z.device() == x.device(), "fastadapt::lut_linear: zoffs must be on ", x.device());
  }
  TORCH_CHECK(planes.device() == x.device(), "fastadapt::lut_linear: planes must be on ", x.device(),
              ", got ", planes.device());
  TORCH_CHECK(scales.device() == x.device(), "fastadapt::lut_linear: scales must be on ", x.device(),
              ", got ", scales.device());
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features && at::isFloatingType(b.scalar_type()),
                "fastadapt::lut_linear: bias must be a floating [out_features=", out_features, "] tensor, got ",
                b.scalar_type(), " ", b.sizes());
    TORCH_CHECK(b.device() == x.device(), "fastadapt::lut_linear: bias must be on ", x.device());
  }
  return {x.numel() / K, K, out_features, NB, G};
}

}  // namespace fastadapt
