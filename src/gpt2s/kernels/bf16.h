/* bfloat16 weights: the top 16 bits of a float32 (uint16_t), stored in the tensor's own
   layout: the Conv1D weights input-major [K][N], the tied embedding / lm_head [V][C].
   Widening is a 16-bit shift; float32 -> bfloat16 rounds to nearest even (NaN stays NaN).

   Portable: exact conversions both ways and the widening of a panel of W into float32, which
   the panel route of _core (kernels/matmul.pxi) hands to sgemm.

   x86-64-v3 (AVX2 + FMA + F16C): direct kernels for 1 to 32 rows -- the nn and nt tiles of
   tile.h on bfloat16 loads, and for one row (batch-1 decoding) kernels that stream W as a
   few long sequential runs -- and a vector widening of panels.

   avx512: the same kernels on 16-float registers.  The one-row kernels widen 32 bfloat16 of
   a 512-bit load without a shuffle: a left shift by 16 gives the even elements as floats, a
   mask of the high halves the odd ones; the activations (nt) or the outputs (nn) are kept in
   that even/odd order, permuted once per call. */

#ifndef GPT2S_BF16_H
#define GPT2S_BF16_H

#include <stdint.h>
#include <string.h>
#include "tile.h"

/* ------------------------------------------------------------------ portable */

/* round to nearest even; NaN stays a (quiet) NaN, overflow gives +-inf as it should */
static inline uint16_t gpt2s_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* out[i] = bf16(x[i]) */
static void gpt2s_bf16_from_f32_n(uint16_t *out, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = gpt2s_f32_to_bf16(x[i]);
}

/* out[i] = float(x[i]) (the compiler vectorises it for the baseline ISA) */
static void gpt2s_bf16_to_f32_n(float *out, const uint16_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)x[i] << 16;
        memcpy(out + i, &u, sizeof(float));
    }
}

/* out (rows, cols) float32 (ldo) = W bf16 (rows, cols) (ldw): a panel of either layout */
static void gpt2s_bf16_widen(float *out, int64_t ldo, const void *W, int64_t ldw,
                             const uint16_t *S, int rows, int cols) {
    (void)S;
    for (int r = 0; r < rows; r++)
        gpt2s_bf16_to_f32_n(out + (int64_t)r * ldo, (const uint16_t *)W + (int64_t)r * ldw, cols);
}

