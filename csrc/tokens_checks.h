// Argument checks of the token merging and pruning ops (fastadapt::bipartite_soft_matching,
// merge_tokens, unmerge_tokens, prune_tokens, proportional_attention), shared by the CPU and
// CUDA glue. Shapes, dtypes and devices are checked everywhere; index *contents* (dest ranges,
// protected counts) are checked by the CPU glue only (DESIGN.md: on CUDA the Python objects that
// build them guarantee validity).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace fastadapt {

inline bool tokens_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_tokens_features(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "fastadapt::", op, ": ", name, " must be [B, N, C], got shape ", x.sizes());
  TORCH_CHECK(tokens_float_dtype(x.scalar_type()), "fastadapt::", op, ": ", name,
              " must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) > 0, "fastadapt::", op, ": ", name, " must have C > 0, got shape ", x.sizes());
}

inline void check_tokens_protected(const char* op, const std::optional<at::Tensor>& prot, int64_t B,
                                   int64_t N, const at::Device& dev) {
  if (!prot.has_value()) return;
  const auto& p = *prot;
  TORCH_CHECK(p.scalar_type() == at::kBool && p.dim() == 2 && p.size(0) == B && p.size(1) == N,
              "fastadapt::", op, ": protected must be a bool tensor [B, N] = [", B, ", ", N, "], got ",
              p.scalar_type(), " of shape ", p.sizes());
  TORCH_CHECK(p.device() == dev, "fastadapt::", op, ": protected must be on ", dev, ", got ", p.device());
}

inline void check_tokens_dest(const char* op, const at::Tensor& dest, int64_t B, const at::Device& dev) {
  TORCH_CHECK(dest.scalar_type() == at::kInt && dest.dim() == 2 && dest.size(0) == B,
              "fastadapt::", op, ": dest must be an int32 tensor [B, N] with B = ", B, ", got ",
              dest.scalar_type(), " of shape ", dest.sizes());
  TORCH_CHECK(dest.device() == dev, "fastadapt::", op, ": dest must be on ", dev, ", got ", dest.device());
}

// CPU only: every dest entry in [-1, num_out). dest must be a contiguous int32 CPU tensor.
inline void check_tokens_dest_range(const char* op, const at::Tensor& dest, int64_t num_out) {
  const int32_t* d = dest.data_ptr<int32_t>();
  const int64_t n = dest.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(d[i] >= -1 && d[i] < num_out, "fastadapt::", op, ": dest values must be in [-1, ",
                num_out, "), got dest[", i / dest.size(1), ", ", i % dest.size(1), "] = ", d[i]);
  }
}

// Returns (B, N, C).
inline std::tuple<int64_t, int64_t, int64_t> check_bipartite_soft_matching_args(
    const at::Tensor& metric, int64_t r, const std::optional<at::Tensor>& prot) {
  check_tokens_features("bipartite_soft_matching", "metric", metric);
  const int64_t B = metric.size(0), N = metric.size(1), C = metric.size(2);
  TORCH_CHECK(r >= 0 && r <= N / 2, "fastadapt::bipartite_soft_matching: r must be in [0, N/2 = ", N / 2,
              "], got ", r);
  check_tokens_protected("bipartite_soft_matching", prot, B, N, metric.device());
  return {B, N, C};
}

// Returns (B, N, C).
inline std::tuple<int64_t, int64_t, int64_t> check_merge_tokens_args(
    const at::Tensor& x, const at::Tensor& dest, int64_t num_out, const std::optional<at::Tensor>& sizes) {
  check_tokens_features("merge_tokens", "x", x);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_tokens_dest("merge_tokens", dest, B, x.device());
  TORCH_CHECK(dest.size(1) == N, "fastadapt::merge_tokens: dest must be [B, N] = [", B, ", ", N,
              "], got shape ", dest.sizes());
  TORCH_CHECK(num_out >= 0 && num_out <= N, "fastadapt::merge_tokens: num_out must be in [0, N = ", N,
              "], got ", num_out);
  if (sizes.has_value()) {
    TORCH_CHECK(sizes->dim() == 2 && sizes->size(0) == B && sizes->size(1) == N &&
                    at::isFloatingType(sizes->scalar_type()),
                "fastadapt::merge_tokens: sizes must be a floating tensor [B, N] = [", B, ", ", N,
                "], got ", sizes->scalar_type(), " of shape ", sizes->sizes());
    TORCH_CHECK(sizes->device() == x.device(), "fastadapt::merge_tokens: sizes must be on ", x.device());
  }
  return {B, N, C};
}

