// Argument checks of the mixture-of-experts ops (fastadapt::moe_route, moe_grouped_qlinear,
// moe_combine) shared by the CPU and CUDA glue. Messages name the op and the argument.
#pragma once
#include <ATen/ATen.h>

#include "qlinear_checks.h"

namespace fastadapt {

inline bool moe_float_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
         t.scalar_type() == at::kHalf;
}

struct MoeRouteShape {
  int64_t T, E_all, E, k;
};

inline MoeRouteShape check_moe_route_args(const at::Tensor& logits, int64_t top_k, int64_t num_null) {
  TORCH_CHECK(logits.dim() == 2, "fastadapt::moe_route: logits must be [T, E + num_null], got shape ",
              logits.sizes());
  TORCH_CHECK(moe_float_dtype(logits), "fastadapt::moe_route: logits must be float32, bfloat16 or "
              "float16, got ", logits.scalar_type());
  TORCH_CHECK(num_null >= 0, "fastadapt::moe_route: num_null must be >= 0, got ", num_null);
  MoeRouteShape s{logits.size(0), logits.size(1), logits.size(1) - num_null, top_k};
  TORCH_CHECK(s.E >= 1, "fastadapt::moe_route: logits has ", s.E_all, " columns: needs at least one "
              "real expert besides num_null=", num_null);
  TORCH_CHECK(top_k >= 1 && top_k <= s.E_all && top_k <= 64, "fastadapt::moe_route: top_k must be in "
              "[1, min(64, E + num_null = ", s.E_all, ")], got ", top_k);
  TORCH_CHECK(s.E_all <= 4096, "fastadapt::moe_route: at most 4096 experts (real + null), got ", s.E_all);
  TORCH_CHECK(s.T * top_k < (int64_t{1} << 31), "fastadapt::moe_route: T * top_k must fit in int32");
  return s;
}

struct MoeGroupedShape {
  QLinearShape q;  // M = rows of x
  int64_t E, P;    // experts, grouped rows
};

// qdata [E, N, row_bytes] uint8; scales / zeros [E, N, groups]; offsets [E + 1] int32;
// token_ids [P] int32 (x: [T, K] tokens) or None (x: [P, K] already grouped).
inline MoeGroupedShape check_moe_grouped_args(const at::Tensor& x, const at::Tensor& qdata,
                                              const std::optional<at::Tensor>& scales,
                                              const std::optional<at::Tensor>& zeros,
                                              const std::string& fmt, int64_t in_features,
                                              int64_t group_size, const at::Tensor& offsets,
                                              const std::optional<at::Tensor>& token_ids) {
  TORCH_CHECK(qdata.dim() == 3 && qdata.scalar_type() == at::kByte,
              "fastadapt::moe_grouped_qlinear: qdata must be uint8 [E, out_features, row_bytes], got ",
              qdata.scalar_type(), " of shape ", qdata.sizes());
  TORCH_CHECK(x.dim() == 2, "fastadapt::moe_grouped_qlinear: x must be 2-D [rows, in_features], got "
              "shape ", x.sizes());
  TORCH_CHECK(moe_float_dtype(x), "fastadapt::moe_grouped_qlinear: x must be float32, bfloat16 or "
              "float16, got ", x.scalar_type());
  const int64_t E = qdata.size(0);
  TORCH_CHECK(E >= 1, "fastadapt::moe_grouped_qlinear: qdata has no experts");
  for (const auto* t : {&scales, &zeros}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->dim() == 3 && (*t)->size(0) == E,
                  "fastadapt::moe_grouped_qlinear: scales and zeros must be [E=", E,
                  ", out_features, groups], got shape ", (*t)->sizes());
    }
  }
  // per-expert view: the qlinear checks on expert 0 cover formats, sizes, groups and devices
  auto sel = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>((*t)[0]) : std::optional<at::Tensor>();
  };
  MoeGroupedShape s{};
  try {
    s.q = check_qlinear_args(x, qdata[0], sel(scales), sel(zeros), std::nullopt, fmt, in_features,
                             group_size, "none");
  } catch (const c10::Error& e) {
    std::string msg = e.msg();
    const std::string from = "fastadapt::qlinear";
    if (msg.rfind(from, 0) == 0) msg = "fastadapt::moe_grouped_qlinear" + msg.substr(from.size());
    TORCH_CHECK(false, msg, " (per expert)");
  }
  TORCH_CHECK(qdata.is_contiguous() && (!scales.has_value() || scales->is_contiguous()) &&
                  (!zeros.has_value() || zeros->is_contiguous()),
              "fastadapt::moe_grouped_qlinear: qdata, scales and zeros must be contiguous");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == E + 1 && offsets.scalar_type() == at::kInt,
              "fastadapt::moe_grouped_qlinear: expert_offsets must be int32 [E + 1 = ", E + 1, "], got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
  TORCH_CHECK(offsets.device() == x.device(), "fastadapt::moe_grouped_qlinear: expert_offsets must be on ",
              x.device());
  s.E = E;
  if (token_ids.has_value()) {
    const auto& ti = *token_ids;
    TORCH_CHECK(ti.dim() == 1 && ti.scalar_type() == at::kInt,
                "fastadapt::moe_grouped_qlinear: token_ids must be a 1-D int32 tensor, got ",
                ti.scalar_type(), " of shape ", ti.sizes());
    TORCH_CHECK(ti.device() == x.device(), "fastadapt::moe_grouped_qlinear: token_ids must be on ",
                x.device());
    s.P = ti.size(0);
  } else {
    s.P = x.size(0);
  }
  return s;
}

