// Python entry point of truthgpt_kernels._C_testing: the test-only extension that holds the
// host builds of the CUDA kernels' shared logic (the other files in this folder). Built only
// with TRUTHGPT_BUILD_TESTING=1 (make test sets it), so a user's install ships no test code.
#include "common/python_module.h"
TRUTHGPT_PYTHON_MODULE()
