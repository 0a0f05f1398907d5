// Template instances of the q4 GEMM kernel, M = 1 (all inner-loop variants).
#include "q4_gemm_kernel.cuh"

Q4_INSTANTIATE(1, 8, true, 0)
Q4_INSTANTIATE(1, 8, true, 1)
Q4_INSTANTIATE(1, 16, false, 0)
Q4_INSTANTIATE(1, 16, false, 1)
Q4_INSTANTIATE(1, 4, true, 0)
Q4_INSTANTIATE(1, 4, true, 1)
