/* int8 weights ("q8"): symmetric blocks of 32 weights along the reduction dimension K, one
   fp16 scale per block (llama.cpp's Q8_0: 34 bytes per 32 weights, 1.0625 bytes a weight
   against 1.125 with float32 scales; decoding reads every weight byte once per token, so 6%
   fewer bytes are 6% fewer seconds, and F16C widens a scale in one instruction).  A block's
   scale is the smallest fp16 >= max|w| / 127 (rounded up, not to nearest, so no weight ever
   clips: |w - q d| <= d / 2 for every element, fp16 subnormal scales included).

   Layout: always output-major, q [N][K] and scales [N][K / 32]: a Conv1D weight [K, N] is
   transposed once when it is quantized, the embedding [V, C] already is that layout.  Then
   every int8 product, Conv1D or lm_head, streams contiguous rows (the blocks of a [K, N]
   weight would be 32 rows apart), and an output's block sums finish in registers.  K must be
   a multiple of 32 (every GPT-2 width is); _core refuses other K.

   Portable: quantization, and the widening of rows into float32 for the panel route.
   x86-64-v3: direct kernels for 1 to 32 rows (the nt tile of tile.h, and an integer one-row
   kernel) and a vector widening.
   avx-vnni: the one-row kernel with vpdpwssd (AVX-VNNI's fused multiply-add of int16 pairs
   into int32) in place of x86-64-v3's vpmaddwd + vpaddd: the same integers, so the same
   float32 outputs bit for bit; more rows as x86-64-v3.
   avx512: the one-row kernel on 512-bit registers (a block of 32 int16 is one register: one
   vpmaddwd per block and row) and the nt tile of tile.h on 16-float registers.

   What the int8 variants compute, and why not vpdpbusd: every variant rounds the one-row
   activations to int16 per block (below), so all of them stay within x86-64-v3's error
   bound (|x - xq dx| <= max|x| / 65534 per block).  vpdpbusd multiplies unsigned bytes by
   signed bytes: it would need the activations rounded to 8 bits, an error 128 times larger
   (max|x| / 254 per block, llama.cpp's Q8_0 x Q8_0), or an int16 row split into two byte
   halves -- two vpdpbusd, a weight-sum correction for the signed high half and a shift per
   64 weights, more work than one vpmaddwd per 32.  On 512 bits a block is one vpmaddwd, so
   AVX512_VNNI's vpdpwssd has no addition left to fuse (each block's int32 sums are scaled
   before the next block's are added); on 256 bits (AVX-VNNI) it fuses one.  The few-row
   kernels widen each weight to float32 once for all rows and use float32 FMAs: fewer
   operations per weight and row than any integer product that must convert each block's sum
   to float. */

#ifndef GPT2S_Q8_H
#define GPT2S_Q8_H

#include <stdint.h>
#include <string.h>
#include <float.h>
#include <math.h>
#include "tile.h"

#define GPT2S_Q8_BLOCK 32

/* ------------------------------------------------------------------ portable */

static inline float gpt2s_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    float f;
    if (e == 0) {   /* zero or subnormal: man 2^-24, exact in float32 */
        f = (float)man * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    u = sign | (e == 31 ? 0x7f800000u | (man << 13) : ((e + 112u) << 23) | (man << 13));
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* the fp16 nearest to x >= 0 (finite), ties to even; 0x7c00 (inf) past the fp16 range */
static inline uint16_t gpt2s_f32_to_f16_nonneg(float x) {
    if (x >= 65520.0f) return 0x7c00u;
    if (x < 6.103515625e-05f)   /* below 2^-14: subnormal, units of 2^-24 (1024 = 2^-14) */
        return (uint16_t)lrint((double)x * 16777216.0);
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    uint32_t h = ((((u >> 23) & 0xffu) - 112u) << 10) | ((u & 0x7fffffu) >> 13);
    uint32_t rest = u & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;   /* carries into the exponent */
    return (uint16_t)h;
}

/* One block of 32 contiguous weights x -> dst (int8) and its fp16 scale; 0, or -1 when the
   block holds a non-finite weight or one too large for an fp16 scale (|w| > 127 * 65504).
   Straight loops over 32 elements that GCC vectorises (-fno-trapping-math), built twice
   (GPT2S_CLONES): 4-wide double division and rounding on x86-64-v3. */
GPT2S_CLONES static int gpt2s_q8_quantize_block(int8_t *dst, uint16_t *scale, const float *x) {
    float amax = 0.0f;
    int bad = 0;
    for (int i = 0; i < GPT2S_Q8_BLOCK; i++) {
        float a = fabsf(x[i]);
        bad |= !(a <= 3.4028234663852886e38f);   /* NaN or inf */
        amax = a > amax ? a : amax;
    }
    if (bad) return -1;
    /* the smallest fp16 d with 127 d >= amax (in exact arithmetic): no clipping */
    uint16_t h = gpt2s_f32_to_f16_nonneg(amax / 127.0f);
    while (h < 0x7c00u && (double)gpt2s_f16_to_f32(h) * 127.0 < (double)amax) h++;
    if (h >= 0x7c00u) return -1;
    *scale = h;
    double d = gpt2s_f16_to_f32(h);
    if (d == 0.0) {           /* an all-zero block */
        memset(dst, 0, GPT2S_Q8_BLOCK);
        return 0;
    }
    for (int i = 0; i < GPT2S_Q8_BLOCK; i++) {
        double r = (double)x[i] / d;
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
        /* round half to even, as nearbyint in the default mode, without its libm call:
           adding and subtracting 1.5 * 2^52 leaves the integer nearest to |r| <= 127 + 1/2
           (the sum's last bit is worth 1) */
        r = (r + 6755399441055744.0) - 6755399441055744.0;
#else   /* x87 excess precision would keep the fraction */
        r = nearbyint(r);
#endif
        r = r > 127.0 ? 127.0 : (r < -127.0 ? -127.0 : r);
        dst[i] = (int8_t)(int)r;
    }
    return 0;
}

/* Stored rows [0, N) of a weight whose element (n, k) is x[n * sn + k * sk] into q [N][K]
   and scales [N][K/32].  K % 32 == 0.  0, or -1 when a block holds a non-finite weight or
   one too large for an fp16 scale (the caller names the tensor).  Blocks are visited
   block-row by block-row so that a [K, N] weight (sn = 1, sk = N) reads 32 of its rows at a
   time, which stay in cache; a strided block is gathered into a contiguous copy first. */
static int gpt2s_q8_quantize(void *W, uint16_t *scales, const float *x, int64_t N, int64_t K,
                             int64_t sn, int64_t sk) {
    int8_t *q = (int8_t *)W;
    int64_t nb = K / GPT2S_Q8_BLOCK;
    float tmp[GPT2S_Q8_BLOCK];
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t n = 0; n < N; n++) {
            const float *src = x + n * sn + b * GPT2S_Q8_BLOCK * sk;
            if (sk != 1) {
                for (int i = 0; i < GPT2S_Q8_BLOCK; i++) tmp[i] = src[i * sk];
                src = tmp;
            }
            if (gpt2s_q8_quantize_block(q + n * K + b * GPT2S_Q8_BLOCK, scales + n * nb + b,
                                        src) != 0)
                return -1;
        }
    }
    return 0;
}

