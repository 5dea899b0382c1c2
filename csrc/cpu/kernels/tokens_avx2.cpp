// AVX2 + FMA build of the token merging kernels (this TU alone gets -mavx2 -mfma; see
// tokens_impl.h).
#include "cpu/kernels/tokens_kernels.h"
#define FASTADAPT_TOKENS_SUFFIX avx2
#include "cpu/kernels/tokens_impl.h"
