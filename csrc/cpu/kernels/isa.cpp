#include "cpu/kernels/isa.h"

#include <atomic>

namespace fastadapt::cpu {
namespace {
std::atomic<int> g_forced{-1};

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
}
}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::GENERIC: return "generic";
    case Isa::AVX2: return "avx2";
    case Isa::AVX512: return "avx512";
  }
  return "unknown";
}

// AVX-512 kernels are not built yet: the development and CI machines (AMD Zen 3) cannot run
// them, and a path nobody can test is not shipped. The enum keeps its place for them.
bool isa_compiled(Isa isa) { return isa == Isa::GENERIC || isa == Isa::AVX2; }

bool isa_supported(Isa isa) {
  if (!isa_compiled(isa)) return false;
  if (isa == Isa::AVX2) return cpu_has_avx2();
  return true;
}

Isa best_isa() {
  static const Isa best = isa_supported(Isa::AVX2) ? Isa::AVX2 : Isa::GENERIC;
  return best;
}

Isa active_isa() {
  int f = g_forced.load(std::memory_order_relaxed);
  return f < 0 ? best_isa() : static_cast<Isa>(f);
}

bool force_isa(const std::string& name) {
  if (name == "auto") {
    g_forced.store(-1);
    return true;
  }
  for (Isa isa : {Isa::GENERIC, Isa::AVX2, Isa::AVX512}) {
    if (name == isa_name(isa)) {
      if (!isa_supported(isa)) return false;
      g_forced.store(static_cast<int>(isa));
      return true;
    }
  }
  return false;
}

std::string cpu_features() {
  __builtin_cpu_init();
  std::string s;
  auto add = [&](const char* name, bool has) {
    if (has) s += s.empty() ? name : std::string(" ") + name;
  };
  add("avx2", __builtin_cpu_supports("avx2"));
  add("fma", __builtin_cpu_supports("fma"));
  add("f16c", __builtin_cpu_supports("f16c"));
  add("avx512f", __builtin_cpu_supports("avx512f"));
  add("avx512bw", __builtin_cpu_supports("avx512bw"));
  add("avx512vnni", __builtin_cpu_supports("avx512vnni"));
  add("avx512bf16", __builtin_cpu_supports("avx512bf16"));
  add("avxvnni", __builtin_cpu_supports("avxvnni"));
  return s;
}

}  // namespace fastadapt::cpu
