// Argument checks of fastadapt::rope and fastadapt::silu_mul shared by the CPU and CUDA glue.
// Every failure is a c10::Error (RuntimeError in Python) naming the op and the argument.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <vector>

namespace fastadapt {

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

struct RopeShape {
  int64_t T, Hq, Hk, D, max_pos;
};

// Shapes, dtypes, devices and layouts (not the contents of positions: see check_rope_positions).
inline RopeShape check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                 const at::Tensor& cos_sin) {
  TORCH_CHECK(q.dim() == 3, "fastadapt::rope: q must be 3-D [T, H_q, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "fastadapt::rope: k must be 3-D [T, H_kv, D], got shape ", k.sizes());
  TORCH_CHECK(is_activation_dtype(q.scalar_type()),
              "fastadapt::rope: q must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "fastadapt::rope: k must have q's dtype ",
              q.scalar_type(), ", got ", k.scalar_type());
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK(D > 0 && D % 2 == 0, "fastadapt::rope: the head dim D (last dim of q) must be even and "
              "positive, got ", D);
  TORCH_CHECK(k.size(0) == T && k.size(2) == D, "fastadapt::rope: k must be [T=", T, ", H_kv, D=", D,
              "] like q, got shape ", k.sizes());
  TORCH_CHECK(k.device() == q.device(), "fastadapt::rope: k is on ", k.device(), " but q is on ",
              q.device());
  TORCH_CHECK(q.stride(2) == 1 || q.numel() == 0, "fastadapt::rope: q's last dim must be contiguous "
              "(stride 1), got strides ", q.strides());
  TORCH_CHECK(k.stride(2) == 1 || k.numel() == 0, "fastadapt::rope: k's last dim must be contiguous "
              "(stride 1), got strides ", k.strides());
  TORCH_CHECK(at::has_internal_overlap(q) != at::MemOverlap::Yes &&
                  at::has_internal_overlap(k) != at::MemOverlap::Yes,
              "fastadapt::rope: q and k are updated in place and must not have overlapping elements "
              "(e.g. an expanded view)");
  if (q.numel() > 0 && k.numel() > 0) {
    const auto o = at::get_overlap_status(q, k);
    TORCH_CHECK(o != at::MemOverlapStatus::Full && o != at::MemOverlapStatus::Partial,
                "fastadapt::rope: q and k must not share memory");
  }
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == T,
              "fastadapt::rope: positions must be 1-D [T=", T, "], got shape ", positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
              "fastadapt::rope: positions must be int32 or int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.device() == q.device(), "fastadapt::rope: positions is on ",
              positions.device(), " but q is on ", q.device());
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) == D,
              "fastadapt::rope: cos_sin must be 2-D [max_pos, D=", D, "], got shape ", cos_sin.sizes());
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat, "fastadapt::rope: cos_sin must be float32, got ",
              cos_sin.scalar_type());
  TORCH_CHECK(cos_sin.device() == q.device(), "fastadapt::rope: cos_sin is on ", cos_sin.device(),
              " but q is on ", q.device());
  TORCH_CHECK(cos_sin.stride(1) == 1 || cos_sin.numel() == 0,
              "fastadapt::rope: cos_sin's last dim must be contiguous (stride 1), got strides ",
              cos_sin.strides());
  return {T, q.size(1), k.size(1), D, cos_sin.size(0)};
}

// Every position must select a row of cos_sin. p: contiguous, on the CPU.
inline void check_rope_positions(const at::Tensor& p, int64_t max_pos) {
  const int64_t n = p.numel();
  const bool i64 = p.scalar_type() == at::kLong;
  const void* d = p.data_ptr();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = i64 ? static_cast<const int64_t*>(d)[i] : static_cast<const int32_t*>(d)[i];
    TORCH_CHECK(v >= 0 && v < max_pos, "fastadapt::rope: positions[", i, "] = ", v,
                " is outside cos_sin, which has rows for positions 0..", max_pos - 1);
  }
}

// silu_mul: x [..., 2F] -> [..., F]. Returns the output shape.
inline std::vector<int64_t> check_silu_mul_args(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.size(-1) % 2 == 0,
              "fastadapt::silu_mul: x must have an even, non-empty last dimension [..., 2F] (gate "
              "then up), got shape ", x.sizes());
  TORCH_CHECK(is_activation_dtype(x.scalar_type()),
              "fastadapt::silu_mul: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() /= 2;
  return shape;
}

inline void check_silu_mul_out(const at::Tensor& out, const at::Tensor& x,
                               const std::vector<int64_t>& shape) {
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), "fastadapt::silu_mul: out must have shape ",
              at::IntArrayRef(shape), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "fastadapt::silu_mul: out must have x's dtype ",
              x.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), "fastadapt::silu_mul: out is on ", out.device(),
              " but x is on ", x.device());
  TORCH_CHECK(out.is_contiguous(), "fastadapt::silu_mul: out must be contiguous");
  if (out.numel() > 0) {
    const auto o = at::get_overlap_status(out, x);
    TORCH_CHECK(o != at::MemOverlapStatus::Full && o != at::MemOverlapStatus::Partial,
                "fastadapt::silu_mul: out must not share memory with x");
  }
}

// x as [rows, 2F] with a contiguous last dim (a view when the layout allows, else a copy).
inline at::Tensor silu_mul_rows_view(const at::Tensor& x) {
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  return x2;
}

}  // namespace fastadapt
