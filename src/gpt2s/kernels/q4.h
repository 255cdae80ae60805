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
   x86-64-v3: direct kernels for 1 to 32 rows: the nt tile of tile.h, and for one row the
   integer kernel of int8 (activations rounded once per call to int16 per block of 32).
   avx512: the same on 512-bit registers (q8.h's avx512 kernels on 4-bit loads). */

#ifndef GPT2S_Q4_H
#define GPT2S_Q4_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>
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

/* C[:, 0:n] (+)= A (M, K) @ W (n, K)^T, W q4 with scales S [n][K/32]: the blocked-type
   kernels of q8.h on 4-bit loads */
GPT2S_V3 static void gpt2s_q4_nt_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    gpt2s_blocked_nt_arch_x86_64_v3(GPT2S_ELEM_Q4, M, n, K, A, lda, W, S, accumulate, C, ldc);
}

GPT2S_V3 static void gpt2s_q4_widen_arch_x86_64_v3(float *out, int64_t ldo, const void *W,
        int64_t ldw, const uint16_t *S, int rows, int cols) {
    gpt2s_blocked_widen_arch_x86_64_v3(GPT2S_ELEM_Q4, out, ldo, W, ldw, S, rows, cols);
}

#endif

#if GPT2S_HAVE_AVX512

GPT2S_V4 static void gpt2s_q4_nt_arch_avx512(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    gpt2s_blocked_nt_arch_avx512(GPT2S_ELEM_Q4, M, n, K, A, lda, W, S, accumulate, C, ldc);
}

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