/* out[r][k] = q[r][k] * scale(r, k / 32) for `rows` rows of K = cols weights (ldw = K: the
   rows of q are contiguous; S the scales of row 0) */
static void gpt2s_q8_widen(float *out, int64_t ldo, const void *W, int64_t ldw,
                           const uint16_t *S, int rows, int cols) {
    int nb = cols / GPT2S_Q8_BLOCK;
    for (int j = 0; j < rows; j++) {
        const int8_t *qr = (const int8_t *)W + (int64_t)j * ldw;
        const uint16_t *sr = S + (int64_t)j * nb;
        float *o = out + (int64_t)j * ldo;
        for (int b = 0; b < nb; b++) {
            float d = gpt2s_f16_to_f32(sr[b]);
            for (int i = 0; i < GPT2S_Q8_BLOCK; i++)
                o[b * GPT2S_Q8_BLOCK + i] = d * (float)qr[b * GPT2S_Q8_BLOCK + i];
        }
    }
}

/* ------------------------------------------------------------------ x86-64-v3 */

#if GPT2S_HAVE_X86_64_V3

/* One row of a blocked type (batch-1 decoding).  Widening every weight to float32 costs 4
   operations per 8 weights (sign-extend, convert, scale, FMA) and one row leaves nothing to
   share them with: compute bound below the memory bandwidth.  Instead the row is rounded once
   per call to int16 per block of 32, xq = round(x / dx), dx = max|x| / 32767 (|x - xq dx| <=
   dx / 2: relative 2^-16 of the block's largest element, far below the weights' own
   rounding), and each block of a W row is an exact integer dot product: its weights as
   2 x 16 int16, vpmaddwd against xq, add, convert, one FMA by d_w dx -- 8 vector operations
   per 32 int8 weights instead of 16.  (llama.cpp rounds the activations to int8; int16 keeps
   them float32-accurate at the same cost on AVX2, whose vpmaddubsw would need the weights
   unsigned.)  xq and dx: K and K / 32 elements of scratch.

   round_row: xq (K) = a rounded to int16 per block of 32, dx (K / 32) the blocks' steps; -1
   when the row is not finite. */
GPT2S_V3_INLINE int gpt2s_q8_round_row_arch_x86_64_v3(int K, const float *a, int16_t *xq,
                                                      float *dx) {
    int nb = K / GPT2S_Q8_BLOCK;
    for (int b = 0; b < nb; b++) {
        const float *x = a + b * GPT2S_Q8_BLOCK;
        __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
        __m256 x2 = _mm256_loadu_ps(x + 16), x3 = _mm256_loadu_ps(x + 24);
        __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, x0), _mm256_andnot_ps(sign, x1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, x2), _mm256_andnot_ps(sign, x3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        /* x * 0 is NaN exactly for inf and NaN (max_ps would drop a NaN): the float path */
        __m256 zero = _mm256_setzero_ps();
        __m256 z = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(x0, zero), _mm256_mul_ps(x1, zero)),
                                 _mm256_add_ps(_mm256_mul_ps(x2, zero), _mm256_mul_ps(x3, zero)));
        if (_mm256_movemask_ps(_mm256_cmp_ps(z, z, _CMP_UNORD_Q))) return -1;
        float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        dx[b] = amax / 32767.0f;
        __m256 vi = _mm256_set1_ps(inv);
        __m256i p0 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(x0, vi)),
                                        _mm256_cvtps_epi32(_mm256_mul_ps(x1, vi)));
        __m256i p1 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(x2, vi)),
                                        _mm256_cvtps_epi32(_mm256_mul_ps(x3, vi)));
        /* packs interleaves 128-bit lanes: [0-3, 8-11, 4-7, 12-15] -> natural order */
        _mm256_storeu_si256((__m256i *)(xq + b * 32), _mm256_permute4x64_epi64(p0, 0xD8));
        _mm256_storeu_si256((__m256i *)(xq + b * 32 + 16), _mm256_permute4x64_epi64(p1, 0xD8));
    }
    return 0;
}

