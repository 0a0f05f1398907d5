// Template instances of the q4 GEMM kernel, M = 6, 7, 8.
#include "q4_gemm_kernel.cuh"

Q4_INSTANTIATE(6, 8, true, 0)
Q4_INSTANTIATE(6, 8, true, 1)
Q4_INSTANTIATE(7, 8, true, 0)
Q4_INSTANTIATE(7, 8, true, 1)
Q4_INSTANTIATE(8, 8, true, 0)
Q4_INSTANTIATE(8, 8, true, 1)
