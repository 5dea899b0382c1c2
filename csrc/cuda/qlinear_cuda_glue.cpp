// Torch glue of fastadapt::qlinear for the CUDA dispatch key: argument checks (each error names
// the op and the argument), dtype codes, device guard and stream lookup. The kernels
// (qlinear.cu) know no torch. Compiled only when torch has CUDA (CMake LINK mode).
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cuBLAS headers this toolkit lacks.
//
// Path switch for tests and benchmarks: FASTADAPT_QLINEAR_CUDA_PATH = auto (default) | gemv |
// gemm, read on every call (a getenv, negligible next to a launch).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cuda/qlinear_cuda.h"
#include "qlinear_checks.h"

namespace fastadapt {
namespace {

QLinearDType dtype_code(at::ScalarType t) {
  return t == at::kHalf ? QLinearDType::F16 : t == at::kBFloat16 ? QLinearDType::BF16 : QLinearDType::F32;
}

QLinearPath path_from_env() {
  const char* v = std::getenv("FASTADAPT_QLINEAR_CUDA_PATH");
  if (v == nullptr || *v == '\0') return QLinearPath::AUTO;
  const std::string s(v);
  if (s == "auto") return QLinearPath::AUTO;
  if (s == "gemv") return QLinearPath::GEMV;
  if (s == "gemm") return QLinearPath::GEMM;
  TORCH_CHECK(false, "fastadapt::qlinear: FASTADAPT_QLINEAR_CUDA_PATH must be auto, gemv or gemm, got '",
              s, "'");
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The launcher params plus the tensors they point into (kept alive until the launch).
struct Prepared {
  QLinearCudaParams p;
  at::Tensor x2d;   // [M, K] contiguous, 16-byte aligned: x itself, or a copy when it is not
  at::Tensor bias;  // [N] contiguous, float32 / float16 / bfloat16
  std::vector<int64_t> out_shape;
};

// Shared checks (qlinear_checks.h: formats, shapes, group size, devices relative to x) plus
// what the CUDA kernels need: x on a CUDA device in fp16 / bf16 / fp32, 16-byte aligned qdata.
Prepared prepare(const at::Tensor& x, const at::Tensor& qdata,
                 const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& zeros,
                 const std::optional<at::Tensor>& bias, c10::string_view fmt,
                 int64_t in_features, int64_t group_size, c10::string_view act_quant) {
  TORCH_CHECK(x.is_cuda(), "fastadapt::qlinear: this is the CUDA kernel, x is on ", x.device());
  // act_quant = "int8" is accepted and runs the exact kernel (no int8-activation CUDA kernel
  // yet); the result is at least as accurate as the quantized path's.
  const QLinearShape s = check_qlinear_args(x, qdata, scales, zeros, bias, std::string(fmt),
                                            in_features, group_size, std::string(act_quant));
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kFloat,
              "fastadapt::qlinear: x must be float16, bfloat16 or float32 on CUDA, got ",
              x.scalar_type());
  TORCH_CHECK(qdata.numel() == 0 || aligned16(qdata.data_ptr()),
              "fastadapt::qlinear: qdata must be 16-byte aligned on CUDA (a view at an odd offset "
              "is not; pass a tensor that owns its storage)");

  Prepared r;
  QLinearCudaParams& p = r.p;
  p.qdata = static_cast<const uint8_t*>(qdata.data_ptr());
  p.fmt = s.fmt;
  p.group_size = s.group_size;  // the block size for GGUF formats, unused there
  if (!is_gguf(s.fmt)) {
    p.scales = scales->data_ptr();
    p.scale_type = scale_type_of(*scales);
    p.zeros = zeros.has_value() ? static_cast<const uint8_t*>(zeros->data_ptr()) : nullptr;
  }
  if (bias.has_value()) {
    const at::ScalarType bt = bias->scalar_type();
    const bool native = bt == at::kFloat || bt == at::kHalf || bt == at::kBFloat16;
    r.bias = native ? bias->contiguous() : bias->to(at::kFloat).contiguous();  // e.g. float64
    p.bias = r.bias.data_ptr();
    p.bias_dtype = dtype_code(r.bias.scalar_type());
  }

  // x as [M, K], contiguous and 16-byte aligned (the kernels use 128-bit loads). A view for the
  // usual contiguous input; a copy only for strided or oddly offset views.
  r.x2d = x.reshape({s.M, s.K});
  if (!r.x2d.is_contiguous()) r.x2d = r.x2d.contiguous();
  if (r.x2d.numel() > 0 && !aligned16(r.x2d.data_ptr()))
    r.x2d = r.x2d.clone(at::MemoryFormat::Contiguous);

  p.M = s.M;
  p.N = s.N;
  p.K = s.K;
  p.x_row_stride = s.K;
  p.out_row_stride = s.N;
  p.act_dtype = dtype_code(x.scalar_type());
  p.path = path_from_env();
  r.out_shape = qlinear_out_shape(x, s.N);
  return r;
}

void run(Prepared& r, at::Tensor& out) {
  QLinearCudaParams& p = r.p;
  if (p.M == 0 || p.N == 0) return;
  p.x = r.x2d.data_ptr();
  p.out = out.data_ptr();
  const c10::cuda::CUDAGuard guard(r.x2d.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(r.x2d.device().index()).stream();
  const cudaError_t err = launch_qlinear(p, stream);
  TORCH_CHECK(err == cudaSuccess, "fastadapt::qlinear: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

at::Tensor qlinear_cuda(const at::Tensor& x, const at::Tensor& qdata,
                        const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& zeros,
                        const std::optional<at::Tensor>& bias, c10::string_view fmt,
                        int64_t in_features, int64_t group_size, c10::string_view act_quant) {
  Prepared r = prepare(x, qdata, scales, zeros, bias, fmt, in_features, group_size, act_quant);
  at::Tensor out = at::empty(r.out_shape, x.options());
  run(r, out);
  return out;
}

void qlinear_out_cuda(const at::Tensor& x, const at::Tensor& qdata,
                             const std::optional<at::Tensor>& scales,
                             const std::optional<at::Tensor>& zeros,
                             const std::optional<at::Tensor>& bias, c10::string_view fmt,
                             int64_t in_features, int64_t group_size, c10::string_view act_quant,
                     at::Tensor& out) {
  Prepared r = prepare(x, qdata, scales, zeros, bias, fmt, in_features, group_size, act_quant);
  check_qlinear_out(out, x, r.p.N);
  // The kernels read x and bias while writing out: they must not share memory.
  const auto overlaps = [&](const at::Tensor& t) {
    const at::MemOverlapStatus st = at::get_overlap_status(out, t);
    return st == at::MemOverlapStatus::Full || st == at::MemOverlapStatus::Partial;
  };
  TORCH_CHECK(!overlaps(r.x2d), "fastadapt::qlinear: out must not overlap x");
  TORCH_CHECK(!r.bias.defined() || !overlaps(r.bias), "fastadapt::qlinear: out must not overlap bias");
  run(r, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapt, CUDA, m) {
  m.impl("qlinear", &qlinear_cuda);
  m.impl("qlinear.out", &qlinear_out_cuda);
}

}  // namespace fastadapt