/* a block's 32 weights as int16, in order (lo: 0-15, hi: 16-31); e: the block's first weight
   in a row-major array of blocks (int8: a byte each; 4-bit: tile.h's nibble order) */
GPT2S_V3_INLINE void gpt2s_block_i16_arch_x86_64_v3(const int ELEM, const void *W, int64_t e,
                                                    __m256i *lo, __m256i *hi) {
    if (ELEM == GPT2S_ELEM_Q4) {
        __m128i b = _mm_loadu_si128((const __m128i *)gpt2s_q4_byte(W, e));
        __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
        *lo = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(b, mask), eight));
        *hi = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask),
                                                eight));
    } else {
        const int8_t *q = (const int8_t *)W + e;
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
    }
}

/* c[0:n] (+)= a (K) @ W^T, W (n, K) of a blocked type (ELEM_Q8 or ELEM_Q4, scales S
   [n][K / 32]), one row: the int16 kernel above, the row rounded by round_row; 4 rows of W at
   a time, one contiguous run of memory read a block of each row at a step and prefetched
   2 KiB ahead.  Returns -1 (nothing written) when the row is not finite. */
GPT2S_V3_INLINE int gpt2s_nt1_i16_arch_x86_64_v3(const int ELEM, int n, int K, const float *a,
        const void *W, const uint16_t *S, int accumulate, float *c, int16_t *xq, float *dx) {
    const int BLOCK_BYTES = ELEM == GPT2S_ELEM_Q4 ? 16 : 32;
    int nb = K / GPT2S_Q8_BLOCK;
    if (gpt2s_q8_round_row_arch_x86_64_v3(K, a, xq, dx) != 0) return -1;
    for (int v = 0; v < n; v += 4) {
        int vr = n - v < 4 ? n - v : 4;
        int64_t e0 = (int64_t)v * K;   /* the first weight of each of the tile's rows */
        int64_t e1 = GPT2S_ROW(e0, 1, vr, K), e2 = GPT2S_ROW(e0, 2, vr, K);
        int64_t e3 = GPT2S_ROW(e0, 3, vr, K);
        const char *bytes0 = (const char *)W + e0 * BLOCK_BYTES / 32;
        const uint16_t *d0 = S + (int64_t)v * nb;
        const uint16_t *d1 = GPT2S_ROW(d0, 1, vr, nb), *d2 = GPT2S_ROW(d0, 2, vr, nb);
        const uint16_t *d3 = GPT2S_ROW(d0, 3, vr, nb);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int prefetch = v + 8 <= n;
        for (int b = 0; b < nb; b++) {
            int k = b * GPT2S_Q8_BLOCK;
            __m256i xa = _mm256_loadu_si256((const __m256i *)(xq + k));
            __m256i xb = _mm256_loadu_si256((const __m256i *)(xq + k + 16));
            float db = dx[b];
            if (prefetch)
                for (int off = 0; off < 4 * BLOCK_BYTES; off += 64)
                    __builtin_prefetch(bytes0 + 4 * BLOCK_BYTES * (int64_t)b + 2048 + off);
#define GPT2S_I16_ROW(er, dr, sr) do { \
                __m256i lo, hi; \
                gpt2s_block_i16_arch_x86_64_v3(ELEM, W, (er) + k, &lo, &hi); \
                __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo, xa), _mm256_madd_epi16(hi, xb)); \
                sr = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss((dr)[b]) * db), sr); \
            } while (0)
            GPT2S_I16_ROW(e0, d0, s0);
            GPT2S_I16_ROW(e1, d1, s1);
            GPT2S_I16_ROW(e2, d2, s2);
            GPT2S_I16_ROW(e3, d3, s3);
#undef GPT2S_I16_ROW
        }
        float t[4] = {gpt2s_hsum_arch_x86_64_v3(s0), gpt2s_hsum_arch_x86_64_v3(s1),
                      gpt2s_hsum_arch_x86_64_v3(s2), gpt2s_hsum_arch_x86_64_v3(s3)};
        for (int r = 0; r < vr; r++) c[v + r] = accumulate ? c[v + r] + t[r] : t[r];
    }
    return 0;
}

/* C[:, 0:n] (+)= A (M, K) @ W (n, K)^T for a blocked type: one row by the int16 kernel, more
   rows by the nt tile of tile.h (1 x 8, 2 x 4, 4 x 2 tiles by rows of A) */
GPT2S_V3_INLINE void gpt2s_blocked_nt_arch_x86_64_v3(const int ELEM, int M, int n, int K,
        const float *A, int lda, const void *W, const uint16_t *S, int accumulate, float *C,
        int ldc) {
    if (M == 1 && K <= 16384) {   /* scratch on the stack: 32 KiB + 2 KiB at most */
        int16_t xq[16384] __attribute__((aligned(32)));
        float dx[16384 / GPT2S_Q8_BLOCK];
        if (gpt2s_nt1_i16_arch_x86_64_v3(ELEM, n, K, A, W, S, accumulate, C, xq, dx) == 0)
            return;
    }
    if (M == 1)
        gpt2s_nt_tile_arch_x86_64_v3(ELEM, 1, 8, M, n, K, A, lda, W, K, S, accumulate, C, ldc);
    else if (M < 4)
        gpt2s_nt_tile_arch_x86_64_v3(ELEM, 2, 4, M, n, K, A, lda, W, K, S, accumulate, C, ldc);
    else
        gpt2s_nt_tile_arch_x86_64_v3(ELEM, 4, 2, M, n, K, A, lda, W, K, S, accumulate, C, ldc);
}

