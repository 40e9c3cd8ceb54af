// Python entry point of truthgpt_kernels._cuda (the CUDA C++ extension).
#include "common/python_module.h"
TRUTHGPT_PYTHON_MODULE()
