// AVX2 + FMA build of the MoE kernels (this TU alone gets -mavx2 -mfma; see moe_impl.h).
#define FASTADAPT_MOE_SUFFIX avx2
#include "cpu/kernels/moe_impl.h"