/* out (rows, cols) = the rows of a blocked type widened, 8 at a time (the portable widen of
   the type, vectorised): ldw weights per stored row */
GPT2S_V3_INLINE void gpt2s_blocked_widen_arch_x86_64_v3(const int ELEM, float *out,
        int64_t ldo, const void *W, int64_t ldw, const uint16_t *S, int rows, int cols) {
    const int BITS = ELEM == GPT2S_ELEM_Q4 ? 4 : 8;
    int nb = cols / GPT2S_Q8_BLOCK;
    for (int j = 0; j < rows; j++) {
        const void *row = (const char *)W + (int64_t)j * ldw * BITS / 8;
        const uint16_t *sr = S + (int64_t)j * nb;
        float *o = out + (int64_t)j * ldo;
        for (int b = 0; b < nb; b++) {
            __m256 d = _mm256_set1_ps(_cvtsh_ss(sr[b]));
            for (int c = 0; c < GPT2S_Q8_BLOCK; c += 8)
                _mm256_storeu_ps(o + b * GPT2S_Q8_BLOCK + c, _mm256_mul_ps(
                    d, gpt2s_ld8_arch_x86_64_v3(ELEM, row, b * GPT2S_Q8_BLOCK + c)));
        }
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W (n, K)^T, W q8 (ldw = K) with scales S [n][K/32] */
GPT2S_V3 static void gpt2s_q8_nt_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    gpt2s_blocked_nt_arch_x86_64_v3(GPT2S_ELEM_Q8, M, n, K, A, lda, W, S, accumulate, C, ldc);
}

GPT2S_V3 static void gpt2s_q8_widen_arch_x86_64_v3(float *out, int64_t ldo, const void *W,
        int64_t ldw, const uint16_t *S, int rows, int cols) {
    gpt2s_blocked_widen_arch_x86_64_v3(GPT2S_ELEM_Q8, out, ldo, W, ldw, S, rows, cols);
}

#endif

/* ------------------------------------------------------------------ avx-vnni */

#if GPT2S_HAVE_AVX512

/* x86-64-v3's one-row kernel, each block's dot product one vpmaddwd and one vpdpwssd */
GPT2S_AVXVNNI_INLINE int gpt2s_nt1_i16_arch_avx_vnni(const int ELEM, int n, int K,
        const float *a, const void *W, const uint16_t *S, int accumulate, float *c,
        int16_t *xq, float *dx) {
    const int BLOCK_BYTES = ELEM == GPT2S_ELEM_Q4 ? 16 : 32;
    int nb = K / GPT2S_Q8_BLOCK;
    if (gpt2s_q8_round_row_arch_x86_64_v3(K, a, xq, dx) != 0) return -1;
    for (int v = 0; v < n; v += 4) {
        int vr = n - v < 4 ? n - v : 4;
        int64_t e0 = (int64_t)v * K;
        int64_t e1 = GPT2S_ROW(e0, 1, vr, K), e2 = GPT2S_ROW(e0, 2, vr, K);
        int64_t e3 = GPT2S_ROW(e0, 3, vr, K);
        const char *bytes0 = (const char *)W + e0 * BLOCK_BYTES / 32;
        const uint16_t *d0 = S + (int64_t)v * nb;
        const uint16_t *d1 = GPT2S_ROW(d0, 1, vr, nb), *d2 = GPT2S_ROW(d0, 2, vr, nb);
        const uint16_t *d3 = GPT2S_ROW(d0, 3, vr, nb);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int prefetch = v + 8 <= n;
        for (int b = 0; b < nb; b++) {
            int k = b * GPT2S_Q8_BLOCK;
            __m256i xa = _mm256_loadu_si256((const __m256i *)(xq + k));
            __m256i xb = _mm256_loadu_si256((const __m256i *)(xq + k + 16));
            float db = dx[b];
            if (prefetch)
                for (int off = 0; off < 4 * BLOCK_BYTES; off += 64)
                    __builtin_prefetch(bytes0 + 4 * BLOCK_BYTES * (int64_t)b + 2048 + off);
#define GPT2S_I16_ROW(er, dr, sr) do { \
                __m256i lo, hi; \
                gpt2s_block_i16_arch_x86_64_v3(ELEM, W, (er) + k, &lo, &hi); \
                __m256i p = _mm256_dpwssd_avx_epi32(_mm256_madd_epi16(lo, xa), hi, xb); \
                sr = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss((dr)[b]) * db), sr); \
            } while (0)
            GPT2S_I16_ROW(e0, d0, s0);
            GPT2S_I16_ROW(e1, d1, s1);
            GPT2S_I16_ROW(e2, d2, s2);
            GPT2S_I16_ROW(e3, d3, s3);
#undef GPT2S_I16_ROW
        }
        float t[4] = {gpt2s_hsum_arch_x86_64_v3(s0), gpt2s_hsum_arch_x86_64_v3(s1),
                      gpt2s_hsum_arch_x86_64_v3(s2), gpt2s_hsum_arch_x86_64_v3(s3)};
        for (int r = 0; r < vr; r++) c[v + r] = accumulate ? c[v + r] + t[r] : t[r];
    }
    return 0;
}

