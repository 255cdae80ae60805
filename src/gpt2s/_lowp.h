/* Low-precision weights for inference: bfloat16 and int8 blocks (issue 11).

   Storage (activations, layernorm, softmax and every accumulation stay float32):

   - bfloat16: the top 16 bits of a float32 (uint16_t), in the tensor's own layout: the Conv1D
     weights [in = K, out = N] and the tied embedding / lm_head [V, C].  Widening is a 16-bit
     shift in registers; float32 -> bfloat16 rounds to nearest even (NaN stays NaN).
   - int8 ("q8"): symmetric blocks of GPT2S_Q8_BLOCK = 32 weights along the reduction
     dimension K, one fp16 scale per block (llama.cpp's Q8_0: 34 bytes per 32 weights, 1.0625
     bytes/weight against 1.125 with fp32 scales; decode reads every weight byte once per
     token, so the 6% fewer bytes are 6% fewer seconds, and F16C widens a scale in one
     instruction).  A block's scale is the smallest fp16 >= max|w| / 127 (rounded up, not to
     nearest, so no weight ever clips: |w - q d| <= d / 2 for every element, fp16 subnormal
     scales included).  The quantized weight is always stored [N][K] -- output feature major,
     the blocks of one output contiguous: the Conv1D weight [K, N] is transposed once at
     quantization time, the embedding [V, C] already is that layout.  Then every int8 product,
     Conv1D or lm_head, is one kernel streaming contiguous rows (the blocks of a [K, N] weight
     would be 32 rows apart), the quantized scales sit in their own contiguous [N][K/32] array,
     and an output feature's block sums finish in registers.  K must be a multiple of 32
     (every GPT-2 width is); the wrappers refuse other K with a clear error.

   Kernels: C (M, n) (+)= A (M, K) float32 @ W, W in one of three forms
     bf16_nn: W bf16 [K, n] row-major (ldw)           -- Conv1D
     bf16_nt: W bf16 [n, K] row-major (ldw), C = A W^T -- lm_head
     q8_nt:   W int8 [n, K] + scales fp16 [n, K/32]     -- every int8 weight
   - "direct" AVX2 + FMA (+ F16C) kernels for the few rows of decoding: every weight is read
     once from memory into registers, widened there and used for all rows of A (tiles as in
     _smallm.h), no float32 copy anywhere;
   - the panel route (the caller in _lowp.pxi): a panel of output columns of W is widened into
     a per-thread float32 buffer of ~1 MiB and handed to the float32 gemm (sgemm for prefill);
     its widening loops exist in portable C (any CPU, baseline ISA: the fallback) and AVX2.
   AVX-512 (AVX512_BF16 vdpbf16ps, VNNI vpdpbusd) has a reserved dispatch slot in _lowp.pxi
   but no code: the machine these were written on has no AVX-512 to test it.

   Functions that touch AVX registers carry "arch_x86_64_v3" in their names (tools/
   check_wheel.sh checks that no other function of the wheel does) and run only after
   gpt2s_lowp_avx2_ok(). */

#ifndef GPT2S_LOWP_H
#define GPT2S_LOWP_H

#include <stdint.h>
#include <float.h>
#include <string.h>
#include <math.h>

#define GPT2S_Q8_BLOCK 32

/* ------------------------------------------------------------------ portable conversions */

static inline float gpt2s_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* round to nearest even; NaN stays a (quiet) NaN, overflow gives +-inf as it should */
static inline uint16_t gpt2s_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

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

/* out[i] = bf16(x[i]) */
static void gpt2s_bf16_from_f32_n(uint16_t *out, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = gpt2s_f32_to_bf16(x[i]);
}

/* out[i] = float(x[i]) -- portable (the compiler vectorises it for the baseline ISA) */
static void gpt2s_bf16_to_f32_n(float *out, const uint16_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)x[i] << 16;
        memcpy(out + i, &u, sizeof(float));
    }
}

