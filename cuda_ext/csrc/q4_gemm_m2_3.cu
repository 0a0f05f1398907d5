// Template instances of the q4 GEMM kernel, M = 2, 3.
#include "q4_gemm_kernel.cuh"

Q4_INSTANTIATE(2, 8, true, 0)
Q4_INSTANTIATE(2, 8, true, 1)
Q4_INSTANTIATE(3, 8, true, 0)
Q4_INSTANTIATE(3, 8, true, 1)
