/* 4-bit weights ("q4"): blocks of 32 weights along the reduction dimension K, one fp16 scale
   d per block, weight = d (q - 8) with q in 0..15: llama.cpp's Q4_0 numbers, so a GGUF Q4_0
   tensor holds exactly these weights.  18 bytes per 32 weights (4.5 bits a weight), half the
   bytes of int8: decoding, which reads every weight once per token, reads half as much.

   The scale makes the block's element of largest magnitude m exactly representable: d is the
   fp16 nearest to m / -8, so m maps to q = 0 (-8 d); the others round to the nearest level and
   are clamped to 0..15 (a positive element as large as |m| lands on 15, 7 d: an error of up to
   d, where every other element is within d / 2).

   Layout: output-major like int8 (q4 [N][K / 2] bytes, scales [N][K / 32]): byte j of a block
   holds weight j in its low nibble and weight j + 16 in its high one (GGUF's order too), so
   one 16-byte load and a shift give a block's 32 weights in order.  K must be a multiple of
   32.

   Portable: quantization and the widening of rows into float32 (the panel route).
   x86-64-v3: direct kernels for 1 to 32 rows, integer dot products of the weights with the
   activations rounded to int8 per block of 32 (below), and a vector widening.
   avx-vnni, avx512-vnni: the same kernels (q4_kernels.h, compiled once per level) with each
   pair of blocks' int32 sums from 2 vpdpbusd instead of 2 vpmaddubsw, a vpaddw and a
   vpmaddwd (avx512-vnni: two pairs at a time on 512 bits); avx512 (no VNNI): x86-64-v3's
   instructions, two pairs at a time on 512 bits.  The same integers, then the same float32
   operations in the same order, so x86-64-v3's outputs bit for bit (one definition of the
   products on every x86 CPU). */

#ifndef GPT2S_Q4_H
#define GPT2S_Q4_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>
#include <stdlib.h>
#include "tile.h"
#include "q8.h"   /* the fp16 conversions, GPT2S_Q8_BLOCK (the same 32) */

#define GPT2S_Q4_BLOCK 32

/* ------------------------------------------------------------------ portable */

/* One block of 32 weights x (strided by sk) -> 16 bytes of nibbles and the fp16 scale; 0, or
   -1 when the block holds a non-finite weight or one whose scale exceeds fp16 (|w| > 8 *
   65504). */
static int gpt2s_q4_quantize_block(uint8_t *dst, uint16_t *scale, const float *x, int64_t sk) {
    float m = 0.0f, amax = 0.0f;
    for (int i = 0; i < GPT2S_Q4_BLOCK; i++) {
        float v = x[i * sk], a = fabsf(v);
        if (!(a <= 3.4028234663852886e38f)) return -1;   /* NaN or inf */
        if (a > amax) {
            amax = a;
            m = v;
        }
    }
    if (amax / 8.0f >= 65520.0f) return -1;
    uint16_t h = gpt2s_f32_to_f16_nonneg(amax / 8.0f);
    if (h >= 0x7c00u) return -1;
    if (m > 0.0f) h |= 0x8000u;              /* d = m / -8: the sign opposite to m's */
    *scale = h;
    float d = gpt2s_f16_to_f32(h);
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < 16; i++) {
        int q[2];
        for (int half = 0; half < 2; half++) {
            float r = x[(i + 16 * half) * sk] * id + 8.0f;   /* in [0, 16] */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
            /* round half to even without a libm call: the sum's last bit is worth 1 */
            r = (r + 12582912.0f) - 12582912.0f;
#else
            r = nearbyintf(r);
#endif
            q[half] = r < 0.0f ? 0 : (r > 15.0f ? 15 : (int)r);
        }
        dst[i] = (uint8_t)(q[0] | (q[1] << 4));
    }
    return 0;
}

/* Stored rows [0, N) of K weights, element (n, k) from x[n * sn + k * sk], into q4 [N][K / 2]
   and scales [N][K / 32]; 0, or -1 (a block that cannot be stored; the caller names the
   tensor) */
