// Portable build of the RMSNorm kernel (see rms_norm_impl.h).
#include "cpu/kernels/elementwise_kernels.h"
#include "cpu/kernels/rms_norm_impl.h"

namespace fastadapt::cpu {
void rms_norm_rows_generic(const float* x, float* residual, const float* w, float* y, int64_t r0,
                           int64_t r1, int64_t D, float eps) {
  rms_norm_rows_impl(x, residual, w, y, r0, r1, D, eps);
}
}  // namespace fastadapt::cpu