/* One block of 32 contiguous weights x -> dst (int8) and its fp16 scale; 0, or -1 when the
   block holds a non-finite weight or one too large for an fp16 scale (|w| > 127 * 65504).
   Straight loops over 32 elements that GCC vectorises (-fno-trapping-math), in an x86-64-v3
   clone where the platform has ifuncs: 4-wide double division and rounding. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) \
    && !defined(GPT2S_NO_CLONES)
#define GPT2S_Q8_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GPT2S_Q8_CLONES
#endif
GPT2S_Q8_CLONES static int gpt2s_q8_quantize_block(int8_t *dst, uint16_t *scale,
                                                   const float *x) {
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

/* Quantize rows [0, N) of a weight whose element (n, k) is w[n * sn + k * sk] into q [N][K]
   and scales [N][K/32] (fp16 bits).  K % 32 == 0.  Returns 0, or -1 when a block holds a
   non-finite weight or one too large for an fp16 scale; the caller names the tensor.  Blocks
   are visited block-row by block-row so that a [K, N] weight (sn = 1, sk = N) reads 32 of its
   rows at a time, which stay in cache; a strided block is gathered into a contiguous copy. */
static int gpt2s_q8_quantize(int8_t *q, uint16_t *scales, const float *w, int64_t N,
                             int64_t K, int64_t sn, int64_t sk) {
    int64_t nb = K / GPT2S_Q8_BLOCK;
    float x[GPT2S_Q8_BLOCK];
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t n = 0; n < N; n++) {
            const float *src = w + n * sn + b * GPT2S_Q8_BLOCK * sk;
            if (sk != 1) {
                for (int i = 0; i < GPT2S_Q8_BLOCK; i++) x[i] = src[i * sk];
                src = x;
            }
            if (gpt2s_q8_quantize_block(q + n * K + b * GPT2S_Q8_BLOCK, scales + n * nb + b,
                                        src) != 0)
                return -1;
        }
    }
    return 0;
}

/* out[j][k] = q[j][k] * scale(j, k / 32) for rows j of one panel (portable) */
static void gpt2s_q8_to_f32_rows(float *out, int64_t ldo, const int8_t *q, const uint16_t *scales,
                                 int rows, int K) {
    int nb = K / GPT2S_Q8_BLOCK;
    for (int j = 0; j < rows; j++) {
        const int8_t *qr = q + (int64_t)j * K;
        const uint16_t *sr = scales + (int64_t)j * nb;
        float *o = out + (int64_t)j * ldo;
        for (int b = 0; b < nb; b++) {
            float d = gpt2s_f16_to_f32(sr[b]);
            for (int i = 0; i < GPT2S_Q8_BLOCK; i++)
                o[b * GPT2S_Q8_BLOCK + i] = d * (float)qr[b * GPT2S_Q8_BLOCK + i];
        }
    }
}

/* out (rows, cols) float32 (ldo) = W bf16 (rows, cols) (ldw): a panel of a bf16 weight */
static void gpt2s_bf16_to_f32_panel(float *out, int64_t ldo, const uint16_t *w, int64_t ldw,
                                    int rows, int cols) {
    for (int r = 0; r < rows; r++)
        gpt2s_bf16_to_f32_n(out + (int64_t)r * ldo, w + (int64_t)r * ldw, cols);
}

/* ------------------------------------------------------------------ AVX2 + FMA + F16C */

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(GPT2S_NO_CLONES)
#define GPT2S_LOWP_HAVE_AVX2 1

#include <immintrin.h>

#define GPT2S_LOWP_V3 __attribute__((target("avx2,fma,f16c"), noinline))
#define GPT2S_LOWP_V3_INLINE static inline __attribute__((target("avx2,fma,f16c"), always_inline))
#define GPT2S_LOWP_KB 64    /* rows of W per K block (bf16_nn), as _smallm.h */
#define GPT2S_BF16_PF 2048   /* bf16_nt1 prefetch distance in bytes */
#define GPT2S_LOWP_PF 64    /* bf16_nn prefetch distance in elements: 128 bytes, two lines */
/* row i of a tile that starts at p, or row 0 again when the tile has only n rows */
#define GPT2S_LROW(p, i, n, ld) ((p) + ((n) > (i) ? (int64_t)(i) * (ld) : 0))

