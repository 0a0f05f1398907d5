// Template instances of the q4 GEMM kernel, M = 2, 3 (see q4_gemm.cu).
#include "q4_gemm_kernel.cuh"

Q4_INSTANTIATE(2, 0, 16, 1, kProdF32)
Q4_INSTANTIATE(2, 4, 0, 1, kProdF32)
Q4_INSTANTIATE(3, 0, 16, 1, kProdF32)
Q4_INSTANTIATE(3, 4, 0, 1, kProdF32)
