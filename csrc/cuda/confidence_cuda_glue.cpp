// CUDA registration of fastadapt::logit_confidence and fastadapt::hidden_cosine (compiled only
// when torch has CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "confidence_checks.h"
#include "cuda/confidence_cuda.h"

namespace fastadapt {
namespace {

ConfDType conf_dtype(at::ScalarType t) {
  return t == at::kHalf ? ConfDType::F16 : t == at::kBFloat16 ? ConfDType::BF16 : ConfDType::F32;
}

std::tuple<at::Tensor, at::Tensor> logit_confidence_cuda(const at::Tensor& logits, double temperature) {
  const auto [B, V] = check_logit_confidence_args(logits, temperature);
  TORCH_CHECK(logits.is_cuda(), "fastadapt::logit_confidence: this is the CUDA kernel, logits is on ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor stats = at::empty({B, 3}, x.options().dtype(at::kFloat));
  at::Tensor argmax = at::empty({B}, x.options().dtype(at::kLong));
  LogitConfidenceCudaParams p;
  p.logits = x.data_ptr();
  p.stats = stats.data_ptr<float>();
  p.argmax = argmax.data_ptr<int64_t>();
  p.B = B;
  p.V = V;
  p.inv_temp = static_cast<float>(1.0 / temperature);
  p.dtype = conf_dtype(x.scalar_type());
  const cudaError_t err = launch_logit_confidence(p, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastadapt::logit_confidence: CUDA launch failed: ", cudaGetErrorString(err));
  return {stats, argmax};
}

at::Tensor hidden_cosine_cuda(const at::Tensor& a, const at::Tensor& b, double eps) {
  const auto [rows, H] = check_hidden_cosine_args(a, b, eps);
  TORCH_CHECK(a.is_cuda(), "fastadapt::hidden_cosine: this is the CUDA kernel, a is on ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end() - 1);
  at::Tensor out = at::empty(shape, a.options().dtype(at::kFloat));
  HiddenCosineCudaParams p;
  p.a = ac.data_ptr();
  p.b = bc.data_ptr();
  p.out = out.data_ptr<float>();
  p.rows = rows;
  p.H = H;
  p.eps = static_cast<float>(eps);
  p.dtype = conf_dtype(a.scalar_type());
  const cudaError_t err = launch_hidden_cosine(p, c10::cuda::getCurrentCUDAStream(a.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastadapt::hidden_cosine: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("logit_confidence", &logit_confidence_cuda);
  m.impl("hidden_cosine", &hidden_cosine_cuda);
}

}  // namespace fastadapt
