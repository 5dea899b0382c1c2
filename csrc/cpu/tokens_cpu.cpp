// CPU implementation of the token merging and pruning ops: checks (tokens_checks.h), fp32
// staging of 16-bit inputs, work split over threads with at::parallel_for, ISA-specific kernels
// (cpu/kernels/tokens_*.cpp). Plan assembly (sorting Na edge scores, numbering rows) and the
// data-movement ops (unmerge, prune gathers) are plain C++ here: they are O(N) or O(N log N)
// next to the O(N^2 C) matching.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/kernels/isa.h"
#include "cpu/kernels/tokens_kernels.h"
#include "tokens_checks.h"

namespace fastadapt::cpu {
namespace {

bool use_avx2() { return active_isa() == Isa::AVX2; }

// ---- bipartite_soft_matching ---------------------------------------------------------------
at::Tensor bipartite_soft_matching_cpu(const at::Tensor& metric, int64_t r,
                                       const std::optional<at::Tensor>& prot) {
  const auto [B, N, C] = check_bipartite_soft_matching_args(metric, r, prot);
  TORCH_CHECK(metric.device().is_cpu(), "fastadapt::bipartite_soft_matching: this is the CPU kernel, metric is on ",
              metric.device());
  at::Tensor dest = at::empty({B, N}, metric.options().dtype(at::kInt));
  if (B == 0 || N == 0) return dest;
  const int64_t Na = (N + 1) / 2;
  const at::Tensor m32 = metric.to(at::kFloat).contiguous();
  const at::Tensor p8 = prot.has_value() ? prot->contiguous().to(at::kByte) : at::Tensor();
  at::Tensor inv = at::empty({B, N}, m32.options());
  at::Tensor best = at::empty({B, Na}, m32.options());
  at::Tensor best_idx = at::empty({B, Na}, m32.options().dtype(at::kInt));
  const bool avx2 = use_avx2();
  auto inv_fn = avx2 ? tokens_inv_norms_avx2 : tokens_inv_norms_generic;
  auto match_fn = avx2 ? tokens_match_rows_avx2 : tokens_match_rows_generic;
  const float* mp = m32.data_ptr<float>();
  const uint8_t* pp = p8.defined() ? p8.data_ptr<uint8_t>() : nullptr;
  float* ip = inv.data_ptr<float>();
  float* bp = best.data_ptr<float>();
  int32_t* bip = best_idx.data_ptr<int32_t>();
  if (r > 0) {
    at::parallel_for(0, B * N, std::max<int64_t>(1, 16384 / C), [&](int64_t b0, int64_t b1) {
      inv_fn(mp, C, b0, b1, ip);
    });
    // the B half (odd tokens) transposed and zero-padded to 16 keys: [B, C, ldb], with per-key
    // inverse norms (0: protected / padding) and additive masks (-inf: protected / padding)
    const int64_t Nb = N / 2, ldb = (Nb + 15) / 16 * 16;
    at::Tensor bT = at::zeros({B, C, ldb}, m32.options());
    at::Tensor wb = at::zeros({B, ldb}, m32.options());
    at::Tensor addb = at::full({B, ldb}, -std::numeric_limits<float>::infinity(), m32.options());
    if (Nb > 0) {
      bT.narrow(2, 0, Nb).copy_(m32.slice(1, 1, N, 2).transpose(1, 2));
      at::Tensor odd_inv = inv.slice(1, 1, N, 2);
      at::Tensor allowed = p8.defined() ? p8.slice(1, 1, N, 2).eq(0) : at::ones_like(odd_inv, at::kBool);
      wb.narrow(1, 0, Nb).copy_(odd_inv * allowed);
      addb.narrow(1, 0, Nb).masked_fill_(allowed, 0.f);
    }
    const float* bTp = bT.data_ptr<float>();
    const float* wbp = wb.data_ptr<float>();
    const float* abp = addb.data_ptr<float>();
    // (batch, 16 A rows) tasks
    constexpr int64_t kRows = 16;
    const int64_t tiles = (Na + kRows - 1) / kRows;
    at::parallel_for(0, B * tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / tiles, i0 = (t % tiles) * kRows, i1 = std::min(Na, i0 + kRows);
        match_fn(mp + b * N * C, ip + b * N, C, bTp + b * C * ldb, ldb, wbp + b * ldb, abp + b * ldb, i0, i1,
                 bp + b * Na, bip + b * Na);
      }
    });
  }
  int32_t* dp = dest.data_ptr<int32_t>();
  // Plan per batch item: the r best edges among unprotected A tokens that have a destination
  // (ordered by similarity, then by A position), then rows numbered in token order.
  std::vector<int64_t> bad(B, -1);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> cand;
    std::vector<int32_t> target(N);
    for (int64_t b = b0; b < b1; ++b) {
      const float* sb = bp + b * Na;
      const int32_t* ib = bip + b * Na;
      const uint8_t* pb = pp ? pp + b * N : nullptr;
      std::fill(target.begin(), target.end(), -1);
      if (r > 0) {
        cand.clear();
        for (int64_t i = 0; i < Na; ++i)
          if (!(pb && pb[2 * i]) && ib[i] >= 0) cand.push_back(static_cast<int32_t>(i));
        if (static_cast<int64_t>(cand.size()) < r) {
          bad[b] = static_cast<int64_t>(cand.size());
          continue;
        }
        std::partial_sort(cand.begin(), cand.begin() + r, cand.end(), [&](int32_t x, int32_t y) {
          return sb[x] > sb[y] || (sb[x] == sb[y] && x < y);
        });
        for (int64_t e = 0; e < r; ++e) target[2 * cand[e]] = ib[cand[e]];
      }
      int32_t* db = dp + b * N;
      int32_t row = 0;
      for (int64_t n = 0; n < N; ++n)
        if (target[n] < 0) db[n] = row++;
      for (int64_t n = 0; n < N; ++n)
        if (target[n] >= 0) db[n] = db[target[n]];
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(bad[b] < 0, "fastadapt::bipartite_soft_matching: r = ", r, " exceeds the ", bad[b],
                " mergeable tokens of batch item ", b,
                " (unprotected even positions with an unprotected odd partner)");
  }
  return dest;
}