GPT2S_AVXVNNI_INLINE void gpt2s_blocked_nt_arch_avx_vnni(const int ELEM, int M, int n, int K,
        const float *A, int lda, const void *W, const uint16_t *S, int accumulate, float *C,
        int ldc) {
    if (M == 1 && K <= 16384) {
        int16_t xq[16384] __attribute__((aligned(32)));
        float dx[16384 / GPT2S_Q8_BLOCK];
        if (gpt2s_nt1_i16_arch_avx_vnni(ELEM, n, K, A, W, S, accumulate, C, xq, dx) == 0)
            return;
    }
    gpt2s_blocked_nt_arch_x86_64_v3(ELEM, M, n, K, A, lda, W, S, accumulate, C, ldc);
}

GPT2S_AVXVNNI static void gpt2s_q8_nt_arch_avx_vnni(int M, int n, int K, const float *A,
        int lda, const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    gpt2s_blocked_nt_arch_avx_vnni(GPT2S_ELEM_Q8, M, n, K, A, lda, W, S, accumulate, C, ldc);
}

/* ------------------------------------------------------------------ avx512 */

/* a block's 32 weights as 32 int16 in order */
GPT2S_V4_INLINE __m512i gpt2s_block_i16_arch_avx512(const int ELEM, const void *W, int64_t e) {
    if (ELEM == GPT2S_ELEM_Q4) {
        __m128i b = _mm_loadu_si128((const __m128i *)gpt2s_q4_byte(W, e));
        __m128i mask = _mm_set1_epi8(15);
        __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, mask)),
                                            _mm_and_si128(_mm_srli_epi16(b, 4), mask), 1);
        return _mm512_sub_epi16(_mm512_cvtepu8_epi16(q), _mm512_set1_epi16(8));
    }
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)((const int8_t *)W + e)));
}

/* x86-64-v3's one-row kernel (the row rounded to int16 by the same round_row) on 512 bits:
   per block and W row one vpmaddwd, a conversion and an FMA by the block's d_w dx, which is
   computed 16 blocks at a time before the row's loop (ds: 4 x K / 32 floats of scratch) */
GPT2S_V4_INLINE int gpt2s_nt1_i16_arch_avx512(const int ELEM, int n, int K, const float *a,
        const void *W, const uint16_t *S, int accumulate, float *c, int16_t *xq, float *dx,
        float *ds) {
    const int BLOCK_BYTES = ELEM == GPT2S_ELEM_Q4 ? 16 : 32;
    int nb = K / GPT2S_Q8_BLOCK;
    if (gpt2s_q8_round_row_arch_x86_64_v3(K, a, xq, dx) != 0) return -1;
    for (int v = 0; v < n; v += 4) {
        int vr = n - v < 4 ? n - v : 4;
        int64_t e[4];
        for (int r = 0; r < 4; r++) {
            e[r] = (int64_t)(v + (vr > r ? r : 0)) * K;
            const uint16_t *d = S + (e[r] / K) * nb;
            for (int b = 0; b < nb; b += 16) {
                __mmask16 m = gpt2s_mask16(nb - b);
                __m512 sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, d + b));
                _mm512_mask_storeu_ps(ds + r * nb + b, m,
                                      _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(m, dx + b)));
            }
        }
        const char *bytes0 = (const char *)W + e[0] * BLOCK_BYTES / 32;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int prefetch = v + 8 <= n;
        for (int b = 0; b < nb; b++) {
            int k = b * GPT2S_Q8_BLOCK;
            __m512i x = _mm512_loadu_si512(xq + k);
            if (prefetch)
                for (int off = 0; off < 4 * BLOCK_BYTES; off += 64)
                    __builtin_prefetch(bytes0 + 4 * BLOCK_BYTES * (int64_t)b + 2048 + off);
#define GPT2S_I16_ROW(r, sr) \
            sr = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16( \
                     gpt2s_block_i16_arch_avx512(ELEM, W, e[r] + k), x)), \
                 _mm512_set1_ps(ds[r * nb + b]), sr)
            GPT2S_I16_ROW(0, s0);
            GPT2S_I16_ROW(1, s1);
            GPT2S_I16_ROW(2, s2);
            GPT2S_I16_ROW(3, s3);
#undef GPT2S_I16_ROW
        }
        float t[4] = {_mm512_reduce_add_ps(s0), _mm512_reduce_add_ps(s1),
                      _mm512_reduce_add_ps(s2), _mm512_reduce_add_ps(s3)};
        for (int r = 0; r < vr; r++) c[v + r] = accumulate ? c[v + r] + t[r] : t[r];
    }
    return 0;
}

/* C[:, 0:n] (+)= A (M, K) @ W (n, K)^T for a blocked type: one row by the int16 kernel, more
   rows by the 16-float nt tile */
GPT2S_V4_INLINE void gpt2s_blocked_nt_arch_avx512(const int ELEM, int M, int n, int K,
        const float *A, int lda, const void *W, const uint16_t *S, int accumulate, float *C,
        int ldc) {
    if (M == 1 && K <= 16384) {   /* scratch on the stack: 32 + 2 + 8 KiB at most */
        int16_t xq[16384] __attribute__((aligned(64)));
        float dx[16384 / GPT2S_Q8_BLOCK], ds[4 * 16384 / GPT2S_Q8_BLOCK];
        if (gpt2s_nt1_i16_arch_avx512(ELEM, n, K, A, W, S, accumulate, C, xq, dx, ds) == 0)
            return;
    }
    gpt2s_nt_arch_avx512(ELEM, M, n, K, A, lda, W, K, S, accumulate, C, ldc);
}

