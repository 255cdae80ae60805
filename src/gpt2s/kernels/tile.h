/* The register tiles of the direct kernels, written once for every weight type whose
   weights they widen in registers (float32, bfloat16, int8 blocks): C (M, n) (+)= A (M, K)
   float32 @ W, with W either input-major [K][n] ("nn", the Conv1D weights) or output-major
   [n][K] ("nt", the tied lm_head and every blocked weight).  ELEM (a compile-time constant of
   each caller) says how 8 weights become 8 floats; the rest of the tile is the same code.

   Why direct kernels: with few rows of A (decoding: 1 to 32), a product is bound by reading W
   once.  sgemm packs all of W for every call and then runs its kernel on a few rows (~7 GB/s
   of W at M = 8 where two cores read ~33 GB/s), and a widened float32 copy of a compressed W
   would be read again.  These kernels read every weight once from memory into registers,
   widen it there and use it for all M rows, keeping the outputs in registers meanwhile.

   - nn: a tile of RA rows of C x 16 columns (2 RA accumulators) runs down a block of 64 rows
     of W.  Walking one 64-byte column strip down all K rows would touch a new page per row
     (rows are 3-12 KB apart), so within a block every strip is visited left to right (each of
     the 64 rows is read sequentially), partial sums go back to C (M x n floats, in L1/L2)
     between blocks, and the line two strips ahead is prefetched.  RA = 6: 12 FMAs per 2
     weight vectors and a broadcast (15 registers); the rows are split into tiles of 6 and 4
     so that the fewest rows are computed (M = 8: 4 + 4; M = 16: 6 + 6 + 4).
   - nt: each output is a dot product of two contiguous rows; a tile of RA rows of A x RW rows
     of W keeps RA x RW accumulators of 8 lanes and widens each 8-wide piece of a W row once
     for all RA rows.
   Rows past the end of A or W repeat the tile's first row (GPT2S_ROW): computed, never
   stored -- the aliased stores go first and the tile's own row last. */

#ifndef GPT2S_TILE_H
#define GPT2S_TILE_H

#include <stdint.h>
#include <string.h>
#include "isa.h"

enum { GPT2S_ELEM_F32 = 0, GPT2S_ELEM_BF16 = 1, GPT2S_ELEM_Q8 = 2, GPT2S_ELEM_Q4 = 3 };

/* blocked element types: 32 weights per fp16 scale along K */
#define GPT2S_ELEM_BLOCKED(ELEM) ((ELEM) == GPT2S_ELEM_Q8 || (ELEM) == GPT2S_ELEM_Q4)

/* 4-bit weights: element e of a row-major array of blocks of 32 sits in byte
   (e / 32) * 16 + e % 16, the low nibble for e % 32 < 16, the high one after (q4.h) */
static inline const uint8_t *gpt2s_q4_byte(const void *W, int64_t e) {
    return (const uint8_t *)W + (e >> 5) * 16 + (e & 15);
}

#define GPT2S_NN_KB 64   /* rows of W per block of the nn tile */

/* one weight as a float: the portable widening of each element type */
static inline float gpt2s_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

#if GPT2S_HAVE_X86_64_V3

/* 8 weights W[i .. i + 8) widened to float32 (int8, 4-bit: not yet scaled; 4-bit: i % 8 == 0,
   so the 8 share a block half) */
GPT2S_V3_INLINE __m256 gpt2s_ld8_arch_x86_64_v3(const int ELEM, const void *W, int64_t i) {
    if (ELEM == GPT2S_ELEM_F32)
        return _mm256_loadu_ps((const float *)W + i);
    if (ELEM == GPT2S_ELEM_BF16) {   /* zero-extend to 32 bits, shift into the high half */
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)W + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (ELEM == GPT2S_ELEM_Q4) {
        __m128i b = _mm_loadl_epi64((const __m128i *)gpt2s_q4_byte(W, i));
        if (i & 16) b = _mm_srli_epi16(b, 4);
        b = _mm_and_si128(b, _mm_set1_epi8(15));
        return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b),
                                                   _mm256_set1_epi32(8)));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
        _mm_loadl_epi64((const __m128i *)((const int8_t *)W + i))));
}

/* W[i] as a float (the tails of the tiles) */
GPT2S_V3_INLINE float gpt2s_elem_arch_x86_64_v3(const int ELEM, const void *W, int64_t i) {
    if (ELEM == GPT2S_ELEM_F32) return ((const float *)W)[i];
    if (ELEM == GPT2S_ELEM_BF16) return gpt2s_bf16_to_f32(((const uint16_t *)W)[i]);
    return (float)((const int8_t *)W)[i];
}

GPT2S_V3_INLINE const void *gpt2s_elem_ptr(const int ELEM, const void *W, int64_t i) {
    return ELEM == GPT2S_ELEM_F32 ? (const void *)((const float *)W + i)
         : ELEM == GPT2S_ELEM_BF16 ? (const void *)((const uint16_t *)W + i)
         : ELEM == GPT2S_ELEM_Q4 ? (const void *)((const uint8_t *)W + i / 2)
         : (const void *)((const int8_t *)W + i);
}

