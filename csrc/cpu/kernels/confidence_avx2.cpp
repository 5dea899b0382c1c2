// AVX2 + FMA + F16C build of the confidence kernels (this TU alone gets the ISA flags; see
// confidence_impl.h).
#define FASTADAPT_CONFIDENCE_SUFFIX avx2
#include "cpu/kernels/confidence_impl.h"
