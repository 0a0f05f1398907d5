// Template instances of the q4 GEMM kernel, M = 6, 7, 8 (see q4_gemm.cu).
#include "q4_gemm_kernel.cuh"

Q4_INSTANTIATE(6, 0, 16, 1, kProdF32)
Q4_INSTANTIATE(6, 4, 0, 1, kProdF32)
Q4_INSTANTIATE(7, 0, 16, 1, kProdF32)
Q4_INSTANTIATE(7, 4, 0, 1, kProdF32)
Q4_INSTANTIATE(8, 0, 16, 1, kProdF32)
Q4_INSTANTIATE(8, 4, 0, 1, kProdF32)
