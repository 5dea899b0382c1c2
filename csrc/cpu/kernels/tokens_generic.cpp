// Portable build of the token merging kernels (see tokens_impl.h).
#include "cpu/kernels/tokens_kernels.h"
#define FASTADAPT_TOKENS_SUFFIX generic
#include "cpu/kernels/tokens_impl.h"
