// Argument checks of fastadapt::logit_confidence and fastadapt::hidden_cosine shared by the CPU
// and CUDA glue.
#pragma once
#include <ATen/ATen.h>

namespace fastadapt {

inline bool confidence_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Returns (B, V).
inline std::pair<int64_t, int64_t> check_logit_confidence_args(const at::Tensor& logits, double temperature) {
  TORCH_CHECK(logits.dim() == 2, "fastadapt::logit_confidence: logits must be 2-D [B, V], got shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, "fastadapt::logit_confidence: logits must have V > 0 columns, got shape ",
              logits.sizes());
  TORCH_CHECK(confidence_dtype_ok(logits.scalar_type()),
              "fastadapt::logit_confidence: logits must be float32, bfloat16 or float16, got ",
              logits.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "fastadapt::logit_confidence: temperature must be finite and > 0, got ", temperature);
  return {logits.size(0), logits.size(1)};
}

// Returns (rows, H).
inline std::pair<int64_t, int64_t> check_hidden_cosine_args(const at::Tensor& a, const at::Tensor& b, double eps) {
  TORCH_CHECK(a.dim() >= 1 && a.size(-1) > 0, "fastadapt::hidden_cosine: a must have a non-empty last "
              "dimension, got shape ", a.sizes());
  TORCH_CHECK(confidence_dtype_ok(a.scalar_type()),
              "fastadapt::hidden_cosine: a must be float32, bfloat16 or float16, got ", a.scalar_type());
  TORCH_CHECK(b.sizes() == a.sizes() && b.scalar_type() == a.scalar_type(),
              "fastadapt::hidden_cosine: b must match a (", a.scalar_type(), ", ", a.sizes(), "), got ",
              b.scalar_type(), " of shape ", b.sizes());
  TORCH_CHECK(b.device() == a.device(), "fastadapt::hidden_cosine: b must be on ", a.device(), ", got ",
              b.device());
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, "fastadapt::hidden_cosine: eps must be finite and > 0, got ",
              eps);
  return {a.numel() / a.size(-1), a.size(-1)};
}

}  // namespace fastadapt