// ---- merge_tokens --------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> merge_tokens_cpu(const at::Tensor& x, const at::Tensor& dest, int64_t num_out,
                                                    const std::optional<at::Tensor>& sizes) {
  const auto [B, N, C] = check_merge_tokens_args(x, dest, num_out, sizes);
  TORCH_CHECK(x.device().is_cpu(), "fastadapt::merge_tokens: this is the CPU kernel, x is on ", x.device());
  const at::Tensor d = dest.contiguous();
  check_tokens_dest_range("merge_tokens", d, num_out);
  at::Tensor out = at::empty({B, num_out, C}, x.options());
  at::Tensor out_sizes = at::empty({B, num_out}, x.options().dtype(at::kFloat));
  if (B == 0 || num_out == 0) return {out, out_sizes};
  const bool f32 = x.scalar_type() == at::kFloat;
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor s32 = sizes.has_value() ? sizes->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out32 = f32 ? out : at::empty({B, num_out, C}, x32.options());
  // CSR of sources per output row, sources in token order (deterministic sums)
  at::Tensor ptr = at::empty({B, num_out + 1}, d.options());
  at::Tensor idx = at::empty({B, N}, d.options());
  const int32_t* dp = d.data_ptr<int32_t>();
  int32_t* pp = ptr.data_ptr<int32_t>();
  int32_t* ip = idx.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> fillpos(num_out);
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t* db = dp + b * N;
      int32_t* pb = pp + b * (num_out + 1);
      std::fill(pb, pb + num_out + 1, 0);
      for (int64_t n = 0; n < N; ++n)
        if (db[n] >= 0) ++pb[db[n] + 1];
      for (int64_t m = 0; m < num_out; ++m) pb[m + 1] += pb[m];
      std::copy(pb, pb + num_out, fillpos.begin());
      for (int64_t n = 0; n < N; ++n)
        if (db[n] >= 0) ip[b * N + fillpos[db[n]]++] = static_cast<int32_t>(n);
    }
  });
  auto fn = use_avx2() ? tokens_merge_rows_avx2 : tokens_merge_rows_generic;
  const float* xp = x32.data_ptr<float>();
  const float* sp = s32.defined() ? s32.data_ptr<float>() : nullptr;
  float* op = out32.data_ptr<float>();
  float* osp = out_sizes.data_ptr<float>();
  at::parallel_for(0, B * num_out, std::max<int64_t>(1, 8192 / C), [&](int64_t t0, int64_t t1) {
    while (t0 < t1) {
      const int64_t b = t0 / num_out, m0 = t0 % num_out, m1 = std::min(num_out, m0 + (t1 - t0));
      fn(xp + b * N * C, sp ? sp + b * N : nullptr, pp + b * (num_out + 1), ip + b * N, C, m0, m1,
         op + b * num_out * C, osp + b * num_out);
      t0 += m1 - m0;
    }
  });
  if (!f32) out.copy_(out32);
  return {out, out_sizes};
}

