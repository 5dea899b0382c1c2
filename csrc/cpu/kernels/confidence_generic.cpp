// Portable build of the confidence kernels (see confidence_impl.h), and the ISA-independent
// merge/finish of the running softmax statistics.
#define FASTADAPT_CONFIDENCE_SUFFIX generic
#include "cpu/kernels/confidence_impl.h"

namespace fastadapt::cpu {

ConfState confidence_merge(const ConfState& lo, const ConfState& hi) {
  const bool hi_wins = hi.m > lo.m;  // ties keep the lower index
  ConfState r;
  r.m = hi_wins ? hi.m : lo.m;
  r.i1 = hi_wins ? hi.i1 : lo.i1;
  r.v2 = std::max(std::max(lo.v2, hi.v2), hi_wins ? lo.m : hi.m);
  r.s = 0.f;
  r.t = 0.f;
  for (const ConfState* p : {&lo, &hi}) {
    if (p->s == 0.f) continue;  // an empty or all -inf slice adds nothing
    const float d = p->m - r.m;  // <= 0
    const float f = std::exp(d);
    r.s += p->s * f;
    r.t += (p->t + p->s * d) * f;
  }
  return r;
}

void confidence_finish(const ConfState& st, float* p1, float* margin, float* entropy) {
  const float inv = 1.f / st.s;
  *p1 = inv;
  *margin = (1.f - std::exp(st.v2 - st.m)) * inv;
  *entropy = std::max(0.f, std::log(st.s) - st.t * inv);  // rounding can dip below 0 at p1 ~ 1
}

}  // namespace fastadapt::cpu
