/* The bfloat16 compute GEMM (compute_dtype="bfloat16"): C (M, N) (+)= bf16(A) @ bf16(B), every
   operand rounded to bfloat16 (nearest even, bf16.h's gpt2s_f32_to_bf16: denormals kept, NaN
   stays NaN), every product summed in float32.  A product of two bfloat16 is exact in float32
   (8 + 8 significant bits), so the result differs from any other float32 summation of the same
   products only by the order of the sums.

   A is float32, element (m, k) at A[m * ars + k * acs]; B is float32 or bfloat16 bits (b_bf16),
   element (k, n) at B[k * brs + n * bcs]: the strides express every transpose the forward and
   backward need (x @ W, dY @ W^T, X^T @ dY, the head's x @ E^T and dY @ E, E^T-products).

   Portable: the scalar reference of the definition above (the kernel harness's reference; a
   model on a CPU without AVX512_BF16 does not run it: _core rounds the operands into float32
   buffers and hands them to sgemm, the same numbers at float32 speed).

   avx512-bf16: vdpbf16ps on packed panels.  B is packed per KC x 32 block as [K/2][32][2]
   bfloat16 (the pair (k, k+1) of column n in one 32-bit lane, K padded with a zero), A as rows
   of KC bfloat16 (a 32-bit broadcast gives the pair); a tile of 8 rows x 32 columns keeps 16
   accumulators.  The instruction flushes denormal products to zero and rounds each of its two
   additions: it differs from the portable sum by float32 rounding only.  Returns -1 when the
   panels cannot be allocated, else 0. */

#ifndef GPT2S_BF16GEMM_H
#define GPT2S_BF16GEMM_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16.h"

typedef int (*gpt2s_bf16gemm_fn)(int M, int N, int K, const float *A, int64_t ars,
                                 int64_t acs, const void *B, int b_bf16, int64_t brs,
                                 int64_t bcs, int accumulate, float *C, int64_t ldc);

static inline float gpt2s_bf16_round_f32(float x) {
    uint32_t u = (uint32_t)gpt2s_f32_to_bf16(x) << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* out[i] = bf16(x[i]) as a float32 (what the portable route hands to sgemm) */
static void gpt2s_bf16_round_n(float *out, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = gpt2s_bf16_round_f32(x[i]);
}

static inline float gpt2s_bf16gemm_b(const void *B, int b_bf16, int64_t i) {
    if (b_bf16) {
        uint32_t u = (uint32_t)((const uint16_t *)B)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof(f));
        return f;
    }
    return gpt2s_bf16_round_f32(((const float *)B)[i]);
}

static int gpt2s_bf16gemm_portable(int M, int N, int K, const float *A, int64_t ars,
                                   int64_t acs, const void *B, int b_bf16, int64_t brs,
                                   int64_t bcs, int accumulate, float *C, int64_t ldc) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float s = accumulate ? C[(int64_t)m * ldc + n] : 0.0f;
            for (int k = 0; k < K; k++)
                s += gpt2s_bf16_round_f32(A[(int64_t)m * ars + (int64_t)k * acs])
                     * gpt2s_bf16gemm_b(B, b_bf16, (int64_t)k * brs + (int64_t)n * bcs);
            C[(int64_t)m * ldc + n] = s;
        }
    return 0;
}

/* ------------------------------------------------------------------ avx512-bf16 */

#if GPT2S_HAVE_AVX512

#define GPT2S_BF16GEMM_MR 8
#define GPT2S_BF16GEMM_NR 32
#define GPT2S_BF16GEMM_KC 512   /* K per packed block (even) */
#define GPT2S_BF16GEMM_MC 1024  /* rows of A per packed panel (a multiple of MR) */

/* a 512-bit integer vector as the instruction's __m512bh operand (the SIMDe build of the
   kernel harness defines its own) */
#ifndef GPT2S_M512_AS_BH
#define GPT2S_M512_AS_BH(x) ((__m512bh)(x))
#endif

/* Bp [kc2][32][2] = bf16 of B[k0 + 0 .. kc), columns n0 .. n0 + nr (nr <= 32), zero padded */
static void gpt2s_bf16gemm_pack_b(uint16_t *Bp, const void *B, int b_bf16, int64_t brs,
                                  int64_t bcs, int k0, int kc, int n0, int nr) {
    int kc2 = (kc + 1) / 2;
    memset(Bp, 0, sizeof(uint16_t) * (size_t)kc2 * 64);
    for (int k = 0; k < kc; k++) {
        uint16_t *row = Bp + (size_t)(k / 2) * 64 + (k & 1);
        int64_t base = (int64_t)(k0 + k) * brs + (int64_t)n0 * bcs;
        if (b_bf16) {
            const uint16_t *b = (const uint16_t *)B + base;
            for (int n = 0; n < nr; n++) row[2 * n] = b[(int64_t)n * bcs];
        } else {
            const float *b = (const float *)B + base;
            for (int n = 0; n < nr; n++) row[2 * n] = gpt2s_f32_to_bf16(b[(int64_t)n * bcs]);
        }
    }
}

/* Ap [rows][kcp] = bf16 of A[m0 .., k0 .. k0 + kc), rows past M and the pad column zero */
static void gpt2s_bf16gemm_pack_a(uint16_t *Ap, int kcp, const float *A, int64_t ars,
                                  int64_t acs, int m0, int rows, int M, int k0, int kc) {
    for (int r = 0; r < rows; r++) {
        uint16_t *out = Ap + (size_t)r * kcp;
        if (m0 + r >= M) {
            memset(out, 0, sizeof(uint16_t) * (size_t)kcp);
            continue;
        }
        const float *a = A + (int64_t)(m0 + r) * ars + (int64_t)k0 * acs;
        if (acs == 1) {
            for (int k = 0; k < kc; k++) out[k] = gpt2s_f32_to_bf16(a[k]);
        } else {
            for (int k = 0; k < kc; k++) out[k] = gpt2s_f32_to_bf16(a[(int64_t)k * acs]);
        }
        for (int k = kc; k < kcp; k++) out[k] = 0;
    }
}

