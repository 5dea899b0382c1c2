// Torch-free CPU kernels of the confidence measures (fastadapt::logit_confidence,
// fastadapt::hidden_cosine), one build per ISA (confidence_generic.cpp, confidence_avx2.cpp) from
// one body (confidence_impl.h).
#pragma once
#include <cstdint>

namespace fastadapt::cpu {

// Running softmax statistics of a slice of one logits row (x already divided by the temperature):
//   m = max x, s = sum e^(x - m), t = sum e^(x - m) (x - m), i1 = first index of m,
//   v2 = the second largest value (counting a repeated maximum twice), -inf when none.
// Two states of disjoint slices merge exactly (confidence_merge), so a long row splits over threads.
struct ConfState {
  float m, s, t, v2;
  int64_t i1;
};

// dtype of the logits: 0 fp32, 1 fp16, 2 bf16.
#define FASTADAPT_CONFIDENCE_DECL(SUFFIX)                                                         \
  /* Statistics of x[v0 .. v1) (elements of `dtype`, contiguous), each scaled by inv_temp. */     \
  ConfState confidence_slice_##SUFFIX(const void* x, int dtype, int64_t v0, int64_t v1,           \
                                      float inv_temp);                                            \
  /* cos(a_r, b_r) for rows [r0, r1) of a, b [rows, H] (dtype as above, row stride H) -> out[r]. */\
  void hidden_cosine_rows_##SUFFIX(const void* a, const void* b, int dtype, int64_t H, int64_t r0, \
                                   int64_t r1, float eps, float* out);

FASTADAPT_CONFIDENCE_DECL(generic)
FASTADAPT_CONFIDENCE_DECL(avx2)
#undef FASTADAPT_CONFIDENCE_DECL

// Exact merge of the statistics of two disjoint slices, `lo` covering the lower indices.
ConfState confidence_merge(const ConfState& lo, const ConfState& hi);
// (top-1 probability, top-1 minus top-2 probability, entropy in nats) of a whole row's state.
void confidence_finish(const ConfState& st, float* p1, float* margin, float* entropy);

}  // namespace fastadapt::cpu
