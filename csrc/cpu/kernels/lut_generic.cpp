// Portable build of the lut_linear kernels (see lut_impl.h).
#include "cpu/kernels/lut_impl.h"

namespace fastadapt::cpu {
void lut_prepare_generic(const LutProblem& p, int64_t m0, int64_t m1) { lut_prepare_impl_scalar(p, m0, m1); }
void lut_gemv_generic(const LutProblem& p, int64_t rb0, int64_t rb1) { lut_gemv_impl_scalar(p, rb0, rb1); }
}  // namespace fastadapt::cpu