static int gpt2s_q4_quantize(void *W, uint16_t *scales, const float *x, int64_t N, int64_t K,
                             int64_t sn, int64_t sk) {
    uint8_t *q = (uint8_t *)W;
    int64_t nb = K / GPT2S_Q4_BLOCK;
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++)
            if (gpt2s_q4_quantize_block(q + n * (K / 2) + b * 16, scales + n * nb + b,
                                        x + n * sn + b * GPT2S_Q4_BLOCK * sk, sk) != 0)
                return -1;
    return 0;
}

/* out[r][k] = d(r, k / 32) (q - 8) for `rows` rows of cols weights; ldw: weights per row of
   the stored array (its byte stride is ldw / 2) */
static void gpt2s_q4_widen(float *out, int64_t ldo, const void *W, int64_t ldw,
                           const uint16_t *S, int rows, int cols) {
    int nb = cols / GPT2S_Q4_BLOCK;
    for (int j = 0; j < rows; j++) {
        const uint8_t *qr = (const uint8_t *)W + (int64_t)j * (ldw / 2);
        const uint16_t *sr = S + (int64_t)j * nb;
        float *o = out + (int64_t)j * ldo;
        for (int b = 0; b < nb; b++) {
            float d = gpt2s_f16_to_f32(sr[b]);
            for (int i = 0; i < 16; i++) {
                o[b * 32 + i] = d * (float)((qr[b * 16 + i] & 15) - 8);
                o[b * 32 + i + 16] = d * (float)((qr[b * 16 + i] >> 4) - 8);
            }
        }
    }
}

/* ------------------------------------------------------------------ x86-64-v3 */

#if GPT2S_HAVE_X86_64_V3

/* The integer kernels: 4-bit weights times activations rounded to int8.

   Each row of A is rounded once per call to int8 per block of 32 (llama.cpp's Q8_0 rounding
   of the activations): xq = round(x 127 / m), m = max|x| of the block, dx = m / 127, so
   |x - xq dx| <= dx / 2.  A block's dot product with the weights q (0..15, w = d (q - 8)) is
   then exact in integers: vpmaddubsw (q unsigned x xq signed; a pair's sum <= 2 15 127, two
   such sums added still fit int16) and vpmaddwd by ones give int32 sums P_b, converted and
   multiplied by d_b dx_b (one float32 product) into float lanes.  The weights' offset 8
   comes out once per output: sum_b d_b dx_b (P_b - 8 X_b) = sum_b d_b dx_b P_b - sum_b d_b c_b
   with c_b = dx_b 8 X_b and X_b the block's sum of xq (both sums float32, in a fixed order).

   Two blocks at a time: 32 bytes of W (blocks b, b + 1) and a vpand give the low nibbles
   [w0..15 of b, w0..15 of b + 1], a shift and a vpand the high ones; the rounded row is
   stored in the same order (per pair of blocks: the first 16 of each, then the last 16 of
   each), so the lanes of each product are block b's (0-3) and block b + 1's (4-7), scaled by
   [d_b dx_b x 4, d_b+1 dx_b+1 x 4].  Per 64 weights and W row 3 operations unpack them; per
   row of A, 2 vpmaddubsw, a vpaddw, a vpmaddwd, a conversion and an FMA (and a multiply of
   the two scales, which one row does 8 blocks at a time before the loop): about 4 vector
   operations per 32 weights on one row, where widening them to int16 (the int8 type's
   one-row kernel) takes 15.  An odd last block runs the same on 128-bit registers.

   Every output is computed by the same operations in the same order whatever tile it falls
   in: a row's outputs do not depend on the other rows of A in the call, nor on their number
   (batch decoding and prefill give a row what decoding it alone gives). */

/* where the 16-byte halves of block b of a rounded row go (pairs interleaved, above) */
static inline int64_t gpt2s_q4_xlo(int b, int nb) {
    return (b | 1) < nb ? (int64_t)64 * (b >> 1) + 16 * (b & 1) : (int64_t)32 * b;
}
static inline int64_t gpt2s_q4_xhi(int b, int nb) {
    return gpt2s_q4_xlo(b, nb) + ((b | 1) < nb ? 32 : 16);
}