GPT2S_V3_INLINE float gpt2s_hsum_arch_x86_64_v3(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the 8 lanes added left to right from 0 */
GPT2S_V3_INLINE float gpt2s_lsum_arch_x86_64_v3(__m256 v) {
    float l[8], r = 0.0f;
    _mm256_storeu_ps(l, v);
    for (int i = 0; i < 8; i++) r += l[i];
    return r;
}

/* C[:, 0:n16] (+)= A (M, K) @ W (K, n16), n16 a multiple of 16, in tiles of RA rows.  PF:
   the prefetch distance in elements (128 bytes ahead). */
GPT2S_V3_INLINE void gpt2s_nn_tile_arch_x86_64_v3(const int ELEM, const int RA, int M, int n16,
        int K, const float *A, int lda, const void *W, int ldw, int accumulate, float *C,
        int ldc) {
    const int PF = ELEM == GPT2S_ELEM_F32 ? 32 : 64;
    for (int k0 = 0; k0 < K; k0 += GPT2S_NN_KB) {
        int k1 = k0 + GPT2S_NN_KB < K ? k0 + GPT2S_NN_KB : K;
        int load = accumulate || k0 > 0;
        for (int j = 0; j < n16; j += 16) {
            int pf = j + 16 + PF <= n16;
            for (int m0 = 0; m0 < M; m0 += RA) {
                int mr = M - m0 < RA ? M - m0 : RA;
                const float *a[6];
                float *c[6];
                __m256 s[6][2];
#pragma GCC unroll 6
                for (int i = 0; i < RA; i++) {
                    a[i] = GPT2S_ROW(A + (int64_t)m0 * lda, i, mr, lda);
                    c[i] = GPT2S_ROW(C + (int64_t)m0 * ldc + j, i, mr, ldc);
                    if (load) {
                        s[i][0] = _mm256_loadu_ps(c[i]);
                        s[i][1] = _mm256_loadu_ps(c[i] + 8);
                    } else {
                        s[i][0] = s[i][1] = _mm256_setzero_ps();
                    }
                }
                int64_t w = (int64_t)k0 * ldw + j;
                int prefetch = pf && m0 == 0;
                for (int k = k0; k < k1; k++, w += ldw) {
                    if (prefetch) __builtin_prefetch(gpt2s_elem_ptr(ELEM, W, w + PF));
                    __m256 w0 = gpt2s_ld8_arch_x86_64_v3(ELEM, W, w);
                    __m256 w1 = gpt2s_ld8_arch_x86_64_v3(ELEM, W, w + 8);
#pragma GCC unroll 6
                    for (int i = 0; i < RA; i++) {
                        __m256 t = _mm256_broadcast_ss(a[i] + k);
                        s[i][0] = _mm256_fmadd_ps(t, w0, s[i][0]);
                        s[i][1] = _mm256_fmadd_ps(t, w1, s[i][1]);
                    }
                }
#pragma GCC unroll 6
                for (int i = RA - 1; i >= 0; i--) {
                    _mm256_storeu_ps(c[i], s[i][0]);
                    _mm256_storeu_ps(c[i] + 8, s[i][1]);
                }
            }
        }
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W (K, n), M >= 1: tiles of 6 and 4 rows, then the last n % 16
   columns by plain loops. */
GPT2S_V3_INLINE void gpt2s_nn_arch_x86_64_v3(const int ELEM, int M, int n, int K,
        const float *A, int lda, const void *W, int ldw, int accumulate, float *C, int ldc) {
    /* m6 rows in tiles of 6, the rest in tiles of 4: the split that computes the fewest
       rows (aliased ones included), the most tiles of 6 among equals */
    int n16 = n - n % 16, m6 = 0, best = 4 * ((M + 3) / 4);
    for (int t = 6; t < M + 6; t += 6) {   /* t rows in tiles of 6, the last maybe partial */
        int rows = t + (M > t ? 4 * ((M - t + 3) / 4) : 0);
        if (rows <= best) {
            best = rows;
            m6 = t < M ? t : M;
        }
    }
    if (m6 > 0)
        gpt2s_nn_tile_arch_x86_64_v3(ELEM, 6, m6, n16, K, A, lda, W, ldw, accumulate, C, ldc);
    if (M > m6)
        gpt2s_nn_tile_arch_x86_64_v3(ELEM, 4, M - m6, n16, K, A + (int64_t)m6 * lda, lda, W,
                                     ldw, accumulate, C + (int64_t)m6 * ldc, ldc);
    for (int m = 0; m < M; m++) {
        for (int j = n16; j < n; j++) {
            float s = accumulate ? C[(int64_t)m * ldc + j] : 0.0f;
            for (int k = 0; k < K; k++)
                s += A[(int64_t)m * lda + k]
                     * gpt2s_elem_arch_x86_64_v3(ELEM, W, (int64_t)k * ldw + j);
            C[(int64_t)m * ldc + j] = s;
        }
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W^T, W (n, K) row-major (ldw), in tiles of RA rows of A x RW rows
   of W.  int8 and 4-bit (ELEM_Q8, ELEM_Q4): K % 32 == 0, every block of 32 widened times its
   fp16 scale (S, [n][K / 32]).  float32 adds each accumulator's lanes left to right and prefetches the next
   tile's rows every 8 columns; the others add them pairwise and prefetch every 32. */
GPT2S_V3_INLINE void gpt2s_nt_tile_arch_x86_64_v3(const int ELEM, const int RA, const int RW,
        int M, int n, int K, const float *A, int lda, const void *W, int ldw,
        const uint16_t *S, int accumulate, float *C, int ldc) {
    int k8 = K - K % 8, nb = K / 32;
    for (int v = 0; v < n; v += RW) {
        int vr = n - v < RW ? n - v : RW;
        int64_t w[8];
        const uint16_t *ws[8];
#pragma GCC unroll 8
        for (int r = 0; r < RW; r++) {
            int64_t row = v + (vr > r ? r : 0);
            w[r] = row * ldw;
            ws[r] = S + row * nb;
        }
        for (int m0 = 0; m0 < M; m0 += RA) {
            int mr = M - m0 < RA ? M - m0 : RA;
            const float *a[4];
#pragma GCC unroll 4
            for (int i = 0; i < RA; i++) a[i] = GPT2S_ROW(A + (int64_t)m0 * lda, i, mr, lda);
            __m256 s[4][8];
#pragma GCC unroll 4
            for (int i = 0; i < RA; i++)
#pragma GCC unroll 8
                for (int r = 0; r < RW; r++) s[i][r] = _mm256_setzero_ps();
            int prefetch = m0 == 0 && v + 2 * RW <= n;
            if (!GPT2S_ELEM_BLOCKED(ELEM)) {
                for (int k = 0; k < k8; k += 8) {
                    __m256 x[4];
#pragma GCC unroll 4
                    for (int i = 0; i < RA; i++) x[i] = _mm256_loadu_ps(a[i] + k);
#pragma GCC unroll 8
                    for (int r = 0; r < RW; r++) {
                        if (ELEM == GPT2S_ELEM_F32 ? prefetch
                                                   : prefetch && (k & 31) == 0)
                            __builtin_prefetch(gpt2s_elem_ptr(
                                ELEM, W, w[r] + (int64_t)RW * ldw + k
                                             + (ELEM == GPT2S_ELEM_F32 ? 16 : 32)));
                        __m256 wv = gpt2s_ld8_arch_x86_64_v3(ELEM, W, w[r] + k);
#pragma GCC unroll 4
                        for (int i = 0; i < RA; i++) s[i][r] = _mm256_fmadd_ps(x[i], wv, s[i][r]);
                    }
                }
            } else {
                for (int b = 0; b < nb; b++) {
                    int k = b * 32;
                    __m256 d[8];
#pragma GCC unroll 8
                    for (int r = 0; r < RW; r++) {
                        if (prefetch) {
                            __builtin_prefetch(gpt2s_elem_ptr(ELEM, W, w[r] + (int64_t)RW * ldw
                                                                            + k + 64));
                            if ((b & 31) == 0) __builtin_prefetch(ws[r] + (int64_t)RW * nb + b + 32);
                        }
                        d[r] = _mm256_set1_ps(_cvtsh_ss(ws[r][b]));
                    }
#pragma GCC unroll 4
                    for (int c = 0; c < 32; c += 8) {
                        __m256 x[4];
#pragma GCC unroll 4
                        for (int i = 0; i < RA; i++) x[i] = _mm256_loadu_ps(a[i] + k + c);
#pragma GCC unroll 8
                        for (int r = 0; r < RW; r++) {
                            __m256 wv = _mm256_mul_ps(
                                gpt2s_ld8_arch_x86_64_v3(ELEM, W, w[r] + k + c), d[r]);
#pragma GCC unroll 4
                            for (int i = 0; i < RA; i++)
                                s[i][r] = _mm256_fmadd_ps(x[i], wv, s[i][r]);
                        }
                    }
                }
            }
#pragma GCC unroll 4
            for (int i = RA - 1; i >= 0; i--) {
                if (i >= mr) continue;
#pragma GCC unroll 8
                for (int r = RW - 1; r >= 0; r--) {
                    if (r >= vr) continue;
                    float t = ELEM == GPT2S_ELEM_F32 ? gpt2s_lsum_arch_x86_64_v3(s[i][r])
                                                     : gpt2s_hsum_arch_x86_64_v3(s[i][r]);
                    if (!GPT2S_ELEM_BLOCKED(ELEM))
                        for (int k = k8; k < K; k++)
                            t += a[i][k] * gpt2s_elem_arch_x86_64_v3(ELEM, W, w[r] + k);
                    float *c = C + (int64_t)(m0 + i) * ldc + v + r;
                    *c = accumulate ? *c + t : t;
                }
            }
        }
    }
}

#endif

#if GPT2S_HAVE_AVX512

/* ------------------------------------------------------------------ avx512
   The same tiles on 16-float registers (32 of them): nn a tile of RA rows x 32 columns, nt
   RA x RW accumulators of 16 lanes.  Tails by masked loads and stores instead of scalar
   loops: the last strip of nn columns, the last K % 16 of an nt row (float32, bfloat16).  The
   float arithmetic is that of x86-64-v3 (each weight widened exactly, then float32 FMAs), in
   another order of the partial sums. */

/* the first n of 16 lanes (n >= 16: all) */
static inline __mmask16 gpt2s_mask16(int n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* 16 weights W[i .. i + 16) widened to float32, the lanes of `mask` only (others 0; the
   blocked types ignore it: int8, 4-bit: not yet scaled; 4-bit: i % 16 == 0, a block half) */
GPT2S_V4_INLINE __m512 gpt2s_ld16_arch_avx512(const int ELEM, const void *W, int64_t i,
                                              const int MASKED, __mmask16 mask) {
    if (ELEM == GPT2S_ELEM_F32)
        return MASKED ? _mm512_maskz_loadu_ps(mask, (const float *)W + i)
                      : _mm512_loadu_ps((const float *)W + i);
    if (ELEM == GPT2S_ELEM_BF16) {
        __m256i h = MASKED ? _mm256_maskz_loadu_epi16(mask, (const uint16_t *)W + i)
                           : _mm256_loadu_si256((const __m256i *)((const uint16_t *)W + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (ELEM == GPT2S_ELEM_Q4) {
        __m128i b = _mm_loadu_si128((const __m128i *)gpt2s_q4_byte(W, i));
        if (i & 16) b = _mm_srli_epi16(b, 4);
        b = _mm_and_si128(b, _mm_set1_epi8(15));
        return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b),
                                                   _mm512_set1_epi32(8)));
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128((const __m128i *)((const int8_t *)W + i))));
}

/* C[:, j0:j0 + 32) (+)= A (M, K) @ W (K, .), the columns of masks m0, m1 only, tiles of RA */
GPT2S_V4_INLINE void gpt2s_nn_strip_arch_avx512(const int ELEM, const int RA, const int MASKED,
        __mmask16 m0, __mmask16 m1, int M, int k0, int k1, int j, int pf, int load,
        const float *A, int lda, const void *W, int ldw, float *C, int ldc) {
    const int PF = ELEM == GPT2S_ELEM_F32 ? 64 : 64;   /* two strips ahead */
    for (int r0 = 0; r0 < M; r0 += RA) {
        int mr = M - r0 < RA ? M - r0 : RA;
        const float *a[8];
        float *c[8];
        __m512 s[8][2];
#pragma GCC unroll 8
        for (int i = 0; i < RA; i++) {
            a[i] = GPT2S_ROW(A + (int64_t)r0 * lda, i, mr, lda);
            c[i] = GPT2S_ROW(C + (int64_t)r0 * ldc + j, i, mr, ldc);
            if (load) {
                s[i][0] = MASKED ? _mm512_maskz_loadu_ps(m0, c[i]) : _mm512_loadu_ps(c[i]);
                s[i][1] = MASKED ? _mm512_maskz_loadu_ps(m1, c[i] + 16)
                                 : _mm512_loadu_ps(c[i] + 16);
            } else {
                s[i][0] = s[i][1] = _mm512_setzero_ps();
            }
        }
        int64_t w = (int64_t)k0 * ldw + j;
        int prefetch = pf && r0 == 0;
        for (int k = k0; k < k1; k++, w += ldw) {
            if (prefetch) {
                __builtin_prefetch(gpt2s_elem_ptr(ELEM, W, w + PF));
                if (ELEM == GPT2S_ELEM_F32) __builtin_prefetch(gpt2s_elem_ptr(ELEM, W, w + PF + 16));
            }
            __m512 w0 = gpt2s_ld16_arch_avx512(ELEM, W, w, MASKED, m0);
            __m512 w1 = gpt2s_ld16_arch_avx512(ELEM, W, w + 16, MASKED, m1);
#pragma GCC unroll 8
            for (int i = 0; i < RA; i++) {
                __m512 t = _mm512_set1_ps(a[i][k]);
                s[i][0] = _mm512_fmadd_ps(t, w0, s[i][0]);
                s[i][1] = _mm512_fmadd_ps(t, w1, s[i][1]);
            }
        }
#pragma GCC unroll 8
        for (int i = RA - 1; i >= 0; i--) {
            if (MASKED) {
                _mm512_mask_storeu_ps(c[i], m0, s[i][0]);
                _mm512_mask_storeu_ps(c[i] + 16, m1, s[i][1]);
            } else {
                _mm512_storeu_ps(c[i], s[i][0]);
                _mm512_storeu_ps(c[i] + 16, s[i][1]);
            }
        }
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W (K, n) (float32, bfloat16), M >= 1: blocks of 64 rows of W,
   strips of 32 columns (the last one masked), rows in tiles of 8 then one of 4 or 8 */
GPT2S_V4_INLINE void gpt2s_nn_arch_avx512(const int ELEM, int M, int n, int K,
        const float *A, int lda, const void *W, int ldw, int accumulate, float *C, int ldc) {
    int n32 = n - n % 32, m8 = M - M % 8, rest = M - m8;
    for (int k0 = 0; k0 < K; k0 += GPT2S_NN_KB) {
        int k1 = k0 + GPT2S_NN_KB < K ? k0 + GPT2S_NN_KB : K;
        int load = accumulate || k0 > 0;
        for (int j = 0; j < n; j += 32) {
            int pf = j + 64 + 32 <= n32;
            const float *Ar = A + (int64_t)m8 * lda;
            float *Cr = C + (int64_t)m8 * ldc;
            if (j < n32) {
                if (m8) gpt2s_nn_strip_arch_avx512(ELEM, 8, 0, 0, 0, m8, k0, k1, j, pf, load,
                                                   A, lda, W, ldw, C, ldc);
                if (rest > 4) gpt2s_nn_strip_arch_avx512(ELEM, 8, 0, 0, 0, rest, k0, k1, j, pf,
                                                         load, Ar, lda, W, ldw, Cr, ldc);
                else if (rest) gpt2s_nn_strip_arch_avx512(ELEM, 4, 0, 0, 0, rest, k0, k1, j,
                                                          pf, load, Ar, lda, W, ldw, Cr, ldc);
            } else {
                __mmask16 m0 = gpt2s_mask16(n - j), m1 = gpt2s_mask16(n - j - 16);
                if (m8) gpt2s_nn_strip_arch_avx512(ELEM, 8, 1, m0, m1, m8, k0, k1, j, 0, load,
                                                   A, lda, W, ldw, C, ldc);
                if (rest > 4) gpt2s_nn_strip_arch_avx512(ELEM, 8, 1, m0, m1, rest, k0, k1, j,
                                                         0, load, Ar, lda, W, ldw, Cr, ldc);
                else if (rest) gpt2s_nn_strip_arch_avx512(ELEM, 4, 1, m0, m1, rest, k0, k1, j,
                                                          0, load, Ar, lda, W, ldw, Cr, ldc);
            }
        }
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W^T, W (n, K) row-major (ldw), in tiles of RA rows of A x RW rows
   of W; float32 and bfloat16: the last K % 16 by masked loads; int8 and 4-bit: K % 32 == 0,
   each block of 32 widened times its fp16 scale (S, [n][K / 32]).  Prefetch as x86-64-v3's. */
GPT2S_V4_INLINE void gpt2s_nt_tile_arch_avx512(const int ELEM, const int RA, const int RW,
        int M, int n, int K, const float *A, int lda, const void *W, int ldw,
        const uint16_t *S, int accumulate, float *C, int ldc) {
    int k16 = K - K % 16, nb = K / 32;
    __mmask16 tail = gpt2s_mask16(K - k16);
    for (int v = 0; v < n; v += RW) {
        int vr = n - v < RW ? n - v : RW;
        int64_t w[8];
        const uint16_t *ws[8];
#pragma GCC unroll 8
        for (int r = 0; r < RW; r++) {
            int64_t row = v + (vr > r ? r : 0);
            w[r] = row * ldw;
            ws[r] = S + row * nb;
        }
        for (int m0 = 0; m0 < M; m0 += RA) {
            int mr = M - m0 < RA ? M - m0 : RA;
            const float *a[8];
#pragma GCC unroll 8
            for (int i = 0; i < RA; i++) a[i] = GPT2S_ROW(A + (int64_t)m0 * lda, i, mr, lda);
            __m512 s[8][8];
#pragma GCC unroll 8
            for (int i = 0; i < RA; i++)
#pragma GCC unroll 8
                for (int r = 0; r < RW; r++) s[i][r] = _mm512_setzero_ps();
            int prefetch = m0 == 0 && v + 2 * RW <= n;
            if (!GPT2S_ELEM_BLOCKED(ELEM)) {
                for (int k = 0; k < k16; k += 16) {
                    __m512 x[8];
#pragma GCC unroll 8
                    for (int i = 0; i < RA; i++) x[i] = _mm512_loadu_ps(a[i] + k);
#pragma GCC unroll 8
                    for (int r = 0; r < RW; r++) {
                        if (ELEM == GPT2S_ELEM_F32 ? prefetch : prefetch && (k & 31) == 0)
                            __builtin_prefetch(gpt2s_elem_ptr(
                                ELEM, W, w[r] + (int64_t)RW * ldw + k + 32));
                        __m512 wv = gpt2s_ld16_arch_avx512(ELEM, W, w[r] + k, 0, 0);
#pragma GCC unroll 8
                        for (int i = 0; i < RA; i++) s[i][r] = _mm512_fmadd_ps(x[i], wv, s[i][r]);
                    }
                }
                if (tail) {
                    __m512 x[8];
#pragma GCC unroll 8
                    for (int i = 0; i < RA; i++) x[i] = _mm512_maskz_loadu_ps(tail, a[i] + k16);
#pragma GCC unroll 8
                    for (int r = 0; r < RW; r++) {
                        __m512 wv = gpt2s_ld16_arch_avx512(ELEM, W, w[r] + k16, 1, tail);
#pragma GCC unroll 8
                        for (int i = 0; i < RA; i++) s[i][r] = _mm512_fmadd_ps(x[i], wv, s[i][r]);
                    }
                }
            } else {
                for (int b = 0; b < nb; b++) {
                    int k = b * 32;
                    __m512 d[8];
#pragma GCC unroll 8
                    for (int r = 0; r < RW; r++) {
                        if (prefetch) {
                            __builtin_prefetch(gpt2s_elem_ptr(ELEM, W, w[r] + (int64_t)RW * ldw
                                                                            + k + 64));
                            if ((b & 31) == 0) __builtin_prefetch(ws[r] + (int64_t)RW * nb + b + 32);
                        }
                        d[r] = _mm512_set1_ps(_cvtsh_ss(ws[r][b]));
                    }
#pragma GCC unroll 2
                    for (int c = 0; c < 32; c += 16) {
                        __m512 x[8];
#pragma GCC unroll 8
                        for (int i = 0; i < RA; i++) x[i] = _mm512_loadu_ps(a[i] + k + c);
#pragma GCC unroll 8
                        for (int r = 0; r < RW; r++) {
                            __m512 wv = _mm512_mul_ps(
                                gpt2s_ld16_arch_avx512(ELEM, W, w[r] + k + c, 0, 0), d[r]);
#pragma GCC unroll 8
                            for (int i = 0; i < RA; i++)
                                s[i][r] = _mm512_fmadd_ps(x[i], wv, s[i][r]);
                        }
                    }
                }
            }
#pragma GCC unroll 8
            for (int i = RA - 1; i >= 0; i--) {
                if (i >= mr) continue;
#pragma GCC unroll 8
                for (int r = RW - 1; r >= 0; r--) {
                    if (r >= vr) continue;
                    float t = _mm512_reduce_add_ps(s[i][r]);
                    float *c = C + (int64_t)(m0 + i) * ldc + v + r;
                    *c = accumulate ? *c + t : t;
                }
            }
        }
    }
}

/* the nt tile by rows of A: one row 1 x 8 (8 FMA chains), 2-3 rows 2 x 4, 4-7 rows 4 x 4,
   8 or more 8 x 2 (the widening of a W vector shared by 8 rows), the rest as above */
GPT2S_V4_INLINE void gpt2s_nt_arch_avx512(const int ELEM, int M, int n, int K, const float *A,
        int lda, const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    if (M == 1)
        gpt2s_nt_tile_arch_avx512(ELEM, 1, 8, M, n, K, A, lda, W, ldw, S, accumulate, C, ldc);
    else if (M < 4)
        gpt2s_nt_tile_arch_avx512(ELEM, 2, 4, M, n, K, A, lda, W, ldw, S, accumulate, C, ldc);
    else if (M < 8)
        gpt2s_nt_tile_arch_avx512(ELEM, 4, 4, M, n, K, A, lda, W, ldw, S, accumulate, C, ldc);
    else {
        int m8 = M - M % 8;
        gpt2s_nt_tile_arch_avx512(ELEM, 8, 2, m8, n, K, A, lda, W, ldw, S, accumulate, C, ldc);
        int r = M - m8;
        const float *Ar = A + (int64_t)m8 * lda;
        float *Cr = C + (int64_t)m8 * ldc;
        if (r >= 4)
            gpt2s_nt_tile_arch_avx512(ELEM, 4, 4, r, n, K, Ar, lda, W, ldw, S, accumulate, Cr, ldc);
        else if (r >= 2)
            gpt2s_nt_tile_arch_avx512(ELEM, 2, 4, r, n, K, Ar, lda, W, ldw, S, accumulate, Cr, ldc);
        else if (r == 1)
            gpt2s_nt_tile_arch_avx512(ELEM, 1, 8, r, n, K, Ar, lda, W, ldw, S, accumulate, Cr, ldc);
    }
}

#endif
#if GPT2S_HAVE_NEON

/* ------------------------------------------------------------------ neon (aarch64)
   The tiles on 4-float registers (32 of them), plain armv8-a Advanced SIMD: nn a tile of RA
   rows x 16 columns (4 RA accumulators) down blocks of 64 rows of W, nt RA x RW accumulators
   of 4 lanes, each fed 8 weights a step.  The arithmetic is x86-64-v3's: every weight widened
   exactly (int8 / 4-bit times its block's fp16 scale, one rounding), then float32 FMAs, in
   another order of the partial sums; the tails (the last n % 16 nn columns, the last K % 8
   of an nt row of float32 / bfloat16) by scalar loops. */

/* an fp16 scale as a float (fcvtl: armv8-a) */
GPT2S_NEON_INLINE float gpt2s_f16_arch_neon(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

/* 8 weights W[i .. i + 8) widened to float32 in two registers (int8, 4-bit: not yet scaled;
   4-bit: i % 8 == 0, so the 8 share a block half) */
GPT2S_NEON_INLINE void gpt2s_ld8_arch_neon(const int ELEM, const void *W, int64_t i,
                                           float32x4_t *lo, float32x4_t *hi) {
    if (ELEM == GPT2S_ELEM_F32) {
        *lo = vld1q_f32((const float *)W + i);
        *hi = vld1q_f32((const float *)W + i + 4);
        return;
    }
    if (ELEM == GPT2S_ELEM_BF16) {   /* each 16 bits shifted into the high half of a float */
        uint16x8_t h = vld1q_u16((const uint16_t *)W + i);
        *lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
        *hi = vreinterpretq_f32_u32(vshll_high_n_u16(h, 16));
        return;
    }
    int16x8_t q;
    if (ELEM == GPT2S_ELEM_Q4) {
        uint8x8_t b = vld1_u8(gpt2s_q4_byte(W, i));
        b = (i & 16) ? vshr_n_u8(b, 4) : vand_u8(b, vdup_n_u8(15));
        q = vsubq_s16(vreinterpretq_s16_u16(vmovl_u8(b)), vdupq_n_s16(8));
    } else {
        q = vmovl_s8(vld1_s8((const int8_t *)W + i));
    }
    *lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(q)));
    *hi = vcvtq_f32_s32(vmovl_high_s16(q));
}

/* where W[i] is (for prefetches) */
GPT2S_NEON_INLINE const void *gpt2s_elem_ptr_arch_neon(const int ELEM, const void *W,
                                                       int64_t i) {
    return ELEM == GPT2S_ELEM_F32 ? (const void *)((const float *)W + i)
         : ELEM == GPT2S_ELEM_BF16 ? (const void *)((const uint16_t *)W + i)
         : ELEM == GPT2S_ELEM_Q4 ? (const void *)((const uint8_t *)W + i / 2)
         : (const void *)((const int8_t *)W + i);
}

/* W[i] as a float (the scalar tails: float32, bfloat16) */
GPT2S_NEON_INLINE float gpt2s_elem_arch_neon(const int ELEM, const void *W, int64_t i) {
    if (ELEM == GPT2S_ELEM_F32) return ((const float *)W)[i];
    return gpt2s_bf16_to_f32(((const uint16_t *)W)[i]);
}

/* C[:, 0:n16] (+)= A (M, K) @ W (K, n16), n16 a multiple of 16, in tiles of RA rows */
GPT2S_NEON_INLINE void gpt2s_nn_tile_arch_neon(const int ELEM, const int RA, int M, int n16,
        int K, const float *A, int lda, const void *W, int ldw, int accumulate, float *C,
        int ldc) {
    const int PF = ELEM == GPT2S_ELEM_F32 ? 32 : 64;   /* 128 bytes ahead */
    for (int k0 = 0; k0 < K; k0 += GPT2S_NN_KB) {
        int k1 = k0 + GPT2S_NN_KB < K ? k0 + GPT2S_NN_KB : K;
        int load = accumulate || k0 > 0;
        for (int j = 0; j < n16; j += 16) {
            int pf = j + 16 + PF <= n16;
            for (int m0 = 0; m0 < M; m0 += RA) {
                int mr = M - m0 < RA ? M - m0 : RA;
                const float *a[4];
                float *c[4];
                float32x4_t s[4][4];
#pragma GCC unroll 4
                for (int i = 0; i < RA; i++) {
                    a[i] = GPT2S_ROW(A + (int64_t)m0 * lda, i, mr, lda);
                    c[i] = GPT2S_ROW(C + (int64_t)m0 * ldc + j, i, mr, ldc);
#pragma GCC unroll 4
                    for (int q = 0; q < 4; q++)
                        s[i][q] = load ? vld1q_f32(c[i] + 4 * q) : vdupq_n_f32(0.0f);
                }
                int64_t w = (int64_t)k0 * ldw + j;
                int prefetch = pf && m0 == 0;
                for (int k = k0; k < k1; k++, w += ldw) {
                    float32x4_t wv[4];
                    if (prefetch) __builtin_prefetch(gpt2s_elem_ptr_arch_neon(ELEM, W, w + PF));
                    gpt2s_ld8_arch_neon(ELEM, W, w, &wv[0], &wv[1]);
                    gpt2s_ld8_arch_neon(ELEM, W, w + 8, &wv[2], &wv[3]);
#pragma GCC unroll 4
                    for (int i = 0; i < RA; i++) {
                        float t = a[i][k];
#pragma GCC unroll 4
                        for (int q = 0; q < 4; q++) s[i][q] = vfmaq_n_f32(s[i][q], wv[q], t);
                    }
                }
#pragma GCC unroll 4
                for (int i = RA - 1; i >= 0; i--)   /* the tile's own row last */
#pragma GCC unroll 4
                    for (int q = 0; q < 4; q++) vst1q_f32(c[i] + 4 * q, s[i][q]);
            }
        }
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W (K, n), M >= 1: tiles of 4 rows, then one of 1, 2 or 4; the
   last n % 16 columns by plain loops */
GPT2S_NEON_INLINE void gpt2s_nn_arch_neon(const int ELEM, int M, int n, int K, const float *A,
        int lda, const void *W, int ldw, int accumulate, float *C, int ldc) {
    int n16 = n - n % 16, m4 = M - M % 4, r = M - m4;
    if (n16 > 0) {
        if (m4) gpt2s_nn_tile_arch_neon(ELEM, 4, m4, n16, K, A, lda, W, ldw, accumulate, C, ldc);
        const float *Ar = A + (int64_t)m4 * lda;
        float *Cr = C + (int64_t)m4 * ldc;
        if (r == 1)
            gpt2s_nn_tile_arch_neon(ELEM, 1, r, n16, K, Ar, lda, W, ldw, accumulate, Cr, ldc);
        else if (r == 2)
            gpt2s_nn_tile_arch_neon(ELEM, 2, r, n16, K, Ar, lda, W, ldw, accumulate, Cr, ldc);
        else if (r == 3)
            gpt2s_nn_tile_arch_neon(ELEM, 4, r, n16, K, Ar, lda, W, ldw, accumulate, Cr, ldc);
    }
    for (int m = 0; m < M; m++)
        for (int j = n16; j < n; j++) {
            float s = accumulate ? C[(int64_t)m * ldc + j] : 0.0f;
            for (int k = 0; k < K; k++)
                s += A[(int64_t)m * lda + k]
                     * gpt2s_elem_arch_neon(ELEM, W, (int64_t)k * ldw + j);
            C[(int64_t)m * ldc + j] = s;
        }
}

/* C[:, 0:n] (+)= A (M, K) @ W^T, W (n, K) row-major (ldw), in tiles of RA rows of A x RW rows
   of W.  int8 and 4-bit: K % 32 == 0, every block of 32 widened times its fp16 scale (S,
   [n][K / 32]); float32 and bfloat16: the last K % 8 by a scalar loop. */
GPT2S_NEON_INLINE void gpt2s_nt_tile_arch_neon(const int ELEM, const int RA, const int RW,
        int M, int n, int K, const float *A, int lda, const void *W, int ldw,
        const uint16_t *S, int accumulate, float *C, int ldc) {
    int k8 = K - K % 8, nb = K / 32;
    for (int v = 0; v < n; v += RW) {
        int vr = n - v < RW ? n - v : RW;
        int64_t w[8];
        const uint16_t *ws[8];
#pragma GCC unroll 8
        for (int r = 0; r < RW; r++) {
            int64_t row = v + (vr > r ? r : 0);
            w[r] = row * ldw;
            ws[r] = S + row * nb;
        }
        for (int m0 = 0; m0 < M; m0 += RA) {
            int mr = M - m0 < RA ? M - m0 : RA;
            const float *a[4];
#pragma GCC unroll 4
            for (int i = 0; i < RA; i++) a[i] = GPT2S_ROW(A + (int64_t)m0 * lda, i, mr, lda);
            float32x4_t s[4][8];
#pragma GCC unroll 4
            for (int i = 0; i < RA; i++)
#pragma GCC unroll 8
                for (int r = 0; r < RW; r++) s[i][r] = vdupq_n_f32(0.0f);
            int prefetch = m0 == 0 && v + 2 * RW <= n;
            if (!GPT2S_ELEM_BLOCKED(ELEM)) {
                for (int k = 0; k < k8; k += 8) {
                    float32x4_t x0[4], x1[4];
#pragma GCC unroll 4
                    for (int i = 0; i < RA; i++) {
                        x0[i] = vld1q_f32(a[i] + k);
                        x1[i] = vld1q_f32(a[i] + k + 4);
                    }
#pragma GCC unroll 8
                    for (int r = 0; r < RW; r++) {
                        float32x4_t lo, hi;
                        if (prefetch && (k & 15) == 0)
                            __builtin_prefetch(gpt2s_elem_ptr_arch_neon(ELEM, W,
                                                              w[r] + (int64_t)RW * ldw + k));
                        gpt2s_ld8_arch_neon(ELEM, W, w[r] + k, &lo, &hi);
#pragma GCC unroll 4
                        for (int i = 0; i < RA; i++)
                            s[i][r] = vfmaq_f32(vfmaq_f32(s[i][r], x0[i], lo), x1[i], hi);
                    }
                }
            } else {
                for (int b = 0; b < nb; b++) {
                    int k = b * 32;
                    float d[8];
#pragma GCC unroll 8
                    for (int r = 0; r < RW; r++) {
                        if (prefetch)
                            __builtin_prefetch(gpt2s_elem_ptr_arch_neon(
                                ELEM, W, w[r] + (int64_t)RW * ldw + k));
                        d[r] = gpt2s_f16_arch_neon(ws[r][b]);
                    }
#pragma GCC unroll 4
                    for (int c = 0; c < 32; c += 8) {
                        float32x4_t x0[4], x1[4];
#pragma GCC unroll 4
                        for (int i = 0; i < RA; i++) {
                            x0[i] = vld1q_f32(a[i] + k + c);
                            x1[i] = vld1q_f32(a[i] + k + c + 4);
                        }
#pragma GCC unroll 8
                        for (int r = 0; r < RW; r++) {
                            float32x4_t lo, hi;
                            gpt2s_ld8_arch_neon(ELEM, W, w[r] + k + c, &lo, &hi);
                            lo = vmulq_n_f32(lo, d[r]);
                            hi = vmulq_n_f32(hi, d[r]);
#pragma GCC unroll 4
                            for (int i = 0; i < RA; i++)
                                s[i][r] = vfmaq_f32(vfmaq_f32(s[i][r], x0[i], lo), x1[i], hi);
                        }
                    }
                }
            }
#pragma GCC unroll 4
            for (int i = RA - 1; i >= 0; i--) {
                if (i >= mr) continue;
#pragma GCC unroll 8
                for (int r = RW - 1; r >= 0; r--) {
                    if (r >= vr) continue;
                    float t = vaddvq_f32(s[i][r]);
                    if (!GPT2S_ELEM_BLOCKED(ELEM))
                        for (int k = k8; k < K; k++)
                            t += a[i][k] * gpt2s_elem_arch_neon(ELEM, W, w[r] + k);
                    float *c = C + (int64_t)(m0 + i) * ldc + v + r;
                    *c = accumulate ? *c + t : t;
                }
            }
        }
    }
}

/* the nt tile by rows of A: one row 1 x 8 (8 FMA chains), 2-3 rows 2 x 4, 4 or more 4 x 4
   (16 accumulators, 8 A vectors), the last M % 4 rows as above */
GPT2S_NEON_INLINE void gpt2s_nt_arch_neon(const int ELEM, int M, int n, int K, const float *A,
        int lda, const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    int m4 = M < 4 ? 0 : M - M % 4, r = M - m4;
    if (m4) gpt2s_nt_tile_arch_neon(ELEM, 4, 4, m4, n, K, A, lda, W, ldw, S, accumulate, C, ldc);
    const float *Ar = A + (int64_t)m4 * lda;
    float *Cr = C + (int64_t)m4 * ldc;
    if (r == 1)
        gpt2s_nt_tile_arch_neon(ELEM, 1, 8, r, n, K, Ar, lda, W, ldw, S, accumulate, Cr, ldc);
    else if (r > 1)
        gpt2s_nt_tile_arch_neon(ELEM, 2, 4, r, n, K, Ar, lda, W, ldw, S, accumulate, Cr, ldc);
}

/* out (rows, cols) = the rows of W widened, 8 at a time (int8, 4-bit: cols % 32 == 0, times
   the block's scale: the portable widening's one rounding; float32 / bfloat16: the last
   cols % 8 by a scalar loop); ldw weights per stored row */
GPT2S_NEON_INLINE void gpt2s_widen_arch_neon(const int ELEM, float *out, int64_t ldo,
        const void *W, int64_t ldw, const uint16_t *S, int rows, int cols) {
    const int BITS = ELEM == GPT2S_ELEM_Q4 ? 4 : ELEM == GPT2S_ELEM_Q8 ? 8 : 16;
    int c8 = cols - cols % 8, nb = cols / 32;
    for (int j = 0; j < rows; j++) {
        const void *row = (const char *)W + (int64_t)j * ldw * BITS / 8;
        float *o = out + (int64_t)j * ldo;
        for (int c = 0; c < c8; c += 8) {
            float32x4_t lo, hi;
            gpt2s_ld8_arch_neon(ELEM, row, c, &lo, &hi);
            if (GPT2S_ELEM_BLOCKED(ELEM)) {
                float d = gpt2s_f16_arch_neon(S[(int64_t)j * nb + c / 32]);
                lo = vmulq_n_f32(lo, d);
                hi = vmulq_n_f32(hi, d);
            }
            vst1q_f32(o + c, lo);
            vst1q_f32(o + c + 4, hi);
        }
        for (int c = c8; c < cols; c++) o[c] = gpt2s_elem_arch_neon(ELEM, row, c);
    }
}

#endif

#endif
