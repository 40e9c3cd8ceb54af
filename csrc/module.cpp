// Python entry point of truthgpt_kernels._C (the C++ CPU extension).
#include "common/python_module.h"
TRUTHGPT_PYTHON_MODULE()
