// orthoft._C: importing it loads this library, whose static initialisers register the torch.ops.orthoft
// operators. The module itself is empty and uses only the limited Python API, so one build serves every
// Python from 3.10 on; what the build is for is recorded in orthoft/_build_config.py.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "orthoft's compiled operators (torch.ops.orthoft)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
