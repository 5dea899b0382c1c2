// CUDA registration of fastadapt::kv_append and fastadapt::kv_compact (compiled only when torch
// has CUDA). Index contents are validated when FASTADAPT_CHECK_INDICES=1 (see paged_kv_checks.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/paged_kv_cuda.h"
#include "paged_kv_checks.h"

namespace fastadapt {
namespace {

void kv_append_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pages,
                    const at::Tensor& v_pages, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_pages.is_cuda(), "fastadapt::kv_append: this is the CUDA kernel, k_pages is on ",
              k_pages.device());
  const KvAppendShape s = check_kv_append_args(k, v, k_pages, v_pages, slot_mapping);
  if (s.N == 0 || s.H == 0) return;
  const c10::cuda::CUDAGuard guard(k_pages.device());
  auto in_pool_dtype = [](const at::Tensor& x, const at::Tensor& pool) {
    at::Tensor y = x.scalar_type() == pool.scalar_type() ? x : x.to(pool.scalar_type());
    return y.stride(2) == 1 ? y : y.contiguous();
  };
  const at::Tensor kc = in_pool_dtype(k, k_pages), vc = in_pool_dtype(v, v_pages);
  const at::Tensor slots = slot_mapping.contiguous();
  KvAppendCudaParams p;
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.k_sn = kc.stride(0);
  p.k_sh = kc.stride(1);
  p.v_sn = vc.stride(0);
  p.v_sh = vc.stride(1);
  p.slots = slots.data_ptr<int32_t>();
  p.N = s.N;
  p.H = s.H;
  p.D = s.D;
  p.k_pages = k_pages.data_ptr();
  p.v_pages = v_pages.data_ptr();
  p.k_esize = static_cast<int32_t>(k_pages.element_size());
  p.v_esize = static_cast<int32_t>(v_pages.element_size());
  const cudaError_t err = launch_kv_append(p, c10::cuda::getCurrentCUDAStream(k_pages.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastadapt::kv_append: CUDA launch failed: ", cudaGetErrorString(err));
}

void kv_compact_cuda(const at::Tensor& k_pages, const at::Tensor& v_pages,
                     const std::optional<at::Tensor>& scores, const at::Tensor& src_slots,
                     const at::Tensor& dst_slots) {
  TORCH_CHECK(k_pages.is_cuda(), "fastadapt::kv_compact: this is the CUDA kernel, k_pages is on ",
              k_pages.device());
  check_kv_compact_args(k_pages, v_pages, scores, src_slots, dst_slots);
  const int64_t M = src_slots.numel();
  if (M == 0) return;
  const c10::cuda::CUDAGuard guard(k_pages.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(k_pages.device().index());
  const at::Tensor src = src_slots.contiguous(), dst = dst_slots.contiguous();
  std::vector<at::Tensor> pools = {k_pages, v_pages};
  if (scores.has_value()) pools.push_back(*scores);
  std::vector<at::Tensor> tmps;
  for (const auto& pool : pools) {  // every read (gather) before any write (scatter)
    const int64_t width = pool.dim() == 3 ? pool.size(2) : 1;
    tmps.push_back(at::empty({M, width}, pool.options()));
    const cudaError_t err = launch_kv_rows_gather(pool.data_ptr(), src.data_ptr<int32_t>(), M, width,
                                                  static_cast<int32_t>(pool.element_size()),
                                                  tmps.back().data_ptr(), stream);
    TORCH_CHECK(err == cudaSuccess, "fastadapt::kv_compact: CUDA launch failed: ", cudaGetErrorString(err));
  }
  for (size_t i = 0; i < pools.size(); ++i) {
    const int64_t width = pools[i].dim() == 3 ? pools[i].size(2) : 1;
    const cudaError_t err = launch_kv_rows_scatter(pools[i].data_ptr(), dst.data_ptr<int32_t>(), M,
                                                   width, static_cast<int32_t>(pools[i].element_size()),
                                                   tmps[i].data_ptr(), stream);
    TORCH_CHECK(err == cudaSuccess, "fastadapt::kv_compact: CUDA launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("kv_append", &kv_append_cuda);
  m.impl("kv_compact", &kv_compact_cuda);
}

}  // namespace fastadapt
