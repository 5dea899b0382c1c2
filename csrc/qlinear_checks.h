// Argument checks of fastadapt::qlinear shared by the CPU and CUDA glue. Every failure is a
// c10::Error (RuntimeError in Python) whose message names the op and the argument.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "cpu/kernels/qformat.h"

namespace fastadapt {

inline QFormat parse_qformat(const std::string& fmt) {
  static const std::pair<const char*, QFormat> kNames[] = {
      {"int2", QFormat::INT2}, {"int3", QFormat::INT3}, {"int4", QFormat::INT4},
      {"int8", QFormat::INT8}, {"q4_0", QFormat::Q4_0}, {"q4_1", QFormat::Q4_1},
      {"q8_0", QFormat::Q8_0}, {"q4_k", QFormat::Q4_K}, {"q6_k", QFormat::Q6_K}};
  for (const auto& [name, f] : kNames)
    if (fmt == name) return f;
  TORCH_CHECK(false, "fastadapt::qlinear: unknown fmt '", fmt,
              "' (expected int2, int3, int4, int8, q4_0, q4_1, q8_0, q4_k or q6_k)");
}

inline bool parse_act_quant(const std::string& act_quant) {
  TORCH_CHECK(act_quant == "none" || act_quant == "int8", "fastadapt::qlinear: act_quant must be "
              "'none' or 'int8', got '", act_quant, "'");
  return act_quant == "int8";
}

inline ScaleType scale_type_of(const at::Tensor& scales) {
  switch (scales.scalar_type()) {
    case at::kFloat: return ScaleType::F32;
    case at::kHalf: return ScaleType::F16;
    case at::kBFloat16: return ScaleType::BF16;
    default:
      TORCH_CHECK(false, "fastadapt::qlinear: scales must be float32, float16 or bfloat16, got ",
                  scales.scalar_type());
  }
}

struct QLinearShape {
  QFormat fmt;
  int64_t M, N, K, group_size, groups;
  bool int8_act;
};

// Validates everything but the device-specific activation dtypes; returns the problem shape.
inline QLinearShape check_qlinear_args(const at::Tensor& x, const at::Tensor& qdata,
                                       const std::optional<at::Tensor>& scales,
                                       const std::optional<at::Tensor>& zeros,
                                       const std::optional<at::Tensor>& bias,
                                       const std::string& fmt_name, int64_t in_features,
                                       int64_t group_size, const std::string& act_quant) {
  QLinearShape s{};
  s.fmt = parse_qformat(fmt_name);
  s.int8_act = parse_act_quant(act_quant);
  const int64_t K = in_features;
  TORCH_CHECK(K > 0, "fastadapt::qlinear: in_features must be positive, got ", K);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "fastadapt::qlinear: x must have in_features=", K,
              " as its last dimension, got shape ", x.sizes());
  const int64_t bv = block_values(s.fmt);
  TORCH_CHECK(K % bv == 0, "fastadapt::qlinear: in_features=", K, " must be a multiple of ", bv,
              " for fmt=", fmt_name);
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 2,
              "fastadapt::qlinear: qdata must be a 2-D uint8 tensor [out_features, row_bytes], got ",
              qdata.scalar_type(), " of shape ", qdata.sizes());
  TORCH_CHECK(qdata.device() == x.device(), "fastadapt::qlinear: qdata is on ", qdata.device(),
              " but x is on ", x.device());
  const int64_t rb = row_bytes(s.fmt, K);
  TORCH_CHECK(qdata.size(1) == rb, "fastadapt::qlinear: qdata has ", qdata.size(1),
              " bytes per row, expected ", rb, " for fmt=", fmt_name, " and in_features=", K);
  TORCH_CHECK(qdata.is_contiguous(), "fastadapt::qlinear: qdata must be contiguous");
  s.N = qdata.size(0);
  s.K = K;
  s.M = x.numel() / K;
  if (is_gguf(s.fmt)) {
    TORCH_CHECK(!scales.has_value() && !zeros.has_value(), "fastadapt::qlinear: fmt=", fmt_name,
                " keeps its scales inside the blocks; pass scales=None and zeros=None");
    TORCH_CHECK(group_size == 0 || group_size == bv, "fastadapt::qlinear: group_size must be 0 or ",
                bv, " for fmt=", fmt_name, ", got ", group_size);
    s.group_size = bv;
    s.groups = 0;
  } else {
    TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
                "fastadapt::qlinear: group_size must be a positive multiple of 32 dividing "
                "in_features=", K, " (per-channel: group_size=in_features), got ", group_size);
    s.group_size = group_size;
    s.groups = K / group_size;
    TORCH_CHECK(scales.has_value(), "fastadapt::qlinear: fmt=", fmt_name, " needs scales");
    const auto& sc = *scales;
    scale_type_of(sc);
    TORCH_CHECK(sc.dim() == 2 && sc.size(0) == s.N && sc.size(1) == s.groups,
                "fastadapt::qlinear: scales must have shape [", s.N, ", ", s.groups,
                "] (out_features, in_features / group_size), got ", sc.sizes());
    TORCH_CHECK(sc.is_contiguous() && sc.device() == x.device(),
                "fastadapt::qlinear: scales must be contiguous and on ", x.device());
    if (zeros.has_value()) {
      const auto& z = *zeros;
      TORCH_CHECK(z.scalar_type() == at::kByte && z.dim() == 2 && z.size(0) == s.N &&
                      z.size(1) == s.groups,
                  "fastadapt::qlinear: zeros must be uint8 of shape [", s.N, ", ", s.groups,
                  "], got ", z.scalar_type(), " of shape ", z.sizes());
      TORCH_CHECK(z.is_contiguous() && z.device() == x.device(),
                  "fastadapt::qlinear: zeros must be contiguous and on ", x.device());
    }
  }
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == s.N && at::isFloatingType(b.scalar_type()),
                "fastadapt::qlinear: bias must be a floating 1-D tensor of size out_features=",
                s.N, ", got ", b.scalar_type(), " of shape ", b.sizes());
    TORCH_CHECK(b.device() == x.device(), "fastadapt::qlinear: bias must be on ", x.device());
  }
  return s;
}

inline std::vector<int64_t> qlinear_out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

inline void check_qlinear_out(const at::Tensor& out, const at::Tensor& x, int64_t N) {
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "fastadapt::qlinear: out must have x's dtype ",
              x.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(qlinear_out_shape(x, N)),
              "fastadapt::qlinear: out must have shape ", at::IntArrayRef(qlinear_out_shape(x, N)),
              ", got ", out.sizes());
  TORCH_CHECK(out.is_contiguous() && out.device() == x.device(),
              "fastadapt::qlinear: out must be contiguous and on ", x.device());
}

}  // namespace fastadapt
