// Template instances of the q4 GEMM kernel, M = 1 (all variants; see q4_gemm.cu).
#include "q4_gemm_kernel.cuh"

Q4_INSTANTIATE(1, 4, 0, 3, kProdF32)
Q4_INSTANTIATE(1, 0, 16, 1, kProdF32)
Q4_INSTANTIATE(1, 4, 0, 2, kProdF32)
Q4_INSTANTIATE(1, 4, 0, 3, kProdH2)
Q4_INSTANTIATE(1, 4, 0, 3, kProdI16)
