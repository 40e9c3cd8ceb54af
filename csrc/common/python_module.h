// A Python module with no methods but `build_info()`, so `import truthgpt_kernels._C` loads
// the shared library and with it the TORCH_LIBRARY registrations (pattern of
// pytorch/extension-cpp). Includes only Python.h: no pybind11, no torch headers.
#pragma once
#include <Python.h>

#ifndef TRUTHGPT_BUILD_INFO
#define TRUTHGPT_BUILD_INFO ""
#endif

#define TRUTHGPT_CONCAT_(a, b) a##b
#define TRUTHGPT_CONCAT(a, b) TRUTHGPT_CONCAT_(a, b)
#define TRUTHGPT_STR_(a) #a
#define TRUTHGPT_STR(a) TRUTHGPT_STR_(a)

#define TRUTHGPT_PYTHON_MODULE()                                                        \
  static PyObject* truthgpt_build_info(PyObject*, PyObject*) {                          \
    return PyUnicode_FromString(TRUTHGPT_BUILD_INFO);                                   \
  }                                                                                     \
  static PyMethodDef truthgpt_methods[] = {                                             \
      {"build_info", truthgpt_build_info, METH_NOARGS, "Flags this extension was built with."}, \
      {nullptr, nullptr, 0, nullptr}};                                                  \
  extern "C" PyMODINIT_FUNC TRUTHGPT_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {      \
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, TRUTHGPT_STR(TORCH_EXTENSION_NAME), \
                                     nullptr, -1, truthgpt_methods};                    \
    return PyModule_Create(&def);                                                       \
  }
