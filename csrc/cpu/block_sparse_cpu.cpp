// CPU implementation of fastadapt::block_sparse_attention, vertical_slash_scores and
// block_pool_scores: checks, fp32 staging of 16-bit inputs, work split, ISA-specific kernels
// (cpu/kernels/block_sparse_*.cpp).
//
// Work split of the attention: one unit per BSR row (a query block of one head); rows differ in
// cost (causal rows near the end of a dense layout hold many more blocks), so they are sorted by
// cost and handed out dynamically (longest first) to the threads of one at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include "block_sparse_checks.h"
#include "cpu/kernels/block_sparse_kernels.h"
#include "cpu/kernels/isa.h"

namespace fastadapt::cpu {
namespace {

constexpr const char* kOp = "fastadapt::block_sparse_attention";

at::Tensor f32c(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const std::optional<at::Tensor>& q_indptr,
    const std::optional<at::Tensor>& k_indptr, const std::optional<at::Tensor>& col_indptr,
    const std::optional<at::Tensor>& cols, const std::optional<at::Tensor>& diag_indptr,
    const std::optional<at::Tensor>& diags, std::optional<double> scale) {
  check_bs_qkv(kOp, q, k, &v);
  TORCH_CHECK(q.device().is_cpu(), kOp, ": this is the CPU kernel, q is on ", q.device());
  const BsLayoutHost L = check_bs_layout_shapes(kOp, q, k, row_ptr, col_idx, q_indptr, k_indptr,
                                                col_indptr, cols, diag_indptr, diags);
  const int64_t Hq = q.size(1), Hkv = k.size(1), D = q.size(2), Nq = q.size(0);
  check_bs_layout_contents(kOp, L, Hq, row_ptr, col_idx, col_indptr, cols, diag_indptr, diags);

  at::Tensor out = at::empty({Nq, Hq, D}, q.options());
  at::Tensor lse = at::empty({Nq, Hq}, q.options().dtype(at::kFloat));
  if (Nq == 0) return {out, lse};
  const bool f32 = q.scalar_type() == at::kFloat;
  const at::Tensor q32 = f32c(q), k32 = f32c(k), v32 = f32c(v);
  at::Tensor out32 = f32 ? out : at::empty({Nq, Hq, D}, q32.options());
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const at::Tensor qi = at::tensor(L.q_indptr, at::kInt), ki = at::tensor(L.k_indptr, at::kInt);
  std::optional<at::Tensor> cp, cc, dp, dd;
  if (col_indptr.has_value()) { cp = col_indptr->contiguous(); cc = cols->contiguous(); }
  if (diag_indptr.has_value()) { dp = diag_indptr->contiguous(); dd = diags->contiguous(); }

  BsAttnArgs a;
  a.q = q32.data_ptr<float>();
  a.k = k32.data_ptr<float>();
  a.v = v32.data_ptr<float>();
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.D = D;
  a.scale = static_cast<float>(bs_scale(scale, D));
  a.q_indptr = qi.data_ptr<int32_t>();
  a.k_indptr = ki.data_ptr<int32_t>();
  a.row_ptr = rp.data_ptr<int32_t>();
  a.col_idx = ci.data_ptr<int32_t>();
  a.col_indptr = cp ? cp->data_ptr<int32_t>() : nullptr;
  a.cols = cc ? cc->data_ptr<int32_t>() : nullptr;
  a.diag_indptr = dp ? dp->data_ptr<int32_t>() : nullptr;
  a.diags = dd ? dd->data_ptr<int32_t>() : nullptr;
  a.out = out32.data_ptr<float>();
  a.lse = lse.data_ptr<float>();

  // rows and their cost (blocks + a share for the per-element extras)
  std::vector<BsRow> rows;
  std::vector<int64_t> cost;
  rows.reserve(L.rows);
  int64_t max_nkb = 1;
  for (int64_t b = 0; b < L.B; ++b) {
    const int64_t T = L.q_indptr[b + 1] - L.q_indptr[b], Tk = L.k_indptr[b + 1] - L.k_indptr[b];
    const int64_t nqb = (T + kBsBlock - 1) / kBsBlock;
    max_nkb = std::max(max_nkb, (Tk + kBsBlock - 1) / kBsBlock);
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t r = 0; r < nqb; ++r) {
        const int64_t row = L.row_base[b] + h * nqb + r;
        rows.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), static_cast<int32_t>(r),
                        static_cast<int32_t>(row)});
        int64_t c = 4 * (a.row_ptr[row + 1] - a.row_ptr[row]) + 1;
        if (a.col_indptr) c += (a.col_indptr[b * Hq + h + 1] - a.col_indptr[b * Hq + h]) / 16;
        if (a.diag_indptr) c += (a.diag_indptr[b * Hq + h + 1] - a.diag_indptr[b * Hq + h]) / 8;
        cost.push_back(c);
      }
  }
  std::vector<int64_t> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  std::vector<BsRow> sorted(rows.size());
  for (size_t i = 0; i < order.size(); ++i) sorted[i] = rows[order[i]];

  const auto fn = active_isa() == Isa::AVX2 ? bs_attn_rows_avx2 : bs_attn_rows_generic;
  const int64_t nrows = static_cast<int64_t>(sorted.size());
  const int64_t nthreads = std::min<int64_t>(std::max(1, at::get_num_threads()), nrows);
  const int64_t sfloats = bs_scratch_floats(D, max_nkb);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(static_cast<size_t>(sfloats));
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = next.fetch_add(1); i < nrows; i = next.fetch_add(1))
        fn(a, sorted.data(), i, i + 1, scratch.data());
    }
  });
  if (!f32) out.copy_(out32);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> vertical_slash_scores_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             int64_t last_q, std::optional<double> scale) {
  constexpr const char* op = "fastadapt::vertical_slash_scores";
  check_bs_qkv(op, q, k, nullptr);
  TORCH_CHECK(q.device().is_cpu(), op, ": this is the CPU kernel, q is on ", q.device());
  TORCH_CHECK(last_q >= 1 && last_q <= kBsBlock, op, ": last_q must be in [1, 64], got ", last_q);
  const int64_t T = q.size(0), Tk = k.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK(Tk >= T, op, ": k must hold at least q's ", T, " tokens (queries are the last keys), got ", Tk);
  at::Tensor vert = at::empty({Hq, Tk}, q.options().dtype(at::kFloat));
  at::Tensor slash = at::empty({Hq, Tk}, q.options().dtype(at::kFloat));
  if (Tk == 0) return {vert, slash};
  const at::Tensor q32 = f32c(q), k32 = f32c(k);
  const auto fn = active_isa() == Isa::AVX2 ? vs_scores_head_avx2 : vs_scores_head_generic;
  const float sc = static_cast<float>(bs_scale(scale, D));
  at::parallel_for(0, Hq, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> scratch(static_cast<size_t>(kBsBlock * D + kBsBlock * kBsBlock + 3 * kBsBlock));
    for (int64_t h = h0; h < h1; ++h)
      fn(q32.data_ptr<float>(), k32.data_ptr<float>(), T, Tk, Hq, Hkv, D, sc, last_q, h,
         vert.data_ptr<float>(), slash.data_ptr<float>(), scratch.data());
  });
  return {vert, slash};
}