/* xq (M x K int8, pairs of blocks interleaved), dx, cx (M x K / 32) and dxp (M x K / 64 x 8:
   [dx_b x 4, dx_b+1 x 4] per pair) = the rows of A rounded per block (above); -1 when a row
   holds a non-finite value */
GPT2S_V3_INLINE int gpt2s_q4_round_rows_arch_x86_64_v3(int M, int K, const float *A, int lda,
        int8_t *xq, float *dx, float *cx, float *dxp) {
    int nb = K / GPT2S_Q4_BLOCK, np = nb / 2;
    const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int m = 0; m < M; m++) {
        int8_t *xr = xq + (int64_t)m * K;
        for (int b = 0; b < nb; b++) {
            const float *x = A + (int64_t)m * lda + b * GPT2S_Q4_BLOCK;
            __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
            __m256 x2 = _mm256_loadu_ps(x + 16), x3 = _mm256_loadu_ps(x + 24);
            /* x * 0 is NaN exactly for inf and NaN (max_ps would drop a NaN) */
            __m256 z = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(x0, zero), _mm256_mul_ps(x1, zero)),
                                     _mm256_add_ps(_mm256_mul_ps(x2, zero), _mm256_mul_ps(x3, zero)));
            if (_mm256_movemask_ps(_mm256_cmp_ps(z, z, _CMP_UNORD_Q))) return -1;
            __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, x0), _mm256_andnot_ps(sign, x1)),
                                     _mm256_max_ps(_mm256_andnot_ps(sign, x2), _mm256_andnot_ps(sign, x3)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            float amax = _mm_cvtss_f32(h), d = amax / 127.0f;
            __m256 vi = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(x0, vi));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(x1, vi));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(x2, vi));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(x3, vi));
            /* the packs interleave 128-bit lanes: dwords [0-3 8-11 16-19 24-27 4-7 ...] */
            __m256i p = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)), order);
            _mm_storeu_si128((__m128i *)(xr + gpt2s_q4_xlo(b, nb)), _mm256_castsi256_si128(p));
            _mm_storeu_si128((__m128i *)(xr + gpt2s_q4_xhi(b, nb)), _mm256_extracti128_si256(p, 1));
            __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4e));
            u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0xb1));
            dx[(int64_t)m * nb + b] = d;
            cx[(int64_t)m * nb + b] = d * (float)(8 * _mm_cvtsi128_si32(u));
        }
        for (int q = 0; q < np; q++)
            _mm256_storeu_ps(dxp + ((int64_t)m * np + q) * 8, _mm256_setr_m128(
                _mm_set1_ps(dx[(int64_t)m * nb + 2 * q]), _mm_set1_ps(dx[(int64_t)m * nb + 2 * q + 1])));
    }
    return 0;
}

/* sum_b sw[b] c[b], 8 lanes then the lanes pairwise, then the tail in order */
GPT2S_V3_INLINE float gpt2s_q4_corr_arch_x86_64_v3(const float *sw, const float *c, int nb) {
    __m256 s = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= nb; b += 8)
        s = _mm256_fmadd_ps(_mm256_loadu_ps(sw + b), _mm256_loadu_ps(c + b), s);
    float t = gpt2s_hsum_arch_x86_64_v3(s);
    for (; b < nb; b++) t += sw[b] * c[b];
    return t;
}