// ---- unmerge_tokens ------------------------------------------------------------------------
at::Tensor unmerge_tokens_cpu(const at::Tensor& x, const at::Tensor& dest, const std::optional<at::Tensor>& fill) {
  const auto [B, N, M, C] = check_unmerge_tokens_args(x, dest, fill);
  TORCH_CHECK(x.device().is_cpu(), "fastadapt::unmerge_tokens: this is the CPU kernel, x is on ", x.device());
  const at::Tensor d = dest.contiguous();
  check_tokens_dest_range("unmerge_tokens", d, M);
  at::Tensor out = at::empty({B, N, C}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor fc = fill.has_value() ? fill->contiguous() : at::Tensor();
  const int64_t row_bytes = C * static_cast<int64_t>(x.element_size());
  const char* xp = static_cast<const char*>(xc.data_ptr());
  const char* fp = fc.defined() ? static_cast<const char*>(fc.data_ptr()) : nullptr;
  char* op = static_cast<char*>(out.data_ptr());
  const int32_t* dp = d.data_ptr<int32_t>();
  at::parallel_for(0, B * N, std::max<int64_t>(1, 65536 / row_bytes), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / N;
      const int32_t m = dp[t];
      char* o = op + t * row_bytes;
      if (m >= 0) std::memcpy(o, xp + (b * M + m) * row_bytes, row_bytes);
      else if (fp) std::memcpy(o, fp + t * row_bytes, row_bytes);
      else std::memset(o, 0, row_bytes);  // all-zero bits are +0.0 in every float dtype
    }
  });
  return out;
}

// ---- prune_tokens --------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> prune_tokens_cpu(const at::Tensor& x, const at::Tensor& scores, int64_t keep,
                                                    const std::optional<at::Tensor>& prot) {
  const auto [B, N, C] = check_prune_tokens_args(x, scores, keep, prot);
  TORCH_CHECK(x.device().is_cpu(), "fastadapt::prune_tokens: this is the CPU kernel, x is on ", x.device());
  at::Tensor out = at::empty({B, keep, C}, x.options());
  at::Tensor kept = at::empty({B, keep}, x.options().dtype(at::kInt));
  if (B == 0 || keep == 0) return {out, kept};
  const at::Tensor s64 = scores.to(at::kDouble).contiguous();
  const at::Tensor p8 = prot.has_value() ? prot->contiguous().to(at::kByte) : at::Tensor();
  const double* sp = s64.data_ptr<double>();
  const uint8_t* pp = p8.defined() ? p8.data_ptr<uint8_t>() : nullptr;
  int32_t* kp = kept.data_ptr<int32_t>();
  std::vector<int64_t> nprot(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> order(N);
    for (int64_t b = b0; b < b1; ++b) {
      const double* sb = sp + b * N;
      const uint8_t* pb = pp ? pp + b * N : nullptr;
      if (pb) nprot[b] = std::count_if(pb, pb + N, [](uint8_t v) { return v != 0; });
      if (nprot[b] > keep) continue;
      // ranking: protected first, then score descending (NaN last), then position
      auto better = [&](int32_t a, int32_t c) {
        const bool pa = pb && pb[a], pc = pb && pb[c];
        if (pa != pc) return pa;
        const bool na = std::isnan(sb[a]), nc = std::isnan(sb[c]);
        if (na != nc) return nc;
        if (!na && sb[a] != sb[c]) return sb[a] > sb[c];
        return a < c;
      };
      std::iota(order.begin(), order.end(), 0);
      std::nth_element(order.begin(), order.begin() + (keep - 1), order.end(), better);
      std::sort(order.begin(), order.begin() + keep);
      std::copy(order.begin(), order.begin() + keep, kp + b * keep);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(nprot[b] <= keep, "fastadapt::prune_tokens: keep = ", keep, " is smaller than the ", nprot[b],
                " protected tokens of batch item ", b);
  }
  const at::Tensor xc = x.contiguous();
  const int64_t row_bytes = C * static_cast<int64_t>(x.element_size());
  const char* xp = static_cast<const char*>(xc.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * keep, std::max<int64_t>(1, 65536 / row_bytes), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / keep;
      std::memcpy(op + t * row_bytes, xp + (b * N + kp[t]) * row_bytes, row_bytes);
    }
  });
  return {out, kept};
}