at::Tensor block_pool_scores_cpu(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale) {
  constexpr const char* op = "fastadapt::block_pool_scores";
  check_bs_qkv(op, q, k, nullptr);
  TORCH_CHECK(q.device().is_cpu(), op, ": this is the CPU kernel, q is on ", q.device());
  const int64_t T = q.size(0), Tk = k.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK(Tk >= T, op, ": k must hold at least q's ", T, " tokens (queries are the last keys), got ", Tk);
  const int64_t nqb = (T + kBsBlock - 1) / kBsBlock, nkb = (Tk + kBsBlock - 1) / kBsBlock;
  at::Tensor scores = at::empty({Hq, nqb, nkb}, q.options().dtype(at::kFloat));
  if (T == 0) return scores;
  const at::Tensor q32 = f32c(q), k32 = f32c(k);
  const auto fn = active_isa() == Isa::AVX2 ? block_pool_head_avx2 : block_pool_head_generic;
  const float sc = static_cast<float>(bs_scale(scale, D));
  at::parallel_for(0, Hq, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> scratch(static_cast<size_t>((nqb + nkb) * D));
    for (int64_t h = h0; h < h1; ++h)
      fn(q32.data_ptr<float>(), k32.data_ptr<float>(), T, Tk, Hq, Hkv, D, sc, h,
         scores.data_ptr<float>(), scratch.data());
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_cpu);
  m.impl("vertical_slash_scores", &vertical_slash_scores_cpu);
  m.impl("block_pool_scores", &block_pool_scores_cpu);
}

}  // namespace fastadapt::cpu
