// Portable build of the RoPE and SwiGLU kernels: the scalar bodies of rope_swiglu_impl.h.
#include "cpu/kernels/rope_swiglu_impl.h"

namespace fastadapt::cpu {

void rope_rows_generic(const RopeProblem& p, int64_t r0, int64_t r1) {
  dispatch_elem(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_rows_drive<T>(p, r0, r1, [&](T* x, const float* cs) {
      rope_row_scalar(x, cs, p.D, p.interleaved, 0);
    });
  });
}

void silu_mul_rows_generic(const SiluMulProblem& p, int64_t r0, int64_t r1) {
  dispatch_elem(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    for (int64_t r = r0; r < r1; ++r) silu_mul_row_scalar(x + r * p.x_stride, y + r * p.F, p.F, 0);
  });
}

}  // namespace fastadapt::cpu
