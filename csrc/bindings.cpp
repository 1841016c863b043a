// The only pybind11 translation unit: raw pointers in, GIL released.
//
// Every entry point takes tensors as integer addresses (tensor.data_ptr()) with a dtype code each
// (0 = float32, 1 = float16, 2 = bfloat16; nlsr_fast/ops/_cpu.py), outputs first, then inputs, then sizes.
// The Python adapters make the buffers contiguous and the public functions validate shapes (CONTRIBUTING.md rule S3), so the
// bindings only cast.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <tuple>

#include "nlsr/cpu_features.h"
#include "nlsr/extrapolate.h"
#include "nlsr/finite.h"
#include "nlsr/lora_masked_cosine.h"
#include "nlsr/masked_delta_cosine.h"
#include "nlsr/masked_restore.h"
#include "nlsr/masked_values.h"
#include "nlsr/matrix_topk_mask.h"
#include "nlsr/parallel.h"
#include "nlsr/random_row_mask.h"
#include "nlsr/row_topk_mask.h"

namespace py = pybind11;

namespace {

using ptr = std::uintptr_t;
using Sums = std::tuple<double, double, double>;

template <class T>
T* as(ptr p) {
  return reinterpret_cast<T*>(p);
}

nlsr::DType dt(int code) { return static_cast<nlsr::DType>(code); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nlsr_fast torch-free C++ core";
  m.def("isa", [] { return nlsr::isa_name(nlsr::best_isa()); }, "The SIMD path picked at run time.");
  m.def("num_threads", &nlsr::max_threads, "OpenMP threads the kernels use.");

  m.def(
      "extrapolate",
      [](ptr out, int out_dtype, ptr aligned, int aligned_dtype, ptr base, int base_dtype, int64_t n, double alpha) {
        nlsr::extrapolate(as<void>(out), dt(out_dtype), as<const void>(aligned), dt(aligned_dtype),
                          as<const void>(base), dt(base_dtype), n, alpha);
      },
      py::arg("out"), py::arg("out_dtype"), py::arg("aligned"), py::arg("aligned_dtype"), py::arg("base"),
      py::arg("base_dtype"), py::arg("n"), py::arg("alpha"), py::call_guard<py::gil_scoped_release>(),
      "out = fp32(1 + alpha) * aligned - fp32(alpha) * base, fp32 math, one cast.");

  m.def(
      "masked_restore",
      [](ptr out, ptr target, int target_dtype, ptr source, int source_dtype, ptr mask, int64_t rows, int64_t cols) {
        nlsr::masked_restore(as<void>(out), as<const void>(target), dt(target_dtype), as<const void>(source),
                             dt(source_dtype), as<const uint8_t>(mask), rows, cols);
      },
      py::arg("out"), py::arg("target"), py::arg("target_dtype"), py::arg("source"), py::arg("source_dtype"),
      py::arg("mask"), py::arg("rows"), py::arg("cols"), py::call_guard<py::gil_scoped_release>(),
      "out = where(mask, source cast to target's dtype, target), bit-exact.");

  m.def(
      "masked_delta_cosine",
      [](ptr t, int t_dtype, ptr e, int e_dtype, ptr base, int base_dtype, ptr mask, int64_t rows,
         int64_t cols) -> Sums {
        double s[3];
        nlsr::masked_delta_cosine(s, as<const void>(t), dt(t_dtype), as<const void>(e), dt(e_dtype),
                                  as<const void>(base), dt(base_dtype), as<const uint8_t>(mask), rows, cols);
        return {s[0], s[1], s[2]};
      },
      py::arg("t"), py::arg("t_dtype"), py::arg("e"), py::arg("e_dtype"), py::arg("base"), py::arg("base_dtype"),
      py::arg("mask"), py::arg("rows"), py::arg("cols"), py::call_guard<py::gil_scoped_release>(),
      "(sum m*a*b, sum m*a^2, sum m*b^2) with a = t - base, b = e - base (base = 0: none), fp64 sums.");

  m.def(
      "lora_masked_cosine",
      [](ptr a_t, int a_t_dtype, ptr a_e, int a_e_dtype, ptr b_t, int b_t_dtype, ptr b_e, int b_e_dtype, ptr mask_a,
         ptr mask_b, int64_t r, int64_t d_in, int64_t d_out, float e_scale) -> Sums {
        double s[3];
        nlsr::lora_masked_cosine(s, as<const void>(a_t), dt(a_t_dtype), as<const void>(a_e), dt(a_e_dtype),
                                 as<const void>(b_t), dt(b_t_dtype), as<const void>(b_e), dt(b_e_dtype),
                                 as<const uint8_t>(mask_a), as<const uint8_t>(mask_b), r, d_in, d_out, e_scale);
        return {s[0], s[1], s[2]};
      },
      py::arg("a_t"), py::arg("a_t_dtype"), py::arg("a_e"), py::arg("a_e_dtype"), py::arg("b_t"),
      py::arg("b_t_dtype"), py::arg("b_e"), py::arg("b_e_dtype"), py::arg("mask_a"), py::arg("mask_b"), py::arg("r"),
      py::arg("d_in"), py::arg("d_out"), py::arg("e_scale"), py::call_guard<py::gil_scoped_release>(),
      "(<W_t, W_e>_F, |W_t|_F^2, |W_e|_F^2) of W_x = (M_B*B_x)(M_A*A_x), the reference's factors times e_scale, "
      "through r x r Grams, fp64 sums.");

  m.def(
      "row_topk_mask",
      [](ptr bits, ptr weight, int weight_dtype, ptr col_scale, ptr grad, int grad_dtype, int64_t rows, int64_t cols,
         int64_t k) {
        nlsr::row_topk_mask(as<uint8_t>(bits), as<const void>(weight), dt(weight_dtype), as<const float>(col_scale),
                            as<const void>(grad), dt(grad_dtype), rows, cols, k);
      },
      py::arg("bits"), py::arg("weight"), py::arg("weight_dtype"), py::arg("col_scale"), py::arg("grad"),
      py::arg("grad_dtype"), py::arg("rows"), py::arg("cols"), py::arg("k"),
      py::call_guard<py::gil_scoped_release>(),
      "PackedMask bits of the k highest (|W| * col_scale[j]) * grad[i, j] per row (col_scale fp32, 0: none).");

  m.def(
      "matrix_topk_mask",
      [](ptr bits, ptr x, int x_dtype, int64_t rows, int64_t cols, int64_t k) {
        nlsr::matrix_topk_mask(as<uint8_t>(bits), as<const void>(x), dt(x_dtype), rows, cols, k);
      },
      py::arg("bits"), py::arg("x"), py::arg("x_dtype"), py::arg("rows"), py::arg("cols"), py::arg("k"),
      py::call_guard<py::gil_scoped_release>(), "PackedMask bits of the k largest |x| of the whole matrix.");

  m.def(
      "random_row_mask",
      [](ptr bits, int64_t rows, int64_t cols, int64_t k, uint32_t stream) {
        nlsr::random_row_mask(as<uint8_t>(bits), rows, cols, k, stream);
      },
      py::arg("bits"), py::arg("rows"), py::arg("cols"), py::arg("k"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "PackedMask bits of a uniformly random k-subset of each row, counter-based (Floyd's algorithm) from stream.");

  m.def(
      "masked_gather",
      [](ptr values, ptr src, int64_t elem_bytes, ptr mask, int64_t rows, int64_t cols) {
        nlsr::masked_gather(as<void>(values), as<const void>(src), elem_bytes, as<const uint8_t>(mask), rows, cols);
      },
      py::arg("values"), py::arg("src"), py::arg("elem_bytes"), py::arg("mask"), py::arg("rows"), py::arg("cols"),
      py::call_guard<py::gil_scoped_release>(), "values = the entries of src under the mask, row-major (raw bits).");

  m.def(
      "masked_scatter",
      [](ptr dst, ptr values, int64_t elem_bytes, ptr mask, int64_t rows, int64_t cols) -> int64_t {
        return nlsr::masked_scatter(as<void>(dst), as<const void>(values), elem_bytes, as<const uint8_t>(mask), rows,
                                    cols);
      },
      py::arg("dst"), py::arg("values"), py::arg("elem_bytes"), py::arg("mask"), py::arg("rows"), py::arg("cols"),
      py::call_guard<py::gil_scoped_release>(),
      "dst's entries under the mask take values (row-major, raw bits); returns how many changed bits.");

  m.def(
      "popcount", [](ptr bytes, int64_t n) { return nlsr::popcount(as<const uint8_t>(bytes), n); }, py::arg("bytes"),
      py::arg("n"), py::call_guard<py::gil_scoped_release>(), "Set bits in n bytes.");

  m.def(
      "count_nonfinite",
      [](ptr x, int64_t n, int x_dtype) { return nlsr::count_nonfinite(as<const void>(x), dt(x_dtype), n); },
      py::arg("x"), py::arg("n"), py::arg("x_dtype"), py::call_guard<py::gil_scoped_release>(),
      "Number of NaN / Inf entries of n contiguous fp32 / fp16 / bf16 elements.");
}
