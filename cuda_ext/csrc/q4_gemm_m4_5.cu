// Template instances of the q4 GEMM kernel, M = 4, 5.
#include "q4_gemm_kernel.cuh"

Q4_INSTANTIATE(4, 8, true, 0)
Q4_INSTANTIATE(4, 8, true, 1)
Q4_INSTANTIATE(5, 8, true, 0)
Q4_INSTANTIATE(5, 8, true, 1)