/* Stored rows [0, N) of K weights each, element (n, k) from x[n * sn + k * sk]; always 0 */
static int gpt2s_bf16_quantize(void *W, uint16_t *S, const float *x, int64_t N, int64_t K,
                               int64_t sn, int64_t sk) {
    (void)S;
    uint16_t *w = (uint16_t *)W;
    for (int64_t n = 0; n < N; n++) {
        if (sk == 1) {
            gpt2s_bf16_from_f32_n(w + n * K, x + n * sn, K);
        } else {
            for (int64_t k = 0; k < K; k++) w[n * K + k] = gpt2s_f32_to_bf16(x[n * sn + k * sk]);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ x86-64-v3 */

#if GPT2S_HAVE_X86_64_V3

#define GPT2S_BF16_PF 2048   /* nt1 prefetch distance in bytes */

/* [0-7 | 8-15] <-> [0-3, 8-11 | 4-7, 12-15]: the lane order of two unpacks with zero, which
   widen a 256-bit load of 16 bf16; the same permutation both ways */
GPT2S_V3_INLINE void gpt2s_bf16_lanes_swap_arch_x86_64_v3(float *c, int n16) {
    for (int j = 0; j < n16; j += 16) {
        __m256 c0 = _mm256_loadu_ps(c + j), c1 = _mm256_loadu_ps(c + j + 8);
        _mm256_storeu_ps(c + j, _mm256_permute2f128_ps(c0, c1, 0x20));
        _mm256_storeu_ps(c + j + 8, _mm256_permute2f128_ps(c0, c1, 0x31));
    }
}

/* c[0:n] (+)= a (K) @ W (K, n) bf16, one row.  W is streamed 4 whole rows at a time (4
   sequential streams, which the hardware prefetchers follow; a strip of columns walked down
   64 rows would be 64 streams: 5 -> 9 GB/s from memory on one core), c (n floats, L1) is
   updated once per 4 rows, in the lane order of the unpacks (straightened at the end; with
   accumulate, permuted at the start too).  The next 4 rows are prefetched, a line each per 32
   columns. */
GPT2S_V3_INLINE void gpt2s_bf16_nn1_arch_x86_64_v3(int n, int K, const float *a,
        const uint16_t *W, int ldw, int accumulate, float *c) {
    int n16 = n - n % 16, k4 = K - K % 4;
    const __m256i zero = _mm256_setzero_si256();
    if (accumulate) gpt2s_bf16_lanes_swap_arch_x86_64_v3(c, n16);
    else memset(c, 0, sizeof(float) * n16);
    for (int k = 0; k < k4; k += 4) {
        const uint16_t *w0 = W + (int64_t)k * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        __m256 t0 = _mm256_broadcast_ss(a + k), t1 = _mm256_broadcast_ss(a + k + 1);
        __m256 t2 = _mm256_broadcast_ss(a + k + 2), t3 = _mm256_broadcast_ss(a + k + 3);
        int prefetch = k + 12 <= k4;
        for (int j = 0; j < n16; j += 16) {
            if (prefetch && (j & 31) == 0) {
                __builtin_prefetch(w0 + 8 * (int64_t)ldw + j);
                __builtin_prefetch(w1 + 8 * (int64_t)ldw + j);
                __builtin_prefetch(w2 + 8 * (int64_t)ldw + j);
                __builtin_prefetch(w3 + 8 * (int64_t)ldw + j);
            }
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(w0 + j));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(w1 + j));
            __m256i v2 = _mm256_loadu_si256((const __m256i *)(w2 + j));
            __m256i v3 = _mm256_loadu_si256((const __m256i *)(w3 + j));
            __m256 lo = _mm256_loadu_ps(c + j), hi = _mm256_loadu_ps(c + j + 8);
            lo = _mm256_fmadd_ps(t0, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v0)), lo);
            hi = _mm256_fmadd_ps(t0, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v0)), hi);
            lo = _mm256_fmadd_ps(t1, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v1)), lo);
            hi = _mm256_fmadd_ps(t1, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v1)), hi);
            lo = _mm256_fmadd_ps(t2, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v2)), lo);
            hi = _mm256_fmadd_ps(t2, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v2)), hi);
            lo = _mm256_fmadd_ps(t3, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v3)), lo);
            hi = _mm256_fmadd_ps(t3, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v3)), hi);
            _mm256_storeu_ps(c + j, lo);
            _mm256_storeu_ps(c + j + 8, hi);
        }
    }
    for (int k = k4; k < K; k++) {   /* the last K % 4 rows */
        const uint16_t *w0 = W + (int64_t)k * ldw;
        __m256 t0 = _mm256_broadcast_ss(a + k);
        for (int j = 0; j < n16; j += 16) {
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(w0 + j));
            _mm256_storeu_ps(c + j, _mm256_fmadd_ps(t0, _mm256_castsi256_ps(
                _mm256_unpacklo_epi16(zero, v0)), _mm256_loadu_ps(c + j)));
            _mm256_storeu_ps(c + j + 8, _mm256_fmadd_ps(t0, _mm256_castsi256_ps(
                _mm256_unpackhi_epi16(zero, v0)), _mm256_loadu_ps(c + j + 8)));
        }
    }
    gpt2s_bf16_lanes_swap_arch_x86_64_v3(c, n16);
    for (int j = n16; j < n; j++) {   /* the last n % 16 columns */
        float s = accumulate ? c[j] : 0.0f;
        for (int k = 0; k < K; k++) s += a[k] * gpt2s_bf16_to_f32(W[(int64_t)k * ldw + j]);
        c[j] = s;
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W (K, n) bf16 */
GPT2S_V3 static void gpt2s_bf16_nn_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    if (M == 1)
        gpt2s_bf16_nn1_arch_x86_64_v3(n, K, A, (const uint16_t *)W, ldw, accumulate, C);
    else
        gpt2s_nn_arch_x86_64_v3(GPT2S_ELEM_BF16, M, n, K, A, lda, W, ldw, accumulate, C, ldc);
}

