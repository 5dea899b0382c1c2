// CPU instruction-set paths, detected at run time, with a switch that forces one (for tests).
// Torch-free.
#pragma once
#include <string>

namespace fastadapt::cpu {

enum class Isa : int { GENERIC = 0, AVX2 = 1, AVX512 = 2 };

const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);   // a kernel for this path is built into the library
bool isa_supported(Isa isa);  // compiled and this CPU can run it
Isa best_isa();               // fastest supported path
Isa active_isa();             // the forced path, else best_isa()
// Force a path by name ("generic", "avx2", "avx512") or "auto". Returns false (and changes
// nothing) when the path is unknown, not compiled or not supported by this CPU.
bool force_isa(const std::string& name);
std::string cpu_features();   // a readable list of the features that matter here

}  // namespace fastadapt::cpu