/* C[0:mr, 0:nr] = (load ? C : 0) + Ap (8 rows, kc2 pairs) @ Bp (kc2 pairs, 32 columns) */
GPT2S_V4BF16_INLINE void gpt2s_bf16gemm_tile_arch_avx512_bf16(
        int mr, int nr, int kc2, const uint16_t *Ap, int kcp, const uint16_t *Bp, int load,
        float *C, int64_t ldc) {
    __m512 acc[GPT2S_BF16GEMM_MR][2];
    __mmask16 m0 = nr >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nr) - 1u);
    __mmask16 m1 = nr >= 32 ? (__mmask16)0xffff
                 : nr > 16 ? (__mmask16)((1u << (nr - 16)) - 1u) : (__mmask16)0;
    for (int r = 0; r < GPT2S_BF16GEMM_MR; r++) {
        if (load && r < mr) {
            acc[r][0] = _mm512_maskz_loadu_ps(m0, C + (int64_t)r * ldc);
            acc[r][1] = _mm512_maskz_loadu_ps(m1, C + (int64_t)r * ldc + 16);
        } else {
            acc[r][0] = _mm512_setzero_ps();
            acc[r][1] = _mm512_setzero_ps();
        }
    }
    for (int p = 0; p < kc2; p++) {
        __m512i b0 = _mm512_loadu_si512((const void *)(Bp + (size_t)p * 64));
        __m512i b1 = _mm512_loadu_si512((const void *)(Bp + (size_t)p * 64 + 32));
        for (int r = 0; r < GPT2S_BF16GEMM_MR; r++) {
            uint32_t pair;
            memcpy(&pair, Ap + (size_t)r * kcp + 2 * (size_t)p, sizeof(pair));
            __m512i a = _mm512_set1_epi32((int)pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], GPT2S_M512_AS_BH(a), GPT2S_M512_AS_BH(b0));
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], GPT2S_M512_AS_BH(a), GPT2S_M512_AS_BH(b1));
        }
    }
    for (int r = 0; r < mr; r++) {
        _mm512_mask_storeu_ps(C + (int64_t)r * ldc, m0, acc[r][0]);
        if (m1) _mm512_mask_storeu_ps(C + (int64_t)r * ldc + 16, m1, acc[r][1]);
    }
}

GPT2S_V4BF16 static int gpt2s_bf16gemm_arch_avx512_bf16(
        int M, int N, int K, const float *A, int64_t ars, int64_t acs, const void *B,
        int b_bf16, int64_t brs, int64_t bcs, int accumulate, float *C, int64_t ldc) {
    const int MR = GPT2S_BF16GEMM_MR, NR = GPT2S_BF16GEMM_NR, KC = GPT2S_BF16GEMM_KC,
              MC = GPT2S_BF16GEMM_MC;
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) {
        if (!accumulate)
            for (int m = 0; m < M; m++) memset(C + (int64_t)m * ldc, 0, sizeof(float) * (size_t)N);
        return 0;
    }
    int nstrips = (N + NR - 1) / NR, mc = M < MC ? (M + MR - 1) / MR * MR : MC;
    int kcmax = K < KC ? (K + 1) / 2 * 2 : KC;
    uint16_t *Ap = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)mc * kcmax);
    uint16_t *Bp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)kcmax * NR);
    if (Ap == NULL || Bp == NULL) {
        free(Ap);
        free(Bp);
        return -1;
    }
    for (int mb = 0; mb < M; mb += MC) {   /* blocks of MC rows: a bounded A panel */
        int rows = M - mb < MC ? M - mb : MC, rows_p = (rows + MR - 1) / MR * MR;
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = K - k0 < KC ? K - k0 : KC, kcp = (kc + 1) / 2 * 2;
            gpt2s_bf16gemm_pack_a(Ap, kcp, A, ars, acs, mb, rows_p, M, k0, kc);
            for (int s = 0; s < nstrips; s++) {
                int n0 = s * NR, nr = N - n0 < NR ? N - n0 : NR;
                gpt2s_bf16gemm_pack_b(Bp, B, b_bf16, brs, bcs, k0, kc, n0, nr);
                for (int m0 = 0; m0 < rows; m0 += MR)
                    gpt2s_bf16gemm_tile_arch_avx512_bf16(
                        rows - m0 < MR ? rows - m0 : MR, nr, kcp / 2, Ap + (size_t)m0 * kcp, kcp,
                        Bp, accumulate || k0 > 0, C + (int64_t)(mb + m0) * ldc + n0, ldc);
            }
        }
    }
    free(Ap);
    free(Bp);
    return 0;
}

#endif

/* The variant of an instruction-set level, NULL when this build has none for it (the
   portable level's is the scalar reference) */
static gpt2s_bf16gemm_fn gpt2s_bf16gemm_variant(int isa) {
    if (isa == GPT2S_ISA_PORTABLE) return gpt2s_bf16gemm_portable;
#if GPT2S_HAVE_AVX512
    if (isa == GPT2S_ISA_AVX512_BF16) return gpt2s_bf16gemm_arch_avx512_bf16;
#endif
    return NULL;
}

#endif
