// Torch-free CPU kernels for the small ops between the big matmuls of a decoder layer.
#pragma once
#include <cstdint>

namespace fastadapt::cpu {

// RMSNorm of rows [r0, r1) of x [rows, D] (fp32, contiguous) into y; when residual is not null,
// residual += x first and the sum is normalised (the pre-norm residual stream of a decoder).
void rms_norm_rows_generic(const float* x, float* residual, const float* w, float* y, int64_t r0,
                           int64_t r1, int64_t D, float eps);
void rms_norm_rows_avx2(const float* x, float* residual, const float* w, float* y, int64_t r0,
                        int64_t r1, int64_t D, float eps);

}  // namespace fastadapt::cpu
