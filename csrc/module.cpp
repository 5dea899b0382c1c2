// The Python extension module. It exists so that importing it runs the TORCH_LIBRARY
// initialisers; tensors never cross pybind11. It also exposes build and CPU-path facts.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "cpu/kernels/isa.h"

namespace py = pybind11;
using fastadapt::cpu::Isa;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastadapt_ops native module (ops are registered under torch.ops.fastadapt)";
  m.attr("CUDA_MODE") = FASTADAPT_CUDA_MODE;
  m.attr("CUDA_ARCHS") = FASTADAPT_CUDA_ARCHS;
  m.def("cpu_isa", [] { return std::string(isa_name(fastadapt::cpu::active_isa())); },
        "The CPU kernel path in use (forced or best supported).");
  m.def("cpu_best_isa", [] { return std::string(isa_name(fastadapt::cpu::best_isa())); });
  m.def("cpu_features", &fastadapt::cpu::cpu_features);
  m.def("cpu_isa_available", [] {
    py::dict d;
    for (Isa isa : {Isa::GENERIC, Isa::AVX2, Isa::AVX512}) {
      d[isa_name(isa)] = py::make_tuple(fastadapt::cpu::isa_compiled(isa),
                                        fastadapt::cpu::isa_supported(isa));
    }
    return d;
  }, "{path: (compiled, supported on this CPU)}");
  m.def("force_cpu_isa", [](const std::string& name) {
    if (!fastadapt::cpu::force_isa(name))
      throw std::invalid_argument("fastadapt: CPU path '" + name +
                                  "' is unknown, not built, or not supported by this CPU");
  }, "Force a CPU kernel path ('generic', 'avx2', 'avx512') or 'auto'.");
}