/* c[0:n] (+)= a (K) @ W^T, W bf16 (n, K), one row (the tied lm_head of batch-1 decoding: 77
   MB per token for GPT-2 124M).  The row a is permuted once into the lane order of the
   unpacks (xp, K floats of scratch), so each 16 weights cost one load, two unpacks and two
   FMAs; four rows of W at a time, which with ldw == K are one contiguous block read at 128
   bytes a step, prefetched 2 KiB ahead (the 1 x 8 tile left the prefetchers eight short
   streams: 7 GB/s on one core where this reads 12). */
GPT2S_V3_INLINE void gpt2s_bf16_nt1_arch_x86_64_v3(int n, int K, const float *a,
        const uint16_t *W, int ldw, int accumulate, float *c, float *xp) {
    int k16 = K - K % 16;
    const __m256i zero = _mm256_setzero_si256();
    for (int k = 0; k < k16; k += 16) {
        __m256 x0 = _mm256_loadu_ps(a + k), x1 = _mm256_loadu_ps(a + k + 8);
        _mm256_storeu_ps(xp + k, _mm256_permute2f128_ps(x0, x1, 0x20));
        _mm256_storeu_ps(xp + k + 8, _mm256_permute2f128_ps(x0, x1, 0x31));
    }
    int k32 = K - K % 32;
    for (int v = 0; v < n; v++) {
        const uint16_t *w = W + (int64_t)v * ldw;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int prefetch = v + 8 <= n;
        int k = 0;
        for (; k < k32; k += 32) {
            if (prefetch) __builtin_prefetch((const char *)w + 2 * (int64_t)k + GPT2S_BF16_PF);
            __m256i q0 = _mm256_loadu_si256((const __m256i *)(w + k));
            __m256i q1 = _mm256_loadu_si256((const __m256i *)(w + k + 16));
            s0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, q0)),
                                 _mm256_loadu_ps(xp + k), s0);
            s1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, q0)),
                                 _mm256_loadu_ps(xp + k + 8), s1);
            s2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, q1)),
                                 _mm256_loadu_ps(xp + k + 16), s2);
            s3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, q1)),
                                 _mm256_loadu_ps(xp + k + 24), s3);
        }
        for (; k < k16; k += 16) {
            __m256i q0 = _mm256_loadu_si256((const __m256i *)(w + k));
            s0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, q0)),
                                 _mm256_loadu_ps(xp + k), s0);
            s1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, q0)),
                                 _mm256_loadu_ps(xp + k + 8), s1);
        }
        float t = gpt2s_hsum_arch_x86_64_v3(_mm256_add_ps(_mm256_add_ps(s0, s1),
                                                          _mm256_add_ps(s2, s3)));
        for (k = k16; k < K; k++) t += a[k] * gpt2s_bf16_to_f32(w[k]);
        c[v] = accumulate ? c[v] + t : t;
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W (n, K)^T bf16.  Tiles by rows of A: one row streams 8 W rows
   at once (8 FMA chains); 2-3 rows 4; 4 or more rows 4 x 2 (8 accumulators, 4 A vectors and
   a W vector in registers). */