static int gpt2s_lowp_avx2_ok(void) {
    static int ok = -1;
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
             && __builtin_cpu_supports("f16c");
    }
    return ok;
}

/* 8 bfloat16 -> 8 float32: zero-extend to 32 bits and shift into the high half */
GPT2S_LOWP_V3_INLINE __m256 gpt2s_ld_bf16x8_arch_x86_64_v3(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 int8 -> 8 float32 */
GPT2S_LOWP_V3_INLINE __m256 gpt2s_ld_q8x8_arch_x86_64_v3(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

GPT2S_LOWP_V3_INLINE float gpt2s_hsum_arch_x86_64_v3(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* c[0:n] (+)= a (K) @ W (K, n) bf16, one row (batch-1 decoding).  W is streamed 4 whole
   rows at a time (4 sequential streams, which the hardware prefetchers follow; a strip of
   columns walked down 64 rows would be 64 streams, too many to prefetch: 5 -> 9 GB/s from
   memory on one core; software prefetch 1 KiB ahead in each row measured no different), c
   (n floats, L1) is updated once per 4 rows.  A 256-bit load of
   16 bf16 is widened by two unpacks with zero (bf16 bits into the high halves), which gives
   the lane order [0-3, 8-11] and [4-7, 12-15]: c is kept in that order during the call and
   straightened at the end (with accumulate, permuted at the start too). */
GPT2S_LOWP_V3_INLINE void gpt2s_lanes_swap_arch_x86_64_v3(float *c, int n16) {
    /* [0-7 | 8-15] <-> [0-3, 8-11 | 4-7, 12-15]: the same permutation both ways */
    for (int j = 0; j < n16; j += 16) {
        __m256 c0 = _mm256_loadu_ps(c + j), c1 = _mm256_loadu_ps(c + j + 8);
        _mm256_storeu_ps(c + j, _mm256_permute2f128_ps(c0, c1, 0x20));
        _mm256_storeu_ps(c + j + 8, _mm256_permute2f128_ps(c0, c1, 0x31));
    }
}

GPT2S_LOWP_V3 static void gpt2s_bf16_nn1_arch_x86_64_v3(int n, int K, const float *a,
        const uint16_t *W, int ldw, int accumulate, float *c) {
    int n16 = n - n % 16, k4 = K - K % 4;
    const __m256i zero = _mm256_setzero_si256();
    if (accumulate) gpt2s_lanes_swap_arch_x86_64_v3(c, n16);
    else memset(c, 0, sizeof(float) * n16);
    for (int k = 0; k < k4; k += 4) {
        const uint16_t *w0 = W + (int64_t)k * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        __m256 t0 = _mm256_broadcast_ss(a + k), t1 = _mm256_broadcast_ss(a + k + 1);
        __m256 t2 = _mm256_broadcast_ss(a + k + 2), t3 = _mm256_broadcast_ss(a + k + 3);
        int prefetch = k + 12 <= k4;
        for (int j = 0; j < n16; j += 16) {
            if (prefetch && (j & 31) == 0) {   /* the next 4 rows, one line each per 32 columns */
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
    gpt2s_lanes_swap_arch_x86_64_v3(c, n16);
    for (int j = n16; j < n; j++) {   /* the last n % 16 columns */
        float s = accumulate ? c[j] : 0.0f;
        for (int k = 0; k < K; k++) s += a[k] * gpt2s_bf16_to_f32(W[(int64_t)k * ldw + j]);
        c[j] = s;
    }
}

/* C[:, 0:n16] (+)= A (M, K) @ W (K, n16) bf16, n16 a multiple of 16.  A tile of RA rows of C x
   16 columns (2 RA accumulator registers) runs down a block of 64 rows of W; as in
   _smallm.h's NN kernel, all strips of a block are visited left to right so that each of
   its rows is read sequentially, and rows of C past M repeat row m0 (computed, never
   stored).  Each row of W's strip is widened once (a load, a zero-extend and a shift per 8)
   for the RA rows: with RA = 4 those 6 operations went with 8 FMAs and shared their ports;
   with RA = 6, 12 FMAs (12 accumulators, 2 weight vectors and a broadcast: 15 registers). */
GPT2S_LOWP_V3_INLINE void gpt2s_bf16_nn_tile_arch_x86_64_v3(const int RA, int M, int n16, int K,
        const float *A, int lda, const uint16_t *W, int ldw, int accumulate, float *C, int ldc) {
    for (int k0 = 0; k0 < K; k0 += GPT2S_LOWP_KB) {
        int k1 = k0 + GPT2S_LOWP_KB < K ? k0 + GPT2S_LOWP_KB : K;
        int load = accumulate || k0 > 0;
        for (int j = 0; j < n16; j += 16) {
            int pf = j + 16 + GPT2S_LOWP_PF <= n16;
            for (int m0 = 0; m0 < M; m0 += RA) {
                int mr = M - m0 < RA ? M - m0 : RA;
                const float *a[6];
                float *c[6];
                __m256 s[6][2];
#pragma GCC unroll 6
                for (int i = 0; i < RA; i++) {
                    a[i] = GPT2S_LROW(A + (int64_t)m0 * lda, i, mr, lda);
                    c[i] = GPT2S_LROW(C + (int64_t)m0 * ldc + j, i, mr, ldc);
                    if (load) {
                        s[i][0] = _mm256_loadu_ps(c[i]);
                        s[i][1] = _mm256_loadu_ps(c[i] + 8);
                    } else {
                        s[i][0] = s[i][1] = _mm256_setzero_ps();
                    }
                }
                const uint16_t *w = W + (int64_t)k0 * ldw + j;
                int prefetch = pf && m0 == 0;
                for (int k = k0; k < k1; k++, w += ldw) {
                    if (prefetch) __builtin_prefetch(w + GPT2S_LOWP_PF);
                    __m256 w0 = gpt2s_ld_bf16x8_arch_x86_64_v3(w);
                    __m256 w1 = gpt2s_ld_bf16x8_arch_x86_64_v3(w + 8);
#pragma GCC unroll 6
                    for (int i = 0; i < RA; i++) {
                        __m256 t = _mm256_broadcast_ss(a[i] + k);
                        s[i][0] = _mm256_fmadd_ps(t, w0, s[i][0]);
                        s[i][1] = _mm256_fmadd_ps(t, w1, s[i][1]);
                    }
                }
                /* aliased rows (past mr) point at row m0: store them first, row m0 last */
#pragma GCC unroll 6
                for (int i = RA - 1; i >= 0; i--) {
                    _mm256_storeu_ps(c[i], s[i][0]);
                    _mm256_storeu_ps(c[i] + 8, s[i][1]);
                }
            }
        }
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W (K, n) bf16: one row by gpt2s_bf16_nn1; more in tiles of 6 and
   of 4 rows. */
GPT2S_LOWP_V3 static void gpt2s_bf16_nn_arch_x86_64_v3(int M, int n, int K, const float *A,
        int lda, const uint16_t *W, int ldw, int accumulate, float *C, int ldc) {
    if (M == 1) {
        gpt2s_bf16_nn1_arch_x86_64_v3(n, K, A, W, ldw, accumulate, C);
        return;
    }
    /* m6 rows in tiles of 6, the rest in tiles of 4: the split that computes the fewest
       rows (aliased ones included), the most tiles of 6 among equals -- M = 8: 4 + 4, not
       6 + 4 with 2 rows wasted; M = 5: one tile of 6; M = 16: 6 + 6 + 4 */
    int n16 = n - n % 16, m6 = 0, best = 4 * ((M + 3) / 4);
    for (int t = 6; t < M + 6; t += 6) {   /* t rows in tiles of 6, the last maybe partial */
        int rows = t + (M > t ? 4 * ((M - t + 3) / 4) : 0);
        if (rows <= best) {
            best = rows;
            m6 = t < M ? t : M;
        }
    }
    if (m6 > 0)
        gpt2s_bf16_nn_tile_arch_x86_64_v3(6, m6, n16, K, A, lda, W, ldw, accumulate, C, ldc);
    if (M > m6)
        gpt2s_bf16_nn_tile_arch_x86_64_v3(4, M - m6, n16, K, A + (int64_t)m6 * lda, lda, W, ldw,
                                          accumulate, C + (int64_t)m6 * ldc, ldc);
    /* the last n % 16 columns: plain loops */
    for (int m = 0; m < M; m++) {
        for (int j = n16; j < n; j++) {
            float s = accumulate ? C[(int64_t)m * ldc + j] : 0.0f;
            for (int k = 0; k < K; k++)
                s += A[(int64_t)m * lda + k] * gpt2s_bf16_to_f32(W[(int64_t)k * ldw + j]);
            C[(int64_t)m * ldc + j] = s;
        }
    }
}

/* The NT tile: RA rows of A x RW rows of W (each output a dot product of two contiguous
   rows), RA * RW accumulators of 8 lanes.  Each 8-wide piece of a W row is widened once
   (q8: times its block's scale) and used for all RA rows.  Rows past the end of A or W
   repeat the tile's first row (computed, never stored).  KIND 0: bf16, 1: q8 (K % 32 == 0). */
GPT2S_LOWP_V3_INLINE void gpt2s_nt_tile_arch_x86_64_v3(const int RA, const int RW,
        const int KIND, int M, int n, int K, const float *A, int lda, const void *Wv,
        int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    int k8 = K - K % 8, nb = K / GPT2S_Q8_BLOCK;
    for (int v = 0; v < n; v += RW) {
        int vr = n - v < RW ? n - v : RW;
        const uint16_t *wb[8];
        const int8_t *wq[8];
        const uint16_t *ws[8];
#pragma GCC unroll 8
        for (int r = 0; r < RW; r++) {
            int64_t row = v + (vr > r ? r : 0);
            wb[r] = (const uint16_t *)Wv + row * ldw;
            wq[r] = (const int8_t *)Wv + row * ldw;
            ws[r] = S + row * nb;
        }
        for (int m0 = 0; m0 < M; m0 += RA) {
            int mr = M - m0 < RA ? M - m0 : RA;
            const float *a[4];
#pragma GCC unroll 4
            for (int i = 0; i < RA; i++) a[i] = GPT2S_LROW(A + (int64_t)m0 * lda, i, mr, lda);
            __m256 s[4][8];
#pragma GCC unroll 4
            for (int i = 0; i < RA; i++)
#pragma GCC unroll 8
                for (int r = 0; r < RW; r++) s[i][r] = _mm256_setzero_ps();
            int prefetch = m0 == 0 && v + 2 * RW <= n;
            if (KIND == 0) {
                for (int k = 0; k < k8; k += 8) {
                    __m256 x[4];
#pragma GCC unroll 4
                    for (int i = 0; i < RA; i++) x[i] = _mm256_loadu_ps(a[i] + k);
#pragma GCC unroll 8
                    for (int r = 0; r < RW; r++) {
                        if (prefetch && (k & 31) == 0)
                            __builtin_prefetch(wb[r] + (int64_t)RW * ldw + k + 32);
                        __m256 w = gpt2s_ld_bf16x8_arch_x86_64_v3(wb[r] + k);
#pragma GCC unroll 4
                        for (int i = 0; i < RA; i++) s[i][r] = _mm256_fmadd_ps(x[i], w, s[i][r]);
                    }
                }
            } else {
                for (int b = 0; b < nb; b++) {
                    int k = b * GPT2S_Q8_BLOCK;
                    __m256 d[8];
#pragma GCC unroll 8
                    for (int r = 0; r < RW; r++) {
                        if (prefetch) {
                            __builtin_prefetch(wq[r] + (int64_t)RW * ldw + k + 64);
                            if ((b & 31) == 0) __builtin_prefetch(ws[r] + (int64_t)RW * nb + b + 32);
                        }
                        d[r] = _mm256_set1_ps(_cvtsh_ss(ws[r][b]));
                    }
#pragma GCC unroll 4
                    for (int c = 0; c < GPT2S_Q8_BLOCK; c += 8) {
                        __m256 x[4];
#pragma GCC unroll 4
                        for (int i = 0; i < RA; i++) x[i] = _mm256_loadu_ps(a[i] + k + c);
#pragma GCC unroll 8
                        for (int r = 0; r < RW; r++) {
                            __m256 w = _mm256_mul_ps(gpt2s_ld_q8x8_arch_x86_64_v3(wq[r] + k + c), d[r]);
#pragma GCC unroll 4
                            for (int i = 0; i < RA; i++)
                                s[i][r] = _mm256_fmadd_ps(x[i], w, s[i][r]);
                        }
                    }
                }
            }
            /* stores: aliased entries first, the tile's true (0, 0) last */
#pragma GCC unroll 4
            for (int i = RA - 1; i >= 0; i--) {
                if (i >= mr) continue;
#pragma GCC unroll 8
                for (int r = RW - 1; r >= 0; r--) {
                    if (r >= vr) continue;
                    float t = gpt2s_hsum_arch_x86_64_v3(s[i][r]);
                    if (KIND == 0)
                        for (int k = k8; k < K; k++)
                            t += a[i][k] * gpt2s_bf16_to_f32(wb[r][k]);
                    float *c = C + (int64_t)(m0 + i) * ldc + v + r;
                    *c = accumulate ? *c + t : t;
                }
            }
        }
    }
}

/* c[0:n] (+)= a (K) @ W^T, W bf16 (n, K), one row of A (batch-1 decoding of the tied
   lm_head: 77 MB of bf16 per token for GPT-2 124M).  Each 256-bit load of 16 bf16 is widened by
   two unpacks with zero, which leaves the lanes in the order [0-3, 8-11] and [4-7, 12-15]; the
   row a is permuted into that order once per call (xp, K floats of scratch), so each 16 weights
   cost one load, two unpacks and two FMAs.  Four rows of W at a time (8 accumulators); with
   ldw == K those rows are one contiguous block, read at 128 bytes per step: prefetched 2 KiB
   ahead of that position, as gpt2s_q8_nt1 does (the generic 1 x 8 tile left the prefetchers
   eight short streams: 7 GB/s on one core where this reads 12). */
GPT2S_LOWP_V3 static void gpt2s_bf16_nt1_arch_x86_64_v3(int n, int K, const float *a,
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

/* tile shapes by rows of A: one row streams 8 W rows at once (8 FMA chains); 2-3 rows 4;
   4 or more rows 4 x 2 (8 accumulators, 4 A vectors, a W vector and 2 scales in registers) */
GPT2S_LOWP_V3 static void gpt2s_bf16_nt_arch_x86_64_v3(int M, int n, int K, const float *A,
        int lda, const uint16_t *W, int ldw, int accumulate, float *C, int ldc) {
    if (M == 1 && K <= 8192) {   /* scratch on the stack: 32 KiB at most */
        float xp[8192] __attribute__((aligned(32)));
        gpt2s_bf16_nt1_arch_x86_64_v3(n, K, A, W, ldw, accumulate, C, xp);
    } else if (M == 1)
        gpt2s_nt_tile_arch_x86_64_v3(1, 8, 0, M, n, K, A, lda, W, ldw, NULL, accumulate, C, ldc);
    else if (M < 4)
        gpt2s_nt_tile_arch_x86_64_v3(2, 4, 0, M, n, K, A, lda, W, ldw, NULL, accumulate, C, ldc);
    else
        gpt2s_nt_tile_arch_x86_64_v3(4, 2, 0, M, n, K, A, lda, W, ldw, NULL, accumulate, C, ldc);
}

/* c[0:n] (+)= a (K) @ W^T, W q8 (n, K), one row of A (batch-1 decoding).  Widening every
   weight to float32 costs 4 operations per 8 weights (sign-extend, convert, scale, FMA), and
   one row leaves nothing to share them with: this kernel is compute bound below the memory
   bandwidth.  Instead the row is rounded once per call to int16 per block of 32, xq =
   round(x / dx), dx = max|x| / 32767 (|x - xq dx| <= dx / 2: relative 2^-16 of the block's
   largest element, far below the weights' own int8 rounding), and each block of a W row is
   an exact integer dot product: sign-extend 2 x 16 weights to int16, vpmaddwd against xq,
   add, convert, one FMA by d_w dx -- 8 vector operations per 32 weights instead of 16.
   (llama.cpp rounds the activations to int8; int16 keeps them float32-accurate at the same
   cost on AVX2, whose vpmaddubsw would need the weights unsigned.)  xq and dx: K and K / 32
   elements of scratch.  Returns 0, or -1 (nothing written) when the row is not finite. */
GPT2S_LOWP_V3 static int gpt2s_q8_nt1_arch_x86_64_v3(int n, int K, const float *a,
        const int8_t *Q, const uint16_t *S, int accumulate, float *c, int16_t *xq, float *dx) {
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
    for (int v = 0; v < n; v += 4) {
        int vr = n - v < 4 ? n - v : 4;
        const int8_t *q0 = Q + (int64_t)v * K;
        const int8_t *q1 = GPT2S_LROW(q0, 1, vr, K), *q2 = GPT2S_LROW(q0, 2, vr, K);
        const int8_t *q3 = GPT2S_LROW(q0, 3, vr, K);
        const uint16_t *d0 = S + (int64_t)v * nb;
        const uint16_t *d1 = GPT2S_LROW(d0, 1, vr, nb), *d2 = GPT2S_LROW(d0, 2, vr, nb);
        const uint16_t *d3 = GPT2S_LROW(d0, 3, vr, nb);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int prefetch = v + 8 <= n;
        for (int b = 0; b < nb; b++) {
            int k = b * GPT2S_Q8_BLOCK;
            __m256i xa = _mm256_loadu_si256((const __m256i *)(xq + k));
            __m256i xb = _mm256_loadu_si256((const __m256i *)(xq + k + 16));
            float db = dx[b];
            if (prefetch) {   /* the tile's 4 rows are one contiguous 4K bytes, read at
                                 128 bytes per block: keep 2 KiB ahead of that position */
                __builtin_prefetch(q0 + 4 * k + 2048);
                __builtin_prefetch(q0 + 4 * k + 2048 + 64);
            }
#define GPT2S_Q8_ROW(qr, dr, sr) do { \
                __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)((qr) + k))); \
                __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)((qr) + k + 16))); \
                __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo, xa), _mm256_madd_epi16(hi, xb)); \
                sr = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss((dr)[b]) * db), sr); \
            } while (0)
            GPT2S_Q8_ROW(q0, d0, s0);
            GPT2S_Q8_ROW(q1, d1, s1);
            GPT2S_Q8_ROW(q2, d2, s2);
            GPT2S_Q8_ROW(q3, d3, s3);
#undef GPT2S_Q8_ROW
        }
        float t[4] = {gpt2s_hsum_arch_x86_64_v3(s0), gpt2s_hsum_arch_x86_64_v3(s1),
                      gpt2s_hsum_arch_x86_64_v3(s2), gpt2s_hsum_arch_x86_64_v3(s3)};
        for (int r = 0; r < vr; r++) c[v + r] = accumulate ? c[v + r] + t[r] : t[r];
    }
    return 0;
}