GPT2S_V4 static void gpt2s_q8_nt_arch_avx512(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    gpt2s_blocked_nt_arch_avx512(GPT2S_ELEM_Q8, M, n, K, A, lda, W, S, accumulate, C, ldc);
}

#endif
/* ------------------------------------------------------------------ neon (aarch64) */

#if defined(__aarch64__) && GPT2S_HAVE_NEON

/* neon: x86-64-v3's kernels on 128-bit registers.  One row: the row rounded to int16 per
   block of 32 by the same rule (the same integers), each block's dot product with a W row an
   exact int32 sum (smull / smlal of int16 pairs), the sums of 4 W rows gathered into one
   register (addp, exact), converted and multiplied by d_w dx.  More rows: the nt tile of
   tile.h.  neon-dotprod: the one-row kernel on sdot / udot (below). */

/* x86-64-v3's rounding of the row: xq (K) = round half to even of x 32767 / max|x| per block
   of 32, dx (K / 32) = max|x| / 32767; -1 when the row is not finite (fmax keeps a NaN) */
GPT2S_NEON_INLINE int gpt2s_q8_round_row_arch_neon(int K, const float *a, int16_t *xq,
                                                   float *dx) {
    int nb = K / GPT2S_Q8_BLOCK;
    for (int b = 0; b < nb; b++) {
        const float *x = a + b * GPT2S_Q8_BLOCK;
        float32x4_t v[8], m = vdupq_n_f32(0.0f);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            v[i] = vld1q_f32(x + 4 * i);
            m = vmaxq_f32(m, vabsq_f32(v[i]));
        }
        float amax = vmaxvq_f32(m);
        if (!(amax <= 3.4028234663852886e38f)) return -1;
        float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        dx[b] = amax / 32767.0f;
#pragma GCC unroll 4
        for (int i = 0; i < 8; i += 2)
            vst1q_s16(xq + b * GPT2S_Q8_BLOCK + 4 * i,
                      vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(v[i], inv))),
                                   vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(v[i + 1], inv)))));
    }
    return 0;
}

/* a block's 32 weights as 4 x 8 int16, in order; e: the block's first weight in a row-major
   array of blocks (int8: a byte each; 4-bit: tile.h's nibble order) */
GPT2S_NEON_INLINE void gpt2s_block_i16_arch_neon(const int ELEM, const void *W, int64_t e,
                                                 int16x8_t *q) {
    int8x16_t lo, hi;   /* weights 0-15, 16-31 */
    if (ELEM == GPT2S_ELEM_Q4) {
        uint8x16_t b = vld1q_u8(gpt2s_q4_byte(W, e));
        lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(15))), vdupq_n_s8(8));
        hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(b, 4)), vdupq_n_s8(8));
    } else {
        lo = vld1q_s8((const int8_t *)W + e);
        hi = vld1q_s8((const int8_t *)W + e + 16);
    }
    q[0] = vmovl_s8(vget_low_s8(lo));
    q[1] = vmovl_high_s8(lo);
    q[2] = vmovl_s8(vget_low_s8(hi));
    q[3] = vmovl_high_s8(hi);
}

/* s (lane r: W row r of 4) += each row's block sum times its scale d_r dx: p[r]'s lanes add
   up to row r's exact integer dot product with the block of the row */
GPT2S_NEON_INLINE float32x4_t gpt2s_q8_acc4_arch_neon(float32x4_t s, const int32x4_t *p,
        const uint16_t *const *d, int b, float db) {
    int32x4_t t = vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3]));
    uint16x4_t h = vdup_n_u16(d[0][b]);
    h = vset_lane_u16(d[1][b], h, 1);
    h = vset_lane_u16(d[2][b], h, 2);
    h = vset_lane_u16(d[3][b], h, 3);
    float32x4_t sc = vmulq_n_f32(vcvt_f32_f16(vreinterpret_f16_u16(h)), db);
    return vfmaq_f32(s, vcvtq_f32_s32(t), sc);
}

/* the 4 rows of W from row v on (rows past n repeat row v: computed, never stored): their
   first weights e[r] and scales d[r] */
GPT2S_NEON_INLINE void gpt2s_rows4_arch_neon(int v, int n, int K, const uint16_t *S,
                                             int64_t *e, const uint16_t **d) {
    int vr = n - v < 4 ? n - v : 4, nb = K / GPT2S_Q8_BLOCK;
    for (int r = 0; r < 4; r++) {
        int64_t row = v + (vr > r ? r : 0);
        e[r] = row * K;
        d[r] = S + row * nb;
    }
}

/* c[0:n] (+)= a (K) @ W^T, W (n, K) of a blocked type, one row: 4 rows of W at a time, a
   block of each per step, 1 KiB ahead prefetched.  -1 (nothing written) when the row is not
   finite. */