/* swp (K / 64 x 8) = [f_b x 4, f_b+1 x 4] per pair of blocks, f = sw (times dx if dx) */
GPT2S_V3_INLINE void gpt2s_q4_pairs_arch_x86_64_v3(float *swp, const float *sw, const float *dx,
                                                   int nb) {
    int np = nb / 2, q = 0;
    const __m256i i0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i i1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    const __m256i i2 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5);
    const __m256i i3 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
    for (; q + 4 <= np; q += 4) {
        __m256 f = _mm256_loadu_ps(sw + 2 * q);
        if (dx) f = _mm256_mul_ps(f, _mm256_loadu_ps(dx + 2 * q));
        _mm256_storeu_ps(swp + 8 * q, _mm256_permutevar8x32_ps(f, i0));
        _mm256_storeu_ps(swp + 8 * q + 8, _mm256_permutevar8x32_ps(f, i1));
        _mm256_storeu_ps(swp + 8 * q + 16, _mm256_permutevar8x32_ps(f, i2));
        _mm256_storeu_ps(swp + 8 * q + 24, _mm256_permutevar8x32_ps(f, i3));
    }
    for (; q < np; q++) {
        float f0 = dx ? sw[2 * q] * dx[2 * q] : sw[2 * q];
        float f1 = dx ? sw[2 * q + 1] * dx[2 * q + 1] : sw[2 * q + 1];
        _mm256_storeu_ps(swp + 8 * q, _mm256_setr_m128(_mm_set1_ps(f0), _mm_set1_ps(f1)));
    }
}

/* A pair of blocks' 8 int32 sums: lane j = the dot product of bytes 4j .. 4j + 3 of lo
   (weights 0..15) with xl plus that of hi with xh (int8), exact: 2 vpmaddubsw (no pair
   saturates), a vpaddw (nor their sum) and a vpmaddwd by ones.  avx-vnni and avx512-vnni
   (below) get the same integers from 2 vpdpbusd. */
GPT2S_V3_INLINE __m256i gpt2s_q4_dot_arch_x86_64_v3(__m256i lo, __m256i xl, __m256i hi,
                                                    __m256i xh) {
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                              _mm256_maddubs_epi16(hi, xh)),
                             _mm256_set1_epi16(1));
}

/* the same for one block on 128 bits (an odd last block: every level runs this one) */
GPT2S_V3_INLINE __m128i gpt2s_q4_dot4_arch_x86_64_v3(__m128i lo, __m128i xl, __m128i hi,
                                                     __m128i xh) {
    return _mm_madd_epi16(_mm_add_epi16(_mm_maddubs_epi16(lo, xl), _mm_maddubs_epi16(hi, xh)),
                          _mm_set1_epi16(1));
}

/* sum_b d_b c_b from the fp16 scales: gpt2s_q4_corr on the same floats, in the same order */
GPT2S_V3_INLINE float gpt2s_q4_corr16_arch_x86_64_v3(const uint16_t *h, const float *c, int nb) {
    __m256 s = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= nb; b += 8)
        s = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + b))),
                            _mm256_loadu_ps(c + b), s);
    float t = gpt2s_hsum_arch_x86_64_v3(s);
    for (; b < nb; b++) t += _cvtsh_ss(h[b]) * c[b];
    return t;
}

/* the tiles, the one-row kernel and the entry point (q4_kernels.h), x86-64-v3's */
#define GPT2S_Q4_A(f) f##_arch_x86_64_v3
#define GPT2S_Q4_INLINE GPT2S_V3_INLINE
#define GPT2S_Q4_FN GPT2S_V3
#include "q4_kernels.h"

GPT2S_V3 static void gpt2s_q4_widen_arch_x86_64_v3(float *out, int64_t ldo, const void *W,
        int64_t ldw, const uint16_t *S, int rows, int cols) {
    gpt2s_blocked_widen_arch_x86_64_v3(GPT2S_ELEM_Q4, out, ldo, W, ldw, S, rows, cols);
}

#endif

/* ------------------------------------------------------------------ avx-vnni, avx512(-vnni) */

#if GPT2S_HAVE_AVX512

/* avx-vnni: x86-64-v3's kernels with each pair of blocks' sums from 2 vpdpbusd (VEX: unsigned
   bytes times signed bytes, 4 products added into each int32 lane) in place of 2 vpmaddubsw,
   a vpaddw and a vpmaddwd: the same int32 lanes, then the same float32 operations in the same
   order, so x86-64-v3's outputs bit for bit.  The widening is x86-64-v3's. */
