// The only pybind11 translation unit: raw pointers in, GIL released.
#include <pybind11/pybind11.h>

#include "nlsr/cpu_features.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "nlsr_fast torch-free C++ core";
  m.def("isa", [] { return nlsr::isa_name(nlsr::best_isa()); }, "The SIMD path picked at run time.");
}
