// Portable build of the MoE kernels (see moe_impl.h), and the ISA-independent grouping.
#define FASTADAPT_MOE_SUFFIX generic
#include "cpu/kernels/moe_impl.h"

namespace fastadapt::cpu {

void moe_group_rows(const int32_t* topk_ids, const float* topk_w, int64_t T, int64_t k, int64_t E,
                    int32_t* token_ids, float* row_w, int32_t* offsets, int32_t* rows) {
  for (int64_t e = 0; e <= E; ++e) offsets[e] = 0;
  for (int64_t i = 0; i < T * k; ++i)
    if (topk_ids[i] < E) ++offsets[topk_ids[i] + 1];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  for (int64_t i = offsets[E]; i < T * k; ++i) {
    token_ids[i] = -1;
    row_w[i] = 0.f;
  }
  // cursor per expert: reuse rows' final positions by walking tokens in order (stable)
  for (int64_t e = E; e > 0; --e) offsets[e] = offsets[e - 1];
  offsets[0] = 0;  // offsets[e + 1] now is expert e's cursor (starts at its segment begin)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = topk_ids[t * k + j];
      if (e >= E) {
        rows[t * k + j] = -1;  // null expert: no row, no work
        continue;
      }
      const int32_t r = offsets[e + 1]++;
      token_ids[r] = static_cast<int32_t>(t);
      row_w[r] = topk_w[t * k + j];
      rows[t * k + j] = r;
    }
  }
}

}  // namespace fastadapt::cpu