GPT2S_LOWP_V3 static void gpt2s_q8_nt_arch_x86_64_v3(int M, int n, int K, const float *A,
        int lda, const int8_t *Q, const uint16_t *S, int accumulate, float *C, int ldc) {
    if (M == 1 && K <= 16384) {   /* scratch on the stack: 32 KiB + 2 KiB at most */
        int16_t xq[16384] __attribute__((aligned(32)));
        float dx[16384 / GPT2S_Q8_BLOCK];
        if (gpt2s_q8_nt1_arch_x86_64_v3(n, K, A, Q, S, accumulate, C, xq, dx) == 0) return;
    }
    if (M == 1)
        gpt2s_nt_tile_arch_x86_64_v3(1, 8, 1, M, n, K, A, lda, Q, K, S, accumulate, C, ldc);
    else if (M < 4)
        gpt2s_nt_tile_arch_x86_64_v3(2, 4, 1, M, n, K, A, lda, Q, K, S, accumulate, C, ldc);
    else
        gpt2s_nt_tile_arch_x86_64_v3(4, 2, 1, M, n, K, A, lda, Q, K, S, accumulate, C, ldc);
}

/* panel widening, AVX2 (the portable versions above do the same) */
GPT2S_LOWP_V3 static void gpt2s_bf16_to_f32_panel_arch_x86_64_v3(float *out, int64_t ldo,
        const uint16_t *w, int64_t ldw, int rows, int cols) {
    int c8 = cols - cols % 8;
    for (int r = 0; r < rows; r++) {
        const uint16_t *src = w + (int64_t)r * ldw;
        float *dst = out + (int64_t)r * ldo;
        for (int c = 0; c < c8; c += 8)
            _mm256_storeu_ps(dst + c, gpt2s_ld_bf16x8_arch_x86_64_v3(src + c));
        for (int c = c8; c < cols; c++) dst[c] = gpt2s_bf16_to_f32(src[c]);
    }
}

