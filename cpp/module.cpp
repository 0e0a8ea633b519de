// orthoft._C: importing it registers the torch.ops.orthoft operators; it also reports how it was built.
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "orthoft's compiled operators (registered in torch.ops.orthoft) and build configuration";
  m.attr("torch_version") = ORTHOFT_TORCH_VERSION;
  m.attr("with_cuda") = static_cast<bool>(ORTHOFT_WITH_CUDA);
  const std::string cuda_version = ORTHOFT_CUDA_VERSION;
  m.attr("cuda_version") = cuda_version.empty() ? py::object(py::none()) : py::object(py::str(cuda_version));
  m.attr("cuda_archs") = ORTHOFT_CUDA_ARCHS;
}