GPT2S_NEON_INLINE int gpt2s_nt1_i16_arch_neon(const int ELEM, int n, int K, const float *a,
        const void *W, const uint16_t *S, int accumulate, float *c, int16_t *xq, float *dx) {
    const int BLOCK_BYTES = ELEM == GPT2S_ELEM_Q4 ? 16 : 32;
    int nb = K / GPT2S_Q8_BLOCK;
    if (gpt2s_q8_round_row_arch_neon(K, a, xq, dx) != 0) return -1;
    for (int v = 0; v < n; v += 4) {
        int64_t e[4];
        const uint16_t *d[4];
        gpt2s_rows4_arch_neon(v, n, K, S, e, d);
        float32x4_t s = vdupq_n_f32(0.0f);
        for (int b = 0; b < nb; b++) {
            int k = b * GPT2S_Q8_BLOCK;
            int16x8_t x[4];
            int32x4_t p[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) x[i] = vld1q_s16(xq + k + 8 * i);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                int16x8_t q[4];
                __builtin_prefetch((const char *)W + (e[r] + k) * BLOCK_BYTES / 32 + 1024);
                gpt2s_block_i16_arch_neon(ELEM, W, e[r] + k, q);
                int32x4_t t = vmull_s16(vget_low_s16(q[0]), vget_low_s16(x[0]));
                t = vmlal_high_s16(t, q[0], x[0]);
#pragma GCC unroll 3
                for (int i = 1; i < 4; i++) {
                    t = vmlal_s16(t, vget_low_s16(q[i]), vget_low_s16(x[i]));
                    t = vmlal_high_s16(t, q[i], x[i]);
                }
                p[r] = t;
            }
            s = gpt2s_q8_acc4_arch_neon(s, p, d, b, dx[b]);
        }
        float t[4];
        vst1q_f32(t, s);
        for (int r = 0; r < 4 && v + r < n; r++) c[v + r] = accumulate ? c[v + r] + t[r] : t[r];
    }
    return 0;
}

/* C[:, 0:n] (+)= A (M, K) @ W (n, K)^T for a blocked type: one row by the int16 kernel, more
   rows (or a row that is not finite) by the nt tile of tile.h */
GPT2S_NEON_INLINE void gpt2s_blocked_nt_arch_neon(const int ELEM, int M, int n, int K,
        const float *A, int lda, const void *W, const uint16_t *S, int accumulate, float *C,
        int ldc) {
    if (M == 1 && K <= 16384) {   /* scratch on the stack: 32 KiB + 2 KiB at most */
        int16_t xq[16384] __attribute__((aligned(16)));
        float dx[16384 / GPT2S_Q8_BLOCK];
        if (gpt2s_nt1_i16_arch_neon(ELEM, n, K, A, W, S, accumulate, C, xq, dx) == 0) return;
    }
    gpt2s_nt_arch_neon(ELEM, M, n, K, A, lda, W, K, S, accumulate, C, ldc);
}

GPT2S_NEON static void gpt2s_q8_nt_arch_neon(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    gpt2s_blocked_nt_arch_neon(GPT2S_ELEM_Q8, M, n, K, A, lda, W, S, accumulate, C, ldc);
}

GPT2S_NEON static void gpt2s_q8_widen_arch_neon(float *out, int64_t ldo, const void *W,
        int64_t ldw, const uint16_t *S, int rows, int cols) {
    gpt2s_widen_arch_neon(GPT2S_ELEM_Q8, out, ldo, W, ldw, S, rows, cols);
}

/* ------------------------------------------------------------------ neon-dotprod */

#if GPT2S_HAVE_NEON_DOTPROD

/* The one-row kernel on sdot / udot (4 products of bytes into each int32 lane, 16 per
   instruction), on the same int16 row as neon's, so the same integer sums: each int16 of the
   row is split into bytes, xq = 256 xh + xl with xh = xq >> 8 (signed, -128..127) and xl =
   xq & 255 (unsigned), and a block's dot product with int8 weights w is
       w . xq = 256 sdot(w, xh) + udot(w + 128, xl) - 128 sum(xl)
   (w + 128 = w ^ 0x80 as an unsigned byte), with 4-bit codes q (w = q - 8)
       w . xq = 256 sdot(q, xh) + udot(q, xl) - 8 sum(xq).
   The correction depends on the row only: computed once per call (corr, per block) and
   added as the starting value of lane 0 of the udot sums (uint32 wraps; the total is an
   exact int32).  4 dot instructions per block of 32 and W row, where neon needs 8 multiply-
   adds and 4 widenings.  (8-bit activations, one sdot per 16 weights, would round the row
   128 times more coarsely: q8.h's header.)

   split_row: the row rounded as neon's round_row, then each block's 32 int16 rewritten in
   place as its 32 xh then its 32 xl bytes; corr[b] the block's correction.  -1 when the row
   is not finite. */
GPT2S_NEON_DP_INLINE int gpt2s_q8_split_row_arch_neon_dotprod(const int ELEM, int K,
        const float *a, int16_t *xq, float *dx, int32_t *corr) {
    int nb = K / GPT2S_Q8_BLOCK;
    if (gpt2s_q8_round_row_arch_neon(K, a, xq, dx) != 0) return -1;
    for (int b = 0; b < nb; b++) {
        int16_t *x = xq + b * GPT2S_Q8_BLOCK;
        int16x8_t q0 = vld1q_s16(x), q1 = vld1q_s16(x + 8), q2 = vld1q_s16(x + 16);
        int16x8_t q3 = vld1q_s16(x + 24);
        uint8x16_t l0 = vcombine_u8(vmovn_u16(vreinterpretq_u16_s16(q0)),
                                    vmovn_u16(vreinterpretq_u16_s16(q1)));
        uint8x16_t l1 = vcombine_u8(vmovn_u16(vreinterpretq_u16_s16(q2)),
                                    vmovn_u16(vreinterpretq_u16_s16(q3)));
        int8x16_t h0 = vcombine_s8(vshrn_n_s16(q0, 8), vshrn_n_s16(q1, 8));
        int8x16_t h1 = vcombine_s8(vshrn_n_s16(q2, 8), vshrn_n_s16(q3, 8));
        if (ELEM == GPT2S_ELEM_Q4)
            corr[b] = -8 * (vaddlvq_s16(q0) + vaddlvq_s16(q1) + vaddlvq_s16(q2)
                            + vaddlvq_s16(q3));
        else
            corr[b] = -128 * (int32_t)(vaddlvq_u8(l0) + vaddlvq_u8(l1));
        int8_t *out = (int8_t *)x;
        vst1q_s8(out, h0);
        vst1q_s8(out + 16, h1);
        vst1q_u8((uint8_t *)out + 32, l0);
        vst1q_u8((uint8_t *)out + 48, l1);
    }
    return 0;
}