// Returns (B, N, M, C) with M the rows of x, N the tokens of dest.
inline std::tuple<int64_t, int64_t, int64_t, int64_t> check_unmerge_tokens_args(
    const at::Tensor& x, const at::Tensor& dest, const std::optional<at::Tensor>& fill) {
  check_tokens_features("unmerge_tokens", "x", x);
  const int64_t B = x.size(0), M = x.size(1), C = x.size(2);
  check_tokens_dest("unmerge_tokens", dest, B, x.device());
  const int64_t N = dest.size(1);
  if (fill.has_value()) {
    TORCH_CHECK(fill->dim() == 3 && fill->size(0) == B && fill->size(1) == N && fill->size(2) == C &&
                    fill->scalar_type() == x.scalar_type(),
                "fastadapt::unmerge_tokens: fill must be ", x.scalar_type(), " [B, N, C] = [", B, ", ", N,
                ", ", C, "], got ", fill->scalar_type(), " of shape ", fill->sizes());
    TORCH_CHECK(fill->device() == x.device(), "fastadapt::unmerge_tokens: fill must be on ", x.device());
  }
  return {B, N, M, C};
}

// Returns (B, N, C).
inline std::tuple<int64_t, int64_t, int64_t> check_prune_tokens_args(
    const at::Tensor& x, const at::Tensor& scores, int64_t keep, const std::optional<at::Tensor>& prot) {
  check_tokens_features("prune_tokens", "x", x);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == B && scores.size(1) == N &&
                  at::isFloatingType(scores.scalar_type()),
              "fastadapt::prune_tokens: scores must be a floating tensor [B, N] = [", B, ", ", N, "], got ",
              scores.scalar_type(), " of shape ", scores.sizes());
  TORCH_CHECK(scores.device() == x.device(), "fastadapt::prune_tokens: scores must be on ", x.device());
  TORCH_CHECK(keep >= 0 && keep <= N, "fastadapt::prune_tokens: keep must be in [0, N = ", N, "], got ", keep);
  check_tokens_protected("prune_tokens", prot, B, N, x.device());
  return {B, N, C};
}

// Returns (B, H, Nq, Nk, D).
inline std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> check_proportional_attention_args(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& sizes) {
  const char* op = "proportional_attention";
  TORCH_CHECK(q.dim() == 4, "fastadapt::", op, ": q must be [B, H, Nq, D], got shape ", q.sizes());
  TORCH_CHECK(tokens_float_dtype(q.scalar_type()), "fastadapt::", op,
              ": q must be float32, bfloat16 or float16, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  TORCH_CHECK(D > 0 && D <= 256, "fastadapt::", op, ": head dim D must be in [1, 256], got ", D);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "fastadapt::", op, ": k must be [B, H, Nk, D] with B, H, D of q (", B, ", ", H, ", ", D,
              "), got shape ", k.sizes());
  const int64_t Nk = k.size(2);
  TORCH_CHECK(v.sizes() == k.sizes(), "fastadapt::", op, ": v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastadapt::", op, ": k and v must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(),
              " and ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "fastadapt::", op,
              ": k and v must be on q's device ", q.device());
  if (sizes.has_value()) {
    TORCH_CHECK(sizes->dim() == 2 && sizes->size(0) == B && sizes->size(1) == Nk &&
                    at::isFloatingType(sizes->scalar_type()),
                "fastadapt::", op, ": sizes must be a floating tensor [B, Nk] = [", B, ", ", Nk, "], got ",
                sizes->scalar_type(), " of shape ", sizes->sizes());
    TORCH_CHECK(sizes->device() == q.device(), "fastadapt::", op, ": sizes must be on ", q.device());
  }
  return {B, H, Nq, Nk, D};
}

}  // namespace fastadapt
