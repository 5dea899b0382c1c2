// CPU implementation of fastadapt::paged_decode_attention, fastadapt::paged_prefix_attention and
// fastadapt::merge_attention_states.
//
// Plan: queries are grouped per page-table row (decode: the T_q * G queries of one (sequence,
// KV head); prefix: tiles of up to kPrefixTile of the B * T_q * G queries of one KV head), and
// every group's keys are cut into splits so that there are several work units per thread even
// for one long row (split-K). Units run in parallel (at::parallel_for, torch.set_num_threads
// governs it) and leave partial softmax states; a second parallel pass merges the splits of each
// group. With score_acc, a third pass recomputes each unit's logits with the now known row LSE
// and adds each key's probability mass at its slot (two passes over the keys, no N-sized
// attention matrix anywhere).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels/isa.h"
#include "cpu/kernels/paged_kernels.h"
#include "cpu/parallel_dynamic.h"
#include "paged_attention_checks.h"

namespace fastadapt::cpu {
namespace {

constexpr int64_t kPrefixTile = 64;   // queries of one prefix work unit
constexpr int64_t kMinSplitKeys = 256;  // never split a row into units of fewer keys
constexpr int64_t kUnitsPerThread = 8;
// below this many query x key x D multiply-adds a call runs on the calling thread alone
constexpr int64_t kMinParallelWork = 1 << 18;

struct Kernels {
  decltype(&paged_attn_partial_generic) partial;
  decltype(&paged_attn_scores_generic) scores;
  decltype(&paged_attn_merge_generic) merge;
  decltype(&merge_states_rows_generic) merge_states;
};

Kernels kernels() {
  if (active_isa() == Isa::AVX2)
    return {paged_attn_partial_avx2, paged_attn_scores_avx2, paged_attn_merge_avx2,
            merge_states_rows_avx2};
  return {paged_attn_partial_generic, paged_attn_scores_generic, paged_attn_merge_generic,
          merge_states_rows_generic};
}

KvDType kv_dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? KvDType::F16
         : t.scalar_type() == at::kBFloat16 ? KvDType::BF16 : KvDType::F32;
}

struct Group {
  int64_t row;      // page-table row
  int64_t q0, M;    // its queries: qidx[q0, q0 + M), lim[q0, q0 + M)
  int64_t t0, nt;   // its units: units[t0, t0 + nt)
};
struct Unit {
  int64_t group, k0, k1;
};

struct Plan {
  std::vector<Group> groups;
  std::vector<Unit> units;
  std::vector<int64_t> qidx;  // flat index of a query in [B * T_q * H_q]
  std::vector<int64_t> lim;   // its last visible key
};

// Cuts every group's keys into splits of about the same size.
void plan_splits(Plan& plan, const int32_t* lens) {
  int64_t total = 0;
  for (const auto& g : plan.groups) total += lens[g.row];
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunk = std::max<int64_t>(kMinSplitKeys, (total + kUnitsPerThread * threads - 1) /
                                                       (kUnitsPerThread * threads));
  chunk = (chunk + 31) / 32 * 32;
  for (int64_t gi = 0; gi < static_cast<int64_t>(plan.groups.size()); ++gi) {
    Group& g = plan.groups[gi];
    const int64_t n = lens[g.row];
    const int64_t ns = std::max<int64_t>(1, (n + chunk - 1) / chunk);
    const int64_t per = (n + ns - 1) / ns;
    g.t0 = static_cast<int64_t>(plan.units.size());
    g.nt = ns;
    for (int64_t s = 0; s < ns; ++s)
      plan.units.push_back({gi, std::min(n, s * per), std::min(n, (s + 1) * per)});
  }
}

// Runs a plan: out32 [B * T_q * H_q, D] and lse [B * T_q * H_q] fp32 (every query written).
void run_plan(const Plan& plan, const at::Tensor& q32, const at::Tensor& k_pages,
              const at::Tensor& v_pages, const int32_t* indptr, const int32_t* indices,
              const int32_t* lens, float scale, float* out32, float* lse,
              float* score_acc, bool serial_scores) {
  const Kernels K = kernels();
  const int64_t D = q32.size(-1);
  const int64_t P = k_pages.size(0), S = k_pages.size(1);
  (void)P;
  const float* qp = q32.data_ptr<float>();
  const int64_t nq = static_cast<int64_t>(plan.qidx.size());
  const int64_t ng = static_cast<int64_t>(plan.groups.size());
  const int64_t nu = static_cast<int64_t>(plan.units.size());
  PagedRow base;
  base.k_pages = k_pages.data_ptr();
  base.v_pages = v_pages.data_ptr();
  base.dtype = kv_dtype_of(k_pages);
  base.page_size = S;
  base.D = D;
  auto row_of = [&](int64_t r) {
    PagedRow row = base;
    row.pages = indices + indptr[r];
    row.n = lens[r];
    return row;
  };
  // the queries of every group, gathered and pre-scaled: qg [nq, D]
  // (serial: it is as small as q, and every parallel region costs a fork/join)
  std::vector<float> qg(static_cast<size_t>(nq * D));
  for (int64_t i = 0; i < nq; ++i) {
    const float* src = qp + plan.qidx[i] * D;
    float* dst = qg.data() + i * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
  }
  // partial states: unit u of group g at offsets (t - g.t0) * M within the group's block
  std::vector<int64_t> off(static_cast<size_t>(nu));
  int64_t tot = 0;
  for (const auto& g : plan.groups)
    for (int64_t t = 0; t < g.nt; ++t) {
      off[g.t0 + t] = tot;
      tot += g.M;
    }
  std::vector<float> acc(static_cast<size_t>(tot * D)), mx(static_cast<size_t>(tot)),
      sm(static_cast<size_t>(tot));
  // small problems run inline (no parallel region): fewer than kMinParallelWork query-keys
  int64_t work = 0;
  for (const auto& un : plan.units) work += (un.k1 - un.k0) * plan.groups[un.group].M;
  const int64_t unit_grain = work * D < kMinParallelWork ? std::max<int64_t>(nu, 1) : 1;
  // A group held by one unit knows its final LSE when the unit ends: its per-key mass is added
  // right away, while its keys are still in cache (not with shared pages: that pass is serial).
  const bool early_scores = score_acc != nullptr && !serial_scores;
  // units pulled dynamically: a slow core takes fewer (cpu/parallel_dynamic.h)
  parallel_chunks(nu, unit_grain, [&](int64_t a, int64_t b) {
    std::vector<float> lse_u;
    for (int64_t u = a; u < b; ++u) {
      const Unit& un = plan.units[u];
      const Group& g = plan.groups[un.group];
      float* m = mx.data() + off[u];
      float* l = sm.data() + off[u];
      K.partial(row_of(g.row), qg.data() + g.q0 * D, plan.lim.data() + g.q0, g.M, un.k0, un.k1,
                acc.data() + off[u] * D, m, l);
      if (early_scores && g.nt == 1) {
        lse_u.resize(static_cast<size_t>(g.M));
        for (int64_t i = 0; i < g.M; ++i)  // as the merge of one split computes it
          lse_u[i] = m[i] == -std::numeric_limits<float>::infinity() ? m[i] : m[i] + std::log(l[i]);
        K.scores(row_of(g.row), qg.data() + g.q0 * D, plan.lim.data() + g.q0, lse_u.data(), g.M,
                 un.k0, un.k1, score_acc);
      }
    }
  });
  // the merge reads tot * D floats, next to nothing beside the keys: parallel only when large
  at::parallel_for(0, ng, tot * D < (1 << 20) ? std::max<int64_t>(ng, 1) : 1, [&](int64_t a, int64_t b) {
    for (int64_t gi = a; gi < b; ++gi) {
      const Group& g = plan.groups[gi];
      const int64_t o = off[g.t0];
      K.merge(acc.data() + o * D, mx.data() + o, sm.data() + o, g.nt, g.M, D,
              plan.qidx.data() + g.q0, out32, lse);
    }
  });
  if (score_acc == nullptr) return;
  // the remaining units (groups split over several units) once every LSE is known
  std::vector<int64_t> late;
  for (int64_t u = 0; u < nu; ++u)
    if (!early_scores || plan.groups[plan.units[u].group].nt > 1) late.push_back(u);
  if (late.empty()) return;
  const int64_t nl = static_cast<int64_t>(late.size());
  std::vector<float> lse_g(static_cast<size_t>(nq));
  for (int64_t i = 0; i < nq; ++i) lse_g[i] = lse[plan.qidx[i]];
  // units of one row touch disjoint slots unless the page table shares pages
  at::parallel_for(0, nl, serial_scores ? nl : unit_grain, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const Unit& un = plan.units[late[i]];
      const Group& g = plan.groups[un.group];
      K.scores(row_of(g.row), qg.data() + g.q0 * D, plan.lim.data() + g.q0,
               lse_g.data() + g.q0, g.M, un.k0, un.k1, score_acc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> paged_decode_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
    const at::Tensor& page_indptr, const at::Tensor& page_indices, const at::Tensor& kv_lens,
    double scale, const std::optional<at::Tensor>& score_acc) {
  TORCH_CHECK(q.device().is_cpu(), "fastadapt::paged_decode_attention: this is the CPU kernel, "
              "q is on ", q.device());
  const PagedAttnShape s = check_paged_decode_args(q, k_pages, v_pages, page_indptr,
                                                   page_indices, kv_lens, score_acc);
  const bool f32 = q.scalar_type() == at::kFloat;
  at::Tensor out = at::empty({s.B, s.Tq, s.Hq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.Tq, s.Hq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q32 = q.to(at::kFloat).contiguous();
  at::Tensor out32 = f32 ? out : at::empty_like(out, out.options().dtype(at::kFloat));
  const at::Tensor ip = page_indptr.contiguous(), ix = page_indices.contiguous(),
                   ln = kv_lens.contiguous();
  const int32_t* lens = ln.data_ptr<int32_t>();
  Plan plan;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.Hkv; ++h) {
      const int64_t r = b * s.Hkv + h, n = lens[r];
      plan.groups.push_back({r, static_cast<int64_t>(plan.qidx.size()), s.Tq * s.G, 0, 0});
      for (int64_t t = 0; t < s.Tq; ++t)
        for (int64_t g = 0; g < s.G; ++g) {
          plan.qidx.push_back((b * s.Tq + t) * s.Hq + h * s.G + g);
          plan.lim.push_back(n - s.Tq + t);  // causal among the T_q new tokens
        }
    }
  plan_splits(plan, lens);
  run_plan(plan, q32, k_pages, v_pages, ip.data_ptr<int32_t>(), ix.data_ptr<int32_t>(), lens,
           static_cast<float>(scale), out32.data_ptr<float>(), lse.data_ptr<float>(),
           score_acc.has_value() ? score_acc->data_ptr<float>() : nullptr, s.shared_pages);
  if (!f32) out.copy_(out32);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> paged_prefix_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
    const at::Tensor& prefix_indptr, const at::Tensor& prefix_indices,
    const at::Tensor& prefix_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "fastadapt::paged_prefix_attention: this is the CPU kernel, "
              "q is on ", q.device());
  const PagedAttnShape s = check_paged_prefix_args(q, k_pages, v_pages, prefix_indptr,
                                                   prefix_indices, prefix_lens);
  const bool f32 = q.scalar_type() == at::kFloat;
  at::Tensor out = at::empty({s.B, s.Tq, s.Hq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.Tq, s.Hq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q32 = q.to(at::kFloat).contiguous();
  at::Tensor out32 = f32 ? out : at::empty_like(out, out.options().dtype(at::kFloat));
  const at::Tensor ip = prefix_indptr.contiguous(), ix = prefix_indices.contiguous(),
                   ln = prefix_lens.contiguous();
  const int32_t* lens = ln.data_ptr<int32_t>();
  // one row per KV head; its B * T_q * G queries in tiles, each a [tile, D] x [D, keys] product
  Plan plan;
  const int64_t nqh = s.B * s.Tq * s.G;
  for (int64_t h = 0; h < s.Hkv; ++h) {
    const int64_t n = lens[h];
    for (int64_t i0 = 0; i0 < nqh; i0 += kPrefixTile) {
      const int64_t m = std::min(kPrefixTile, nqh - i0);
      plan.groups.push_back({h, static_cast<int64_t>(plan.qidx.size()), m, 0, 0});
      for (int64_t i = i0; i < i0 + m; ++i) {
        const int64_t bt = i / s.G, g = i % s.G;  // bt = b * T_q + t
        plan.qidx.push_back(bt * s.Hq + h * s.G + g);
        plan.lim.push_back(n - 1);  // the prefix is fully visible to every query
      }
    }
  }
  plan_splits(plan, lens);
  run_plan(plan, q32, k_pages, v_pages, ip.data_ptr<int32_t>(), ix.data_ptr<int32_t>(), lens,
           static_cast<float>(scale), out32.data_ptr<float>(), lse.data_ptr<float>(), nullptr,
           false);
  if (!f32) out.copy_(out32);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& out_a,
                                                              const at::Tensor& lse_a,
                                                              const at::Tensor& out_b,
                                                              const at::Tensor& lse_b) {
  TORCH_CHECK(out_a.device().is_cpu(), "fastadapt::merge_attention_states: this is the CPU "
              "kernel, out_a is on ", out_a.device());
  const auto [rows, D] = check_merge_states_args(out_a, lse_a, out_b, lse_b);
  at::Tensor out = at::empty(out_a.sizes(), out_a.options());
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options());
  if (rows == 0) return {out, lse};
  const bool f32 = out_a.scalar_type() == at::kFloat;
  const at::Tensor a32 = out_a.to(at::kFloat).contiguous(), b32 = out_b.to(at::kFloat).contiguous();
  const at::Tensor la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor o32 = f32 ? out : at::empty(out_a.sizes(), a32.options());
  auto fn = kernels().merge_states;
  const float *pa = a32.data_ptr<float>(), *pb = b32.data_ptr<float>();
  const float *pla = la.data_ptr<float>(), *plb = lb.data_ptr<float>();
  float *po = o32.data_ptr<float>(), *pl = lse.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    fn(pa, pla, pb, plb, po, pl, D, r0, r1);
  });
  if (!f32) out.copy_(o32);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_cpu);
  m.impl("paged_prefix_attention", &paged_prefix_attention_cpu);
  m.impl("merge_attention_states", &merge_attention_states_cpu);
}

}  // namespace fastadapt::cpu