GPT2S_NEON_DP_INLINE int gpt2s_nt1_dot_arch_neon_dotprod(const int ELEM, int n, int K,
        const float *a, const void *W, const uint16_t *S, int accumulate, float *c,
        int16_t *xq, float *dx, int32_t *corr) {
    const int BLOCK_BYTES = ELEM == GPT2S_ELEM_Q4 ? 16 : 32;
    int nb = K / GPT2S_Q8_BLOCK;
    if (gpt2s_q8_split_row_arch_neon_dotprod(ELEM, K, a, xq, dx, corr) != 0) return -1;
    const int32x4_t zero = vdupq_n_s32(0);
    for (int v = 0; v < n; v += 4) {
        int64_t e[4];
        const uint16_t *d[4];
        gpt2s_rows4_arch_neon(v, n, K, S, e, d);
        float32x4_t s = vdupq_n_f32(0.0f);
        for (int b = 0; b < nb; b++) {
            const int8_t *x = (const int8_t *)(xq + b * GPT2S_Q8_BLOCK);
            int8x16_t h0 = vld1q_s8(x), h1 = vld1q_s8(x + 16);
            uint8x16_t l0 = vld1q_u8((const uint8_t *)x + 32);
            uint8x16_t l1 = vld1q_u8((const uint8_t *)x + 48);
            uint32x4_t cv = vsetq_lane_u32((uint32_t)corr[b], vdupq_n_u32(0), 0);
            int32x4_t p[4];
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                int64_t k = e[r] + b * GPT2S_Q8_BLOCK;
                int32x4_t hi;
                uint32x4_t lo;
                __builtin_prefetch((const char *)W + k * BLOCK_BYTES / 32 + 1024);
                if (ELEM == GPT2S_ELEM_Q4) {
                    uint8x16_t bq = vld1q_u8(gpt2s_q4_byte(W, k));
                    uint8x16_t q0 = vandq_u8(bq, vdupq_n_u8(15)), q1 = vshrq_n_u8(bq, 4);
                    hi = vdotq_s32(vdotq_s32(zero, vreinterpretq_s8_u8(q0), h0),
                                   vreinterpretq_s8_u8(q1), h1);
                    lo = vdotq_u32(vdotq_u32(cv, q0, l0), q1, l1);
                } else {
                    int8x16_t w0 = vld1q_s8((const int8_t *)W + k);
                    int8x16_t w1 = vld1q_s8((const int8_t *)W + k + 16);
                    uint8x16_t u0 = veorq_u8(vreinterpretq_u8_s8(w0), vdupq_n_u8(0x80));
                    uint8x16_t u1 = veorq_u8(vreinterpretq_u8_s8(w1), vdupq_n_u8(0x80));
                    hi = vdotq_s32(vdotq_s32(zero, w0, h0), w1, h1);
                    lo = vdotq_u32(vdotq_u32(cv, u0, l0), u1, l1);
                }
                p[r] = vaddq_s32(vshlq_n_s32(hi, 8), vreinterpretq_s32_u32(lo));
            }
            s = gpt2s_q8_acc4_arch_neon(s, p, d, b, dx[b]);
        }
        float t[4];
        vst1q_f32(t, s);
        for (int r = 0; r < 4 && v + r < n; r++) c[v + r] = accumulate ? c[v + r] + t[r] : t[r];
    }
    return 0;
}

GPT2S_NEON_DP_INLINE void gpt2s_blocked_nt_arch_neon_dotprod(const int ELEM, int M, int n,
        int K, const float *A, int lda, const void *W, const uint16_t *S, int accumulate,
        float *C, int ldc) {
    if (M == 1 && K <= 16384) {   /* scratch on the stack: 32 + 2 + 2 KiB at most */
        int16_t xq[16384] __attribute__((aligned(16)));
        float dx[16384 / GPT2S_Q8_BLOCK];
        int32_t corr[16384 / GPT2S_Q8_BLOCK];
        if (gpt2s_nt1_dot_arch_neon_dotprod(ELEM, n, K, A, W, S, accumulate, C, xq, dx, corr)
            == 0)
            return;
    }
    gpt2s_nt_arch_neon(ELEM, M, n, K, A, lda, W, K, S, accumulate, C, ldc);
}

GPT2S_NEON_DP static void gpt2s_q8_nt_arch_neon_dotprod(int M, int n, int K, const float *A,
        int lda, const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    gpt2s_blocked_nt_arch_neon_dotprod(GPT2S_ELEM_Q8, M, n, K, A, lda, W, S, accumulate, C,
                                       ldc);
}

#endif
#endif

#endif