GPT2S_AVXVNNI_INLINE __m256i gpt2s_q4_dot_arch_avx_vnni(__m256i lo, __m256i xl, __m256i hi,
                                                        __m256i xh) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, xl),
                                   hi, xh);
}
#define GPT2S_Q4_A(f) f##_arch_avx_vnni
#define GPT2S_Q4_INLINE GPT2S_AVXVNNI_INLINE
#define GPT2S_Q4_FN GPT2S_AVXVNNI
#include "q4_kernels.h"

/* avx512 (AVX-512 without VNNI: Skylake-SP / X): the main loops two pairs of blocks a step
   on 512 bits (GPT2S_Q4_WIDE, q4_kernels.h) with x86-64-v3's instructions on zmm, the rest
   x86-64-v3's */
GPT2S_V4_INLINE __m256i gpt2s_q4_dot_arch_avx512(__m256i lo, __m256i xl, __m256i hi,
                                                 __m256i xh) {
    return gpt2s_q4_dot_arch_x86_64_v3(lo, xl, hi, xh);
}
GPT2S_V4_INLINE __m512i gpt2s_q4_dot512_arch_avx512(__m512i lo, __m512i xl, __m512i hi,
                                                    __m512i xh) {
    return _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, xl),
                                              _mm512_maddubs_epi16(hi, xh)),
                             _mm512_set1_epi16(1));
}
#define GPT2S_Q4_A(f) f##_arch_avx512
#define GPT2S_Q4_INLINE GPT2S_V4_INLINE
#define GPT2S_Q4_FN GPT2S_V4
#define GPT2S_Q4_WIDE 1
#include "q4_kernels.h"

/* avx512-vnni: the same with AVX512_VNNI's vpdpbusd, on 512 bits in the main loops and 256
   (EVEX, AVX512VL) elsewhere; the level Cascade Lake, Ice Lake, Sapphire Rapids and Zen 4 / 5
   run */
GPT2S_V4VNNI_INLINE __m256i gpt2s_q4_dot_arch_avx512_vnni(__m256i lo, __m256i xl, __m256i hi,
                                                          __m256i xh) {
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh);
}
GPT2S_V4VNNI_INLINE __m512i gpt2s_q4_dot512_arch_avx512_vnni(__m512i lo, __m512i xl,
                                                             __m512i hi, __m512i xh) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
}
#define GPT2S_Q4_A(f) f##_arch_avx512_vnni
#define GPT2S_Q4_WIDE 1
#define GPT2S_Q4_INLINE GPT2S_V4VNNI_INLINE
#define GPT2S_Q4_FN GPT2S_V4VNNI
#include "q4_kernels.h"

#endif

/* ------------------------------------------------------------------ neon (aarch64) */

#if defined(__aarch64__) && GPT2S_HAVE_NEON

/* neon and neon-dotprod: the blocked-type kernels of q8.h on 4-bit loads (the one-row
   kernels' integer sums exact, the same as int8's rounding of the row) */
GPT2S_NEON static void gpt2s_q4_nt_arch_neon(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    gpt2s_blocked_nt_arch_neon(GPT2S_ELEM_Q4, M, n, K, A, lda, W, S, accumulate, C, ldc);
}

GPT2S_NEON static void gpt2s_q4_widen_arch_neon(float *out, int64_t ldo, const void *W,
        int64_t ldw, const uint16_t *S, int rows, int cols) {
    gpt2s_widen_arch_neon(GPT2S_ELEM_Q4, out, ldo, W, ldw, S, rows, cols);
}

#if GPT2S_HAVE_NEON_DOTPROD
GPT2S_NEON_DP static void gpt2s_q4_nt_arch_neon_dotprod(int M, int n, int K, const float *A,
        int lda, const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    gpt2s_blocked_nt_arch_neon_dotprod(GPT2S_ELEM_Q4, M, n, K, A, lda, W, S, accumulate, C,
                                       ldc);
}
#endif

#endif

#endif
