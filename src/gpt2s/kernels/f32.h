/* float32 weights.

   Portable: the products go to BLAS (sgemv for one row, sgemm for more; _core.pyx's
   gemm_serial), which is the reference the other weight types are measured against.

   x86-64-v3: direct kernels for 2 to 32 rows (batch decoding, short prompts; tile.h says
   why sgemm is slow there): nn is the tile of tile.h on float32 loads; nt (the tied lm_head)
   a tile of 4 rows of A x 3 rows of W (12 accumulators), the next 3 rows of W prefetched
   during the first pass over them (17 -> 22 GB/s at 8 rows).  Measured on a 2-core Zen 4
   (M = 8, two threads, weights not in cache): 15-21 GB/s of W against sgemm's 6-12.

   avx512: the same for 2 to 32 rows on the 16-float tiles of tile.h (nn 8 x 32, nt 4 x 4 or
   8 x 2), the tails masked. */

#ifndef GPT2S_F32_H
#define GPT2S_F32_H

#include "tile.h"

#define GPT2S_F32_DIRECT_MIN_ROWS 2   /* one row: sgemv reads W at the memory's speed */

#if GPT2S_HAVE_X86_64_V3

/* C[:, 0:n] (+)= A (M, K) @ W (K, n) */
GPT2S_V3 static void gpt2s_f32_nn_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    gpt2s_nn_arch_x86_64_v3(GPT2S_ELEM_F32, M, n, K, A, lda, W, ldw, accumulate, C, ldc);
}

/* C[:, 0:n] (+)= A (M, K) @ W (n, K)^T */
GPT2S_V3 static void gpt2s_f32_nt_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    gpt2s_nt_tile_arch_x86_64_v3(GPT2S_ELEM_F32, 4, 3, M, n, K, A, lda, W, ldw, NULL,
                                 accumulate, C, ldc);
}

#endif

#if GPT2S_HAVE_AVX512

GPT2S_V4 static void gpt2s_f32_nn_arch_avx512(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    gpt2s_nn_arch_avx512(GPT2S_ELEM_F32, M, n, K, A, lda, W, ldw, accumulate, C, ldc);
}

GPT2S_V4 static void gpt2s_f32_nt_arch_avx512(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    gpt2s_nt_arch_avx512(GPT2S_ELEM_F32, M, n, K, A, lda, W, ldw, NULL, accumulate, C, ldc);
}

#endif
#if defined(__aarch64__) && GPT2S_HAVE_NEON

/* neon (aarch64): the nn and nt tiles of tile.h on float32 loads (2 to 32 rows; one row goes
   to sgemv as on x86) */
GPT2S_NEON static void gpt2s_f32_nn_arch_neon(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    gpt2s_nn_arch_neon(GPT2S_ELEM_F32, M, n, K, A, lda, W, ldw, accumulate, C, ldc);
}

GPT2S_NEON static void gpt2s_f32_nt_arch_neon(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    gpt2s_nt_arch_neon(GPT2S_ELEM_F32, M, n, K, A, lda, W, ldw, NULL, accumulate, C, ldc);
}

#endif

#endif