// ---- proportional_attention ----------------------------------------------------------------
at::Tensor proportional_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& sizes, std::optional<double> scale) {
  const auto [B, H, Nq, Nk, D] = check_proportional_attention_args(q, k, v, sizes);
  TORCH_CHECK(q.device().is_cpu(), "fastadapt::proportional_attention: this is the CPU kernel, q is on ",
              q.device());
  at::Tensor out = at::empty({B, H, Nq, D}, q.options());
  if (out.numel() == 0) return out;
  const bool f32 = q.scalar_type() == at::kFloat;
  const at::Tensor q32 = q.to(at::kFloat).contiguous();
  // K transposed per head, keys zero-padded to a multiple of 16: [B, H, D, ldk] (the size of K,
  // not of the attention matrix), so the score micro-kernel needs no horizontal sums
  const int64_t ldk = (Nk + 15) / 16 * 16;
  at::Tensor kT = at::zeros({B, H, D, ldk}, q.options().dtype(at::kFloat));
  kT.narrow(3, 0, Nk).copy_(k.transpose(2, 3));
  const at::Tensor v32 = v.to(at::kFloat).contiguous();
  // bias = log(size): 0 -> -inf (masked key)
  if (sizes.has_value()) {
    TORCH_CHECK(!(*sizes < 0).any().item<bool>(),
                "fastadapt::proportional_attention: sizes must be >= 0 (0 masks a key)");
  }
  const at::Tensor bias = sizes.has_value() ? sizes->to(at::kFloat).log().contiguous() : at::Tensor();
  at::Tensor out32 = f32 ? out : at::empty({B, H, Nq, D}, q32.options());
  const float sc = scale.has_value() ? static_cast<float>(*scale) : 1.f / std::sqrt(static_cast<float>(D));
  auto fn = use_avx2() ? tokens_prop_attn_rows_avx2 : tokens_prop_attn_rows_generic;
  const float* qp = q32.data_ptr<float>();
  const float* kp = kT.data_ptr<float>();
  const float* vp = v32.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* op = out32.data_ptr<float>();
  constexpr int64_t kRows = 16;  // query rows per task
  const int64_t tiles = (Nq + kRows - 1) / kRows;
  at::parallel_for(0, B * H * tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / tiles, b = bh / H, r0 = (t % tiles) * kRows, r1 = std::min(Nq, r0 + kRows);
      fn(qp + bh * Nq * D, kp + bh * D * ldk, ldk, vp + bh * Nk * D, bp ? bp + b * Nk : nullptr, Nk, D, sc, r0,
         r1, op + bh * Nq * D);
    }
  });
  if (!f32) out.copy_(out32);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("bipartite_soft_matching", &bipartite_soft_matching_cpu);
  m.impl("merge_tokens", &merge_tokens_cpu);
  m.impl("unmerge_tokens", &unmerge_tokens_cpu);
  m.impl("prune_tokens", &prune_tokens_cpu);
  m.impl("proportional_attention", &proportional_attention_cpu);
}

}  // namespace fastadapt::cpu