// Index contents (CPU): offsets non-decreasing from 0 to at most P; token ids of used rows in
// [0, T).
inline void check_moe_grouped_indices(const at::Tensor& offsets_cpu, const int32_t* token_ids,
                                      int64_t P, int64_t T) {
  const int32_t* o = offsets_cpu.data_ptr<int32_t>();
  const int64_t E = offsets_cpu.size(0) - 1;
  TORCH_CHECK(o[0] == 0, "fastadapt::moe_grouped_qlinear: expert_offsets[0] must be 0, got ", o[0]);
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(o[e + 1] >= o[e], "fastadapt::moe_grouped_qlinear: expert_offsets must be "
                "non-decreasing (offsets[", e + 1, "] = ", o[e + 1], " < ", o[e], ")");
  TORCH_CHECK(o[E] <= P, "fastadapt::moe_grouped_qlinear: expert_offsets[E] = ", o[E],
              " exceeds the ", P, " grouped rows");
  if (token_ids != nullptr) {
    for (int64_t p = 0; p < o[E]; ++p)
      TORCH_CHECK(token_ids[p] >= 0 && token_ids[p] < T, "fastadapt::moe_grouped_qlinear: token_ids[",
                  p, "] = ", token_ids[p], " out of range [0, ", T, ")");
  }
}

// y [P, N]; row_weights [P] fp32; topk_rows [T, k] int32.
inline void check_moe_combine_args(const at::Tensor& y, const at::Tensor& w, const at::Tensor& rows) {
  TORCH_CHECK(y.dim() == 2 && moe_float_dtype(y), "fastadapt::moe_combine: y must be a 2-D float32, "
              "bfloat16 or float16 tensor [P, N], got ", y.scalar_type(), " of shape ", y.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == y.size(0) && w.scalar_type() == at::kFloat,
              "fastadapt::moe_combine: row_weights must be float32 [P = ", y.size(0), "], got ",
              w.scalar_type(), " of shape ", w.sizes());
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kInt,
              "fastadapt::moe_combine: topk_rows must be int32 [T, top_k], got ", rows.scalar_type(),
              " of shape ", rows.sizes());
  TORCH_CHECK(w.device() == y.device() && rows.device() == y.device(),
              "fastadapt::moe_combine: row_weights and topk_rows must be on ", y.device());
}

}  // namespace fastadapt