GPT2S_V3 static void gpt2s_bf16_nt_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    if (M == 1 && K <= 8192) {   /* scratch on the stack: 32 KiB at most */
        float xp[8192] __attribute__((aligned(32)));
        gpt2s_bf16_nt1_arch_x86_64_v3(n, K, A, (const uint16_t *)W, ldw, accumulate, C, xp);
    } else if (M == 1)
        gpt2s_nt_tile_arch_x86_64_v3(GPT2S_ELEM_BF16, 1, 8, M, n, K, A, lda, W, ldw, NULL,
                                     accumulate, C, ldc);
    else if (M < 4)
        gpt2s_nt_tile_arch_x86_64_v3(GPT2S_ELEM_BF16, 2, 4, M, n, K, A, lda, W, ldw, NULL,
                                     accumulate, C, ldc);
    else
        gpt2s_nt_tile_arch_x86_64_v3(GPT2S_ELEM_BF16, 4, 2, M, n, K, A, lda, W, ldw, NULL,
                                     accumulate, C, ldc);
}

/* the portable gpt2s_bf16_widen, 8 at a time */
GPT2S_V3 static void gpt2s_bf16_widen_arch_x86_64_v3(float *out, int64_t ldo, const void *W,
        int64_t ldw, const uint16_t *S, int rows, int cols) {
    (void)S;
    int c8 = cols - cols % 8;
    for (int r = 0; r < rows; r++) {
        const uint16_t *src = (const uint16_t *)W + (int64_t)r * ldw;
        float *dst = out + (int64_t)r * ldo;
        for (int c = 0; c < c8; c += 8)
            _mm256_storeu_ps(dst + c, gpt2s_ld8_arch_x86_64_v3(GPT2S_ELEM_BF16, src, c));
        for (int c = c8; c < cols; c++) dst[c] = gpt2s_bf16_to_f32(src[c]);
    }
}

#endif

/* ------------------------------------------------------------------ avx512 */

#if GPT2S_HAVE_AVX512

/* c[j .. j + 32) in natural order <-> [the 16 even elements | the 16 odd ones] */
GPT2S_V4_INLINE void gpt2s_bf16_evenodd_arch_avx512(float *c, int n32, int to_natural) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    for (int j = 0; j < n32; j += 32) {
        __m512 c0 = _mm512_loadu_ps(c + j), c1 = _mm512_loadu_ps(c + j + 16);
        if (to_natural) {
            _mm512_storeu_ps(c + j, _mm512_permutex2var_ps(c0, lo, c1));
            _mm512_storeu_ps(c + j + 16, _mm512_permutex2var_ps(c0, hi, c1));
        } else {
            _mm512_storeu_ps(c + j, _mm512_permutex2var_ps(c0, even, c1));
            _mm512_storeu_ps(c + j + 16, _mm512_permutex2var_ps(c0, odd, c1));
        }
    }
}

#define GPT2S_BF16_EVEN(v) _mm512_castsi512_ps(_mm512_slli_epi32((v), 16))
#define GPT2S_BF16_ODD(v) _mm512_castsi512_ps(_mm512_and_si512((v), _mm512_set1_epi32((int)0xffff0000u)))

/* c[0:n] (+)= a (K) @ W (K, n) bf16, one row: x86-64-v3's stream of 4 whole rows of W at a
   time, 32 columns a step, c in even/odd order meanwhile */
