// CPU implementation of fastadapt::kv_append and fastadapt::kv_compact: checks (slot contents
// included), dtype conversion of the new rows exactly as torch's .to, and row copies split over
// threads by the torch-free kernels of cpu/kernels/paged_kv_impl.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels/isa.h"
#include "cpu/kernels/paged_kernels.h"
#include "paged_kv_checks.h"

namespace fastadapt::cpu {
namespace {

void kv_append_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pages,
                   const at::Tensor& v_pages, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_pages.device().is_cpu(), "fastadapt::kv_append: this is the CPU kernel, k_pages "
              "is on ", k_pages.device());
  const KvAppendShape s = check_kv_append_args(k, v, k_pages, v_pages, slot_mapping);
  if (s.N == 0 || s.H == 0) return;
  // the new rows in each pool's dtype (a no-op view when they already match)
  auto in_pool_dtype = [](const at::Tensor& x, const at::Tensor& pool) {
    at::Tensor y = x.scalar_type() == pool.scalar_type() ? x : x.to(pool.scalar_type());
    return y.stride(2) == 1 ? y : y.contiguous();
  };
  const at::Tensor kc = in_pool_dtype(k, k_pages);
  const at::Tensor vc = in_pool_dtype(v, v_pages);
  const at::Tensor slots = slot_mapping.contiguous();
  KvAppendArgs a;
  a.k = static_cast<const char*>(kc.data_ptr());
  a.v = static_cast<const char*>(vc.data_ptr());
  a.k_sn = kc.stride(0) * kc.element_size();
  a.k_sh = kc.stride(1) * kc.element_size();
  a.v_sn = vc.stride(0) * vc.element_size();
  a.v_sh = vc.stride(1) * vc.element_size();
  a.slots = slots.data_ptr<int32_t>();
  a.H = s.H;
  a.k_pages = static_cast<char*>(k_pages.data_ptr());
  a.v_pages = static_cast<char*>(v_pages.data_ptr());
  a.k_row_bytes = s.D * k_pages.element_size();
  a.v_row_bytes = s.D * v_pages.element_size();
  auto fn = active_isa() == Isa::AVX2 ? kv_append_rows_avx2 : kv_append_rows_generic;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.H * (a.k_row_bytes + a.v_row_bytes)));
  at::parallel_for(0, s.N, grain, [&](int64_t n0, int64_t n1) { fn(a, n0, n1); });
}

void kv_compact_cpu(const at::Tensor& k_pages, const at::Tensor& v_pages,
                    const std::optional<at::Tensor>& scores, const at::Tensor& src_slots,
                    const at::Tensor& dst_slots) {
  TORCH_CHECK(k_pages.device().is_cpu(), "fastadapt::kv_compact: this is the CPU kernel, k_pages "
              "is on ", k_pages.device());
  check_kv_compact_args(k_pages, v_pages, scores, src_slots, dst_slots);
  const int64_t M = src_slots.numel();
  if (M == 0) return;
  const at::Tensor src = src_slots.contiguous(), dst = dst_slots.contiguous();
  const int32_t* ps = src.data_ptr<int32_t>();
  const int32_t* pd = dst.data_ptr<int32_t>();
  const bool avx2 = active_isa() == Isa::AVX2;
  auto gather = avx2 ? kv_gather_rows_avx2 : kv_gather_rows_generic;
  auto scatter = avx2 ? kv_scatter_rows_avx2 : kv_scatter_rows_generic;
  // every pool's kept tokens into a small temporary first (all reads before any write) ...
  std::vector<at::Tensor> pools = {k_pages, v_pages};
  if (scores.has_value()) pools.push_back(*scores);
  std::vector<at::Tensor> tmps;
  std::vector<int64_t> row_bytes;
  for (const auto& pool : pools) {
    const int64_t rb = (pool.dim() == 3 ? pool.size(2) : 1) * pool.element_size();
    row_bytes.push_back(rb);
    tmps.push_back(at::empty({M * rb}, pool.options().dtype(at::kByte)));
  }
  for (size_t i = 0; i < pools.size(); ++i) {
    const char* base = static_cast<const char*>(pools[i].data_ptr());
    char* t = static_cast<char*>(tmps[i].data_ptr());
    const int64_t rb = row_bytes[i];
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / rb),
                     [&](int64_t i0, int64_t i1) { gather(base, rb, ps, i0, i1, t); });
  }
  // ... then scattered to the destinations
  for (size_t i = 0; i < pools.size(); ++i) {
    char* base = static_cast<char*>(pools[i].data_ptr());
    const char* t = static_cast<const char*>(tmps[i].data_ptr());
    const int64_t rb = row_bytes[i];
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / rb),
                     [&](int64_t i0, int64_t i1) { scatter(base, rb, pd, i0, i1, t); });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CPU, m) {
  m.impl("kv_append", &kv_append_cpu);
  m.impl("kv_compact", &kv_compact_cpu);
}

}  // namespace fastadapt::cpu