GPT2S_LOWP_V3 static void gpt2s_q8_to_f32_rows_arch_x86_64_v3(float *out, int64_t ldo,
        const int8_t *q, const uint16_t *scales, int rows, int K) {
    int nb = K / GPT2S_Q8_BLOCK;
    for (int j = 0; j < rows; j++) {
        const int8_t *qr = q + (int64_t)j * K;
        const uint16_t *sr = scales + (int64_t)j * nb;
        float *o = out + (int64_t)j * ldo;
        for (int b = 0; b < nb; b++) {
            __m256 d = _mm256_set1_ps(_cvtsh_ss(sr[b]));
            for (int c = 0; c < GPT2S_Q8_BLOCK; c += 8)
                _mm256_storeu_ps(o + b * GPT2S_Q8_BLOCK + c, _mm256_mul_ps(
                    d, gpt2s_ld_q8x8_arch_x86_64_v3(qr + b * GPT2S_Q8_BLOCK + c)));
        }
    }
}

#else   /* no AVX2 code on this compiler or architecture: the portable route does the work */

#define GPT2S_LOWP_HAVE_AVX2 0
static int gpt2s_lowp_avx2_ok(void) { return 0; }
static void gpt2s_bf16_nn_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
        const uint16_t *W, int ldw, int accumulate, float *C, int ldc) {
    (void)M; (void)n; (void)K; (void)A; (void)lda; (void)W; (void)ldw; (void)accumulate;
    (void)C; (void)ldc;
}
static void gpt2s_bf16_nt_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
        const uint16_t *W, int ldw, int accumulate, float *C, int ldc) {
    (void)M; (void)n; (void)K; (void)A; (void)lda; (void)W; (void)ldw; (void)accumulate;
    (void)C; (void)ldc;
}
static void gpt2s_q8_nt_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
        const int8_t *Q, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)M; (void)n; (void)K; (void)A; (void)lda; (void)Q; (void)S; (void)accumulate;
    (void)C; (void)ldc;
}
static void gpt2s_bf16_to_f32_panel_arch_x86_64_v3(float *out, int64_t ldo, const uint16_t *w,
        int64_t ldw, int rows, int cols) {
    gpt2s_bf16_to_f32_panel(out, ldo, w, ldw, rows, cols);
}
static void gpt2s_q8_to_f32_rows_arch_x86_64_v3(float *out, int64_t ldo, const int8_t *q,
        const uint16_t *scales, int rows, int K) {
    gpt2s_q8_to_f32_rows(out, ldo, q, scales, rows, K);
}

#endif
#endif