GPT2S_V4_INLINE void gpt2s_bf16_nn1_arch_avx512(int n, int K, const float *a,
        const uint16_t *W, int ldw, int accumulate, float *c) {
    int n32 = n - n % 32, k4 = K - K % 4;
    if (accumulate) gpt2s_bf16_evenodd_arch_avx512(c, n32, 0);
    else memset(c, 0, sizeof(float) * n32);
    for (int k = 0; k < k4; k += 4) {
        const uint16_t *w0 = W + (int64_t)k * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        __m512 t0 = _mm512_set1_ps(a[k]), t1 = _mm512_set1_ps(a[k + 1]);
        __m512 t2 = _mm512_set1_ps(a[k + 2]), t3 = _mm512_set1_ps(a[k + 3]);
        int prefetch = k + 12 <= k4;
        for (int j = 0; j < n32; j += 32) {
            if (prefetch) {
                __builtin_prefetch(w0 + 8 * (int64_t)ldw + j);
                __builtin_prefetch(w1 + 8 * (int64_t)ldw + j);
                __builtin_prefetch(w2 + 8 * (int64_t)ldw + j);
                __builtin_prefetch(w3 + 8 * (int64_t)ldw + j);
            }
            __m512i v0 = _mm512_loadu_si512(w0 + j), v1 = _mm512_loadu_si512(w1 + j);
            __m512i v2 = _mm512_loadu_si512(w2 + j), v3 = _mm512_loadu_si512(w3 + j);
            __m512 lo = _mm512_loadu_ps(c + j), hi = _mm512_loadu_ps(c + j + 16);
            lo = _mm512_fmadd_ps(t0, GPT2S_BF16_EVEN(v0), lo);
            hi = _mm512_fmadd_ps(t0, GPT2S_BF16_ODD(v0), hi);
            lo = _mm512_fmadd_ps(t1, GPT2S_BF16_EVEN(v1), lo);
            hi = _mm512_fmadd_ps(t1, GPT2S_BF16_ODD(v1), hi);
            lo = _mm512_fmadd_ps(t2, GPT2S_BF16_EVEN(v2), lo);
            hi = _mm512_fmadd_ps(t2, GPT2S_BF16_ODD(v2), hi);
            lo = _mm512_fmadd_ps(t3, GPT2S_BF16_EVEN(v3), lo);
            hi = _mm512_fmadd_ps(t3, GPT2S_BF16_ODD(v3), hi);
            _mm512_storeu_ps(c + j, lo);
            _mm512_storeu_ps(c + j + 16, hi);
        }
    }
    for (int k = k4; k < K; k++) {   /* the last K % 4 rows */
        const uint16_t *w0 = W + (int64_t)k * ldw;
        __m512 t0 = _mm512_set1_ps(a[k]);
        for (int j = 0; j < n32; j += 32) {
            __m512i v0 = _mm512_loadu_si512(w0 + j);
            _mm512_storeu_ps(c + j, _mm512_fmadd_ps(t0, GPT2S_BF16_EVEN(v0),
                                                    _mm512_loadu_ps(c + j)));
            _mm512_storeu_ps(c + j + 16, _mm512_fmadd_ps(t0, GPT2S_BF16_ODD(v0),
                                                         _mm512_loadu_ps(c + j + 16)));
        }
    }
    gpt2s_bf16_evenodd_arch_avx512(c, n32, 1);
    for (int j = n32; j < n; j++) {   /* the last n % 32 columns */
        float s = accumulate ? c[j] : 0.0f;
        for (int k = 0; k < K; k++) s += a[k] * gpt2s_bf16_to_f32(W[(int64_t)k * ldw + j]);
        c[j] = s;
    }
}

GPT2S_V4 static void gpt2s_bf16_nn_arch_avx512(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    if (M == 1)
        gpt2s_bf16_nn1_arch_avx512(n, K, A, (const uint16_t *)W, ldw, accumulate, C);
    else
        gpt2s_nn_arch_avx512(GPT2S_ELEM_BF16, M, n, K, A, lda, W, ldw, accumulate, C, ldc);
}

/* c[0:n] (+)= a (K) @ W^T, W bf16 (n, K), one row: the row a permuted once into even/odd
   order per 32 (xp, K floats of scratch), then each W row streamed 64 weights a step into 4
   FMA chains, prefetched 2 KiB ahead */
