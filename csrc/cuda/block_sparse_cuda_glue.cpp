// CUDA registration of fastadapt::block_sparse_attention, vertical_slash_scores and
// block_pool_scores (compiled only when torch has CUDA). The small indptrs are copied to the host
// to build the row table (one sync per call: this is a prefill op); layout contents are checked
// on host copies when FASTADAPT_VALIDATE_INDICES=1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <vector>

#include "block_sparse_checks.h"
#include "cuda/block_sparse_cuda.h"

namespace fastadapt {
namespace {

BsCudaDType bs_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? BsCudaDType::F16
         : t.scalar_type() == at::kBFloat16 ? BsCudaDType::BF16 : BsCudaDType::F32;
}

bool validate_indices() {
  const char* e = std::getenv("FASTADAPT_VALIDATE_INDICES");
  return e && e[0] == '1';
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const std::optional<at::Tensor>& q_indptr,
    const std::optional<at::Tensor>& k_indptr, const std::optional<at::Tensor>& col_indptr,
    const std::optional<at::Tensor>& cols, const std::optional<at::Tensor>& diag_indptr,
    const std::optional<at::Tensor>& diags, std::optional<double> scale) {
  constexpr const char* op = "fastadapt::block_sparse_attention";
  check_bs_qkv(op, q, k, &v);
  TORCH_CHECK(q.is_cuda(), op, ": this is the CUDA kernel, q is on ", q.device());
  const BsLayoutHost L = check_bs_layout_shapes(op, q, k, row_ptr, col_idx, q_indptr, k_indptr,
                                                col_indptr, cols, diag_indptr, diags);
  const int64_t Hq = q.size(1), D = q.size(2), Nq = q.size(0);
  TORCH_CHECK(block_sparse_cuda_supports_d(D), op, ": the CUDA kernel supports D in {64, 128}, got ", D);
  if (validate_indices())
    check_bs_layout_contents(op, L, Hq, row_ptr, col_idx, col_indptr, cols, diag_indptr, diags);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({Nq, Hq, D}, q.options());
  at::Tensor lse = at::empty({Nq, Hq}, q.options().dtype(at::kFloat));
  if (Nq == 0) return {out, lse};
  std::vector<int32_t> rows;  // BsCudaRow as 4 ints
  int64_t max_nkb = 1;
  for (int64_t b = 0; b < L.B; ++b) {
    const int64_t T = L.q_indptr[b + 1] - L.q_indptr[b], Tk = L.k_indptr[b + 1] - L.k_indptr[b];
    const int64_t nqb = (T + kBsBlockSize - 1) / kBsBlockSize;
    max_nkb = std::max(max_nkb, (Tk + kBsBlockSize - 1) / kBsBlockSize);
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t r = 0; r < nqb; ++r) {
        rows.push_back(static_cast<int32_t>(b));
        rows.push_back(static_cast<int32_t>(h));
        rows.push_back(static_cast<int32_t>(r));
        rows.push_back(static_cast<int32_t>(L.row_base[b] + h * nqb + r));
      }
  }
  const auto iopt = at::TensorOptions().dtype(at::kInt);
  const at::Tensor rows_d = at::tensor(rows, iopt).to(q.device());
  const at::Tensor qi = at::tensor(L.q_indptr, iopt).to(q.device());
  const at::Tensor ki = at::tensor(L.k_indptr, iopt).to(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  std::optional<at::Tensor> cp, cc, dp, dd;
  if (col_indptr.has_value()) { cp = col_indptr->contiguous(); cc = cols->contiguous(); }
  if (diag_indptr.has_value()) { dp = diag_indptr->contiguous(); dd = diags->contiguous(); }
  BsCudaParams p;
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dtype = bs_dtype(q);
  p.Hq = Hq;
  p.Hkv = k.size(1);
  p.D = D;
  p.scale = static_cast<float>(bs_scale(scale, D));
  p.q_indptr = qi.data_ptr<int32_t>();
  p.k_indptr = ki.data_ptr<int32_t>();
  p.row_ptr = rp.data_ptr<int32_t>();
  p.col_idx = ci.data_ptr<int32_t>();
  p.col_indptr = cp ? cp->data_ptr<int32_t>() : nullptr;
  p.cols = cc ? cc->data_ptr<int32_t>() : nullptr;
  p.diag_indptr = dp ? dp->data_ptr<int32_t>() : nullptr;
  p.diags = dd ? dd->data_ptr<int32_t>() : nullptr;
  p.rows = reinterpret_cast<const BsCudaRow*>(rows_d.data_ptr<int32_t>());
  p.nrows = static_cast<int64_t>(rows.size() / 4);
  p.max_nkb = max_nkb;
  const cudaError_t err = launch_block_sparse_attention(p, c10::cuda::getCurrentCUDAStream(q.device().index()));
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> vertical_slash_scores_cuda(const at::Tensor& q, const at::Tensor& k,
                                                              int64_t last_q, std::optional<double> scale) {
  constexpr const char* op = "fastadapt::vertical_slash_scores";
  check_bs_qkv(op, q, k, nullptr);
  TORCH_CHECK(q.is_cuda(), op, ": this is the CUDA kernel, q is on ", q.device());
  TORCH_CHECK(last_q >= 1 && last_q <= kBsBlockSize, op, ": last_q must be in [1, 64], got ", last_q);
  TORCH_CHECK(q.size(2) <= 256, op, ": the CUDA kernel supports D <= 256, got ", q.size(2));
  const int64_t T = q.size(0), Tk = k.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(Tk >= T, op, ": k must hold at least q's ", T, " tokens (queries are the last keys), got ", Tk);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor vert = at::zeros({Hq, Tk}, q.options().dtype(at::kFloat));
  at::Tensor slash = at::zeros({Hq, Tk}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({Hq, kBsBlockSize}, q.options().dtype(at::kFloat));
  const at::Tensor qc = q.contiguous(), kc = k.contiguous();
  VsCudaParams p;
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.dtype = bs_dtype(q);
  p.T = T;
  p.Tk = Tk;
  p.Hq = Hq;
  p.Hkv = k.size(1);
  p.D = D;
  p.n_last = last_q;
  p.scale = static_cast<float>(bs_scale(scale, D));
  p.vert = vert.data_ptr<float>();
  p.slash = slash.data_ptr<float>();
  p.lse_buf = lse.data_ptr<float>();
  const cudaError_t err = launch_vertical_slash_scores(p, c10::cuda::getCurrentCUDAStream(q.device().index()));
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {vert, slash};
}

at::Tensor block_pool_scores_cuda(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale) {
  constexpr const char* op = "fastadapt::block_pool_scores";
  check_bs_qkv(op, q, k, nullptr);
  TORCH_CHECK(q.is_cuda(), op, ": this is the CUDA kernel, q is on ", q.device());
  const int64_t T = q.size(0), Tk = k.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK(Tk >= T, op, ": k must hold at least q's ", T, " tokens (queries are the last keys), got ", Tk);
  const int64_t nqb = (T + kBsBlockSize - 1) / kBsBlockSize, nkb = (Tk + kBsBlockSize - 1) / kBsBlockSize;
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor scores = at::empty({Hq, nqb, nkb}, q.options().dtype(at::kFloat));
  at::Tensor scratch = at::empty({(Hq * nqb + Hkv * nkb) * D}, q.options().dtype(at::kFloat));
  const at::Tensor qc = q.contiguous(), kc = k.contiguous();
  BpCudaParams p;
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.dtype = bs_dtype(q);
  p.T = T;
  p.Tk = Tk;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.scale = static_cast<float>(bs_scale(scale, D));
  p.scores = scores.data_ptr<float>();
  p.scratch = scratch.data_ptr<float>();
  const cudaError_t err = launch_block_pool_scores(p, c10::cuda::getCurrentCUDAStream(q.device().index()));
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_cuda);
  m.impl("vertical_slash_scores", &vertical_slash_scores_cuda);
  m.impl("block_pool_scores", &block_pool_scores_cuda);
}

}  // namespace fastadapt
