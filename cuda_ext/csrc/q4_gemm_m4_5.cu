// Template instances of the q4 GEMM kernel, M = 4, 5 (see q4_gemm.cu).
#include "q4_gemm_kernel.cuh"

Q4_INSTANTIATE(4, 0, 16, 1, kProdF32)
Q4_INSTANTIATE(4, 4, 0, 1, kProdF32)
Q4_INSTANTIATE(5, 0, 16, 1, kProdF32)
Q4_INSTANTIATE(5, 4, 0, 1, kProdF32)