GPT2S_V4_INLINE void gpt2s_bf16_nt1_arch_avx512(int n, int K, const float *a,
        const uint16_t *W, int ldw, int accumulate, float *c, float *xp) {
    int k32 = K - K % 32, k64 = K - K % 64;
    memcpy(xp, a, sizeof(float) * k32);
    gpt2s_bf16_evenodd_arch_avx512(xp, k32, 0);
    for (int v = 0; v < n; v++) {
        const uint16_t *w = W + (int64_t)v * ldw;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int prefetch = v + 8 <= n;
        int k = 0;
        for (; k < k64; k += 64) {
            if (prefetch) {
                __builtin_prefetch((const char *)w + 2 * (int64_t)k + GPT2S_BF16_PF);
                __builtin_prefetch((const char *)w + 2 * (int64_t)k + GPT2S_BF16_PF + 64);
            }
            __m512i q0 = _mm512_loadu_si512(w + k), q1 = _mm512_loadu_si512(w + k + 32);
            s0 = _mm512_fmadd_ps(GPT2S_BF16_EVEN(q0), _mm512_loadu_ps(xp + k), s0);
            s1 = _mm512_fmadd_ps(GPT2S_BF16_ODD(q0), _mm512_loadu_ps(xp + k + 16), s1);
            s2 = _mm512_fmadd_ps(GPT2S_BF16_EVEN(q1), _mm512_loadu_ps(xp + k + 32), s2);
            s3 = _mm512_fmadd_ps(GPT2S_BF16_ODD(q1), _mm512_loadu_ps(xp + k + 48), s3);
        }
        for (; k < k32; k += 32) {
            __m512i q0 = _mm512_loadu_si512(w + k);
            s0 = _mm512_fmadd_ps(GPT2S_BF16_EVEN(q0), _mm512_loadu_ps(xp + k), s0);
            s1 = _mm512_fmadd_ps(GPT2S_BF16_ODD(q0), _mm512_loadu_ps(xp + k + 16), s1);
        }
        float t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1),
                                                     _mm512_add_ps(s2, s3)));
        for (k = k32; k < K; k++) t += a[k] * gpt2s_bf16_to_f32(w[k]);
        c[v] = accumulate ? c[v] + t : t;
    }
}

GPT2S_V4 static void gpt2s_bf16_nt_arch_avx512(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    if (M == 1 && K <= 8192) {   /* scratch on the stack: 32 KiB at most */
        float xp[8192] __attribute__((aligned(64)));
        gpt2s_bf16_nt1_arch_avx512(n, K, A, (const uint16_t *)W, ldw, accumulate, C, xp);
    } else {
        gpt2s_nt_arch_avx512(GPT2S_ELEM_BF16, M, n, K, A, lda, W, ldw, NULL, accumulate, C,
                             ldc);
    }
}

#undef GPT2S_BF16_EVEN
#undef GPT2S_BF16_ODD

#endif
/* ------------------------------------------------------------------ neon (aarch64) */

#if defined(__aarch64__) && GPT2S_HAVE_NEON

/* neon: the tiles of tile.h on bfloat16 loads (a bfloat16 widens by one shift: vshll), for 1
   to 32 rows -- one row of nn is a 1 x 16 tile down blocks of 64 rows of W, one row of nt
   streams 8 rows of W at once -- and the widening of panels.  (The bf16 instructions, bfdot /
   bfmmla, multiply bfloat16 by bfloat16: the activations here are float32, so the neon-bf16
   level has no kernels of this type; isa.h.) */
GPT2S_NEON static void gpt2s_bf16_nn_arch_neon(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    gpt2s_nn_arch_neon(GPT2S_ELEM_BF16, M, n, K, A, lda, W, ldw, accumulate, C, ldc);
}

GPT2S_NEON static void gpt2s_bf16_nt_arch_neon(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)S;
    gpt2s_nt_arch_neon(GPT2S_ELEM_BF16, M, n, K, A, lda, W, ldw, NULL, accumulate, C, ldc);
}

GPT2S_NEON static void gpt2s_bf16_widen_arch_neon(float *out, int64_t ldo, const void *W,
        int64_t ldw, const uint16_t *S, int rows, int cols) {
    gpt2s_widen_arch_neon(GPT2S_ELEM_BF16, out, ldo, W, ldw, S, rows, cols);
}

#endif

#endif
