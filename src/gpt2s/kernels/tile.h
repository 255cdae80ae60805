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
#endif
