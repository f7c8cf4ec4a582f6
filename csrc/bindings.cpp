// Python bindings of fastvar's CUDA extension (fastvar._C) and, compiled with FASTVAR_HOST_EMULATION, of its
// host build for the CPU tests (FASTVAR_MODULE names the module). Argument errors become ValueError, dtype
// errors TypeError, CUDA errors RuntimeError; each message names the launcher (and the kernel).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "fastvar_ext.h"

#ifndef FASTVAR_MODULE
#define FASTVAR_MODULE _C
#endif
#ifndef FASTVAR_SOURCES_SHA256      // CMakeLists.txt defines it (the host build of the tests does not)
#define FASTVAR_SOURCES_SHA256 ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(FASTVAR_MODULE, m) {
    m.doc() = "fastvar's CUDA C++ kernels on raw pointers (csrc/); called through fastvar/ops/cuda_ext.py";
    m.attr("HOST_EMULATION") = py::bool_(fv::host_emulation());
    m.attr("SOURCES_SHA256") = FASTVAR_SOURCES_SHA256;
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const fv::DtypeError& e) {
            PyErr_SetString(PyExc_TypeError, e.what());
        } catch (const fv::ArgError& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        } catch (const fv::CudaError& e) {
            PyErr_SetString(PyExc_RuntimeError, e.what());
        }
    });
    m.def("upsample_accumulate_step", &fv::upsample_accumulate_step, py::kw_only(),
          py::arg("f_hat"), py::arg("f_shape"), py::arg("f_strides"),
          py::arg("src"), py::arg("src_strides"), py::arg("idx"), py::arg("idx_strides"),
          py::arg("codebook"), py::arg("codebook_shape"), py::arg("codebook_strides"), py::arg("code_hw"),
          py::arg("weight"), py::arg("weight_strides"), py::arg("bias"), py::arg("bias_stride"),
          py::arg("one_minus_r"), py::arg("r"),
          py::arg("next_out"), py::arg("next_hw"), py::arg("next_strides"),
          py::arg("aten_cpu"), py::arg("stream"),
          "f_hat += Phi(bicubic(codes)) in place, then the next scale's area-downsampled map (csrc/upsample_step.cu)");
    m.def("sample_top_k_top_p", &fv::sample_top_k_top_p, py::kw_only(),
          py::arg("logits"), py::arg("dtype"), py::arg("logits_shape"), py::arg("logits_strides"),
          py::arg("n_cond"), py::arg("has_cfg"), py::arg("cfg_a"), py::arg("cfg_t"), py::arg("top_k"),
          py::arg("top_p_thr"), py::arg("has_top_p"), py::arg("noise"), py::arg("noise_shape"),
          py::arg("noise_stride"), py::arg("tokens"), py::arg("err"), py::arg("filtered"), py::arg("stream"),
          "CFG + top-k + top-p + the exact draw, one CTA per row (csrc/sampling.cu)");
    m.attr("MAX_SAMPLE_V") = fv::kMaxSampleV;
    m.attr("MAX_STEP_C") = fv::kMaxStepC;
}
