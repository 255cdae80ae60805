/* The integer kernels of the 4-bit type (q4.h), written once and compiled once per
   instruction-set level: q4.h includes this file for x86-64-v3, avx-vnni, avx512 and
   avx512-vnni with

     GPT2S_Q4_A(name)  name##_arch_<level>: the level's function names (tools/check_wheel.sh
                       finds the variants' AVX code by them)
     GPT2S_Q4_INLINE   the level's always-inline attribute, GPT2S_Q4_FN its noinline one
     GPT2S_Q4_WIDE     (avx512, avx512-vnni) the main loops take two pairs of blocks a step
                       on 512 bits

   and the level's gpt2s_q4_dot_arch_<level> defined before: a pair of blocks' 8 int32 sums
   (q4.h), and with GPT2S_Q4_WIDE gpt2s_q4_dot512_arch_<level>: two pairs' 16.  Every level
   computes those sums exactly, and each pair's 8 lanes are then added by the same float32
   operations in the same order (on 256 bits everywhere), so every level gives the same
   outputs bit for bit.  No include guard: included once per level. */

/* C[:, 0:n] (+)= A @ W^T in tiles of RA rows of A x RW rows of W, A rounded (xq, dx, dxp,
   cx); scratch: sw (RW x K / 32 floats, the tile's scales), swp (RW x K / 8: the scales in
   pairs, times dx for RA = 1) */
GPT2S_Q4_INLINE void GPT2S_Q4_A(gpt2s_q4_i8_tile)(const int RA, const int RW, int M, int n,
        int K, const int8_t *xq, const float *dx, const float *dxp, const float *cx,
        const void *W, const uint16_t *S, int accumulate, float *C, int ldc, float *sw,
        float *swp) {
    int nb = K / GPT2S_Q4_BLOCK, np = nb / 2, odd = nb & 1, bt = nb - 1;
    int64_t rb = K / 2;   /* bytes of a W row */
    const __m256i mask = _mm256_set1_epi8(15);
    const __m128i mask4 = _mm_set1_epi8(15);
    for (int v = 0; v < n; v += RW) {
        int vr = n - v < RW ? n - v : RW;
        const uint8_t *w[4];
        int prefetch = v + 2 * RW <= n;
#pragma GCC unroll 4
        for (int r = 0; r < RW; r++) {
            int64_t row = v + (vr > r ? r : 0);
            w[r] = (const uint8_t *)W + row * rb;
            const uint16_t *h = S + row * nb;
            int b = 0;
            for (; b + 8 <= nb; b += 8)
                _mm256_storeu_ps(sw + r * nb + b,
                                 _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + b))));
            for (; b < nb; b++) sw[r * nb + b] = _cvtsh_ss(h[b]);
        }
        for (int m0 = 0; m0 < M; m0 += RA) {
            int mr = M - m0 < RA ? M - m0 : RA;
            if (RA == 1 || m0 == 0)
                for (int r = 0; r < RW; r++)
                    gpt2s_q4_pairs_arch_x86_64_v3(swp + (int64_t)r * np * 8, sw + r * nb,
                                                  RA == 1 ? dx + (int64_t)m0 * nb : NULL, nb);
            const int8_t *x[4];
            const float *xd[4];
#pragma GCC unroll 4
            for (int i = 0; i < RA; i++) {
                x[i] = GPT2S_ROW(xq + (int64_t)m0 * K, i, mr, K);
                xd[i] = GPT2S_ROW(dxp + (int64_t)m0 * np * 8, i, mr, np * 8);
            }
            __m256 s[4][4];
#pragma GCC unroll 4
            for (int i = 0; i < RA; i++)
#pragma GCC unroll 4
                for (int r = 0; r < RW; r++) s[i][r] = _mm256_setzero_ps();
            int q0 = 0;
#ifdef GPT2S_Q4_WIDE
            if (RA != 1)   /* two pairs a step on 512 bits (the one-row kernel's, above) */
                for (; q0 + 2 <= np; q0 += 2) {
                    const __m512i mask16 = _mm512_set1_epi8(15);
                    __m512i lo[4], hi[4];
#pragma GCC unroll 4
                    for (int r = 0; r < RW; r++) {
                        if (prefetch) __builtin_prefetch(w[r] + RW * rb + 32 * q0);
                        __m512i raw = _mm512_loadu_si512((const void *)(w[r] + 32 * q0));
                        lo[r] = _mm512_and_si512(raw, mask16);
                        hi[r] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask16);
                    }
#pragma GCC unroll 4
                    for (int i = 0; i < RA; i++) {
                        __m512i x0 = _mm512_loadu_si512((const void *)(x[i] + 64 * q0));
                        __m512i x1 = _mm512_loadu_si512((const void *)(x[i] + 64 * q0 + 64));
                        __m512i xa = _mm512_shuffle_i64x2(x0, x1, 0x44);
                        __m512i xb = _mm512_shuffle_i64x2(x0, x1, 0xee);
#pragma GCC unroll 4
                        for (int r = 0; r < RW; r++) {
                            __m512 p = _mm512_cvtepi32_ps(
                                GPT2S_Q4_A(gpt2s_q4_dot512)(lo[r], xa, hi[r], xb));
                            const float *sc = swp + ((int64_t)r * np + q0) * 8;
                            s[i][r] = _mm256_fmadd_ps(_mm512_castps512_ps256(p), _mm256_mul_ps(
                                _mm256_loadu_ps(sc), _mm256_loadu_ps(xd[i] + 8 * q0)), s[i][r]);
                            s[i][r] = _mm256_fmadd_ps(_mm512_extractf32x8_ps(p, 1), _mm256_mul_ps(
                                _mm256_loadu_ps(sc + 8), _mm256_loadu_ps(xd[i] + 8 * q0 + 8)),
                                s[i][r]);
                        }
                    }
                }
#endif
            for (int q = q0; q < np; q++) {
                __m256i lo[4], hi[4];
                if (RA != 1)   /* one row of A: each W row unpacked where it is used */
#pragma GCC unroll 4
                    for (int r = 0; r < RW; r++) {
                        if (prefetch && (q & 1) == 0)
                            __builtin_prefetch(w[r] + RW * rb + 32 * q);
                        __m256i raw = _mm256_loadu_si256((const __m256i *)(w[r] + 32 * q));
                        lo[r] = _mm256_and_si256(raw, mask);
                        hi[r] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                    }
#pragma GCC unroll 4
                for (int i = 0; i < RA; i++) {
#pragma GCC unroll 4
                    for (int r = 0; r < RW; r++) {
                        if (RA == 1) {
                            if (prefetch && (q & 1) == 0)
                                __builtin_prefetch(w[r] + RW * rb + 32 * q);
                            __m256i raw = _mm256_loadu_si256((const __m256i *)(w[r] + 32 * q));
                            lo[r] = _mm256_and_si256(raw, mask);
                            hi[r] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                        }
                        __m256 p = _mm256_cvtepi32_ps(GPT2S_Q4_A(gpt2s_q4_dot)(
                            lo[r], _mm256_loadu_si256((const __m256i *)(x[i] + 64 * q)),
                            hi[r], _mm256_loadu_si256((const __m256i *)(x[i] + 64 * q + 32))));
                        __m256 sc = _mm256_loadu_ps(swp + ((int64_t)r * np + q) * 8);
                        if (RA != 1) sc = _mm256_mul_ps(sc, _mm256_loadu_ps(xd[i] + 8 * q));
                        s[i][r] = _mm256_fmadd_ps(p, sc, s[i][r]);
                    }
                }
            }
            if (odd) {   /* the last block alone, on 128 bits */
                __m128i lo[4], hi[4];
#pragma GCC unroll 4
                for (int r = 0; r < RW; r++) {
                    __m128i raw = _mm_loadu_si128((const __m128i *)(w[r] + 16 * bt));
                    lo[r] = _mm_and_si128(raw, mask4);
                    hi[r] = _mm_and_si128(_mm_srli_epi16(raw, 4), mask4);
                }
#pragma GCC unroll 4
                for (int i = 0; i < RA; i++) {
                    const int8_t *xt = x[i] + (int64_t)32 * bt;
                    __m128i xl = _mm_loadu_si128((const __m128i *)xt);
                    __m128i xh = _mm_loadu_si128((const __m128i *)(xt + 16));
                    float di = dx[(int64_t)(m0 + (mr > i ? i : 0)) * nb + bt];
#pragma GCC unroll 4
                    for (int r = 0; r < RW; r++) {
                        __m128 p = _mm_cvtepi32_ps(gpt2s_q4_dot4_arch_x86_64_v3(lo[r], xl, hi[r],
                                                                                 xh));
                        s[i][r] = _mm256_fmadd_ps(_mm256_zextps128_ps256(p),
                                                  _mm256_set1_ps(sw[r * nb + bt] * di), s[i][r]);
                    }
                }
            }
#pragma GCC unroll 4
            for (int i = RA - 1; i >= 0; i--) {
                if (i >= mr) continue;
#pragma GCC unroll 4
                for (int r = RW - 1; r >= 0; r--) {
                    if (r >= vr) continue;
                    float t = gpt2s_hsum_arch_x86_64_v3(s[i][r])
                              - gpt2s_q4_corr_arch_x86_64_v3(sw + r * nb,
                                                             cx + (int64_t)(m0 + i) * nb, nb);
                    float *c = C + (int64_t)(m0 + i) * ldc + v + r;
                    *c = accumulate ? *c + t : t;
                }
            }
        }
    }
}

/* One row of A (decoding): the 1 x 4 tile of gpt2s_q4_i8_tile, the same operations on each
   output in the same order, written out so that its pointers stay in registers: 4 W rows a
   step (one contiguous run of memory, the next 4 prefetched), the pairs' scales d_b dx_b made
   8 blocks at a time in registers (a conversion and a multiply, then a vpermps per pair). */
GPT2S_Q4_INLINE void GPT2S_Q4_A(gpt2s_q4_i8_row1)(int n, int K, const int8_t *xq,
        const float *dx, const float *cx, const void *W, const uint16_t *S, int accumulate,
        float *c) {
    int nb = K / GPT2S_Q4_BLOCK, np = nb / 2, bt = nb - 1, g8 = np / 4 * 8;
    int64_t rb = K / 2;
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i i0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i i1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    const __m256i i2 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5);
    const __m256i i3 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
    for (int v = 0; v < n; v += 4) {
        int vr = n - v < 4 ? n - v : 4;
        const uint8_t *w0 = (const uint8_t *)W + (int64_t)v * rb;
        const uint8_t *w1 = GPT2S_ROW(w0, 1, vr, rb), *w2 = GPT2S_ROW(w0, 2, vr, rb);
        const uint8_t *w3 = GPT2S_ROW(w0, 3, vr, rb);
        const uint16_t *h0 = S + (int64_t)v * nb;
        const uint16_t *h1 = GPT2S_ROW(h0, 1, vr, nb), *h2 = GPT2S_ROW(h0, 2, vr, nb);
        const uint16_t *h3 = GPT2S_ROW(h0, 3, vr, nb);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define GPT2S_Q4_PAIR(w, q, sc, acc) do { \
            __m256i raw_ = _mm256_loadu_si256((const __m256i *)((w) + 32 * (int64_t)(q))); \
            __m256i lo_ = _mm256_and_si256(raw_, mask); \
            __m256i hi_ = _mm256_and_si256(_mm256_srli_epi16(raw_, 4), mask); \
            __m256 p_ = _mm256_cvtepi32_ps(GPT2S_Q4_A(gpt2s_q4_dot)( \
                lo_, _mm256_loadu_si256((const __m256i *)(xq + 64 * (int64_t)(q))), \
                hi_, _mm256_loadu_si256((const __m256i *)(xq + 64 * (int64_t)(q) + 32)))); \
            acc = _mm256_fmadd_ps(p_, sc, acc); \
        } while (0)
#define GPT2S_Q4_ROW8(w, h, acc) do { \
            __m256 f_ = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((h) + g))), dx8); \
            __builtin_prefetch((w) + 4 * rb + 16 * g); \
            __builtin_prefetch((w) + 4 * rb + 16 * g + 64); \
            GPT2S_Q4_PAIR(w, g / 2, _mm256_permutevar8x32_ps(f_, i0), acc); \
            GPT2S_Q4_PAIR(w, g / 2 + 1, _mm256_permutevar8x32_ps(f_, i1), acc); \
            GPT2S_Q4_PAIR(w, g / 2 + 2, _mm256_permutevar8x32_ps(f_, i2), acc); \
            GPT2S_Q4_PAIR(w, g / 2 + 3, _mm256_permutevar8x32_ps(f_, i3), acc); \
        } while (0)
#ifdef GPT2S_Q4_WIDE
        /* two pairs a step on 512 bits: 64 bytes of a W row (pairs q, q + 1) against the
           rounded row's low halves [q, q + 1] and high halves [q, q + 1] (two vshufi64x2 of
           its 128 bytes, for the 4 W rows); lanes 0-7 of the sums are pair q's, 8-15 pair
           q + 1's, each added into the accumulator by its own FMA, q's first, as above */
        const __m512i mask16 = _mm512_set1_epi8(15);
#define GPT2S_Q4_QUAD(w, q, xa, xb, sc0, sc1, acc) do { \
            __m512i raw_ = _mm512_loadu_si512((const void *)((w) + 32 * (int64_t)(q))); \
            __m512i lo_ = _mm512_and_si512(raw_, mask16); \
            __m512i hi_ = _mm512_and_si512(_mm512_srli_epi16(raw_, 4), mask16); \
            __m512 p_ = _mm512_cvtepi32_ps(GPT2S_Q4_A(gpt2s_q4_dot512)(lo_, xa, hi_, xb)); \
            acc = _mm256_fmadd_ps(_mm512_castps512_ps256(p_), sc0, acc); \
            acc = _mm256_fmadd_ps(_mm512_extractf32x8_ps(p_, 1), sc1, acc); \
        } while (0)
#define GPT2S_Q4_ROW8W(w, h, acc) do { \
            __m256 f_ = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((h) + g))), dx8); \
            __builtin_prefetch((w) + 4 * rb + 16 * g); \
            __builtin_prefetch((w) + 4 * rb + 16 * g + 64); \
            GPT2S_Q4_QUAD(w, g / 2, xa01, xb01, _mm256_permutevar8x32_ps(f_, i0), \
                          _mm256_permutevar8x32_ps(f_, i1), acc); \
            GPT2S_Q4_QUAD(w, g / 2 + 2, xa23, xb23, _mm256_permutevar8x32_ps(f_, i2), \
                          _mm256_permutevar8x32_ps(f_, i3), acc); \
        } while (0)
        for (int g = 0; g < g8; g += 8) {   /* 8 blocks, 4 pairs */
            __m256 dx8 = _mm256_loadu_ps(dx + g);
            const int8_t *xg = xq + (int64_t)32 * g;
            __m512i x0 = _mm512_loadu_si512((const void *)xg);
            __m512i x1 = _mm512_loadu_si512((const void *)(xg + 64));
            __m512i x2 = _mm512_loadu_si512((const void *)(xg + 128));
            __m512i x3 = _mm512_loadu_si512((const void *)(xg + 192));
            __m512i xa01 = _mm512_shuffle_i64x2(x0, x1, 0x44), xb01 = _mm512_shuffle_i64x2(x0, x1, 0xee);
            __m512i xa23 = _mm512_shuffle_i64x2(x2, x3, 0x44), xb23 = _mm512_shuffle_i64x2(x2, x3, 0xee);
            GPT2S_Q4_ROW8W(w0, h0, s0);
            GPT2S_Q4_ROW8W(w1, h1, s1);
            GPT2S_Q4_ROW8W(w2, h2, s2);
            GPT2S_Q4_ROW8W(w3, h3, s3);
        }
#undef GPT2S_Q4_ROW8W
#else
        for (int g = 0; g < g8; g += 8) {   /* 8 blocks, 4 pairs */
            __m256 dx8 = _mm256_loadu_ps(dx + g);
            GPT2S_Q4_ROW8(w0, h0, s0);
            GPT2S_Q4_ROW8(w1, h1, s1);
            GPT2S_Q4_ROW8(w2, h2, s2);
            GPT2S_Q4_ROW8(w3, h3, s3);
        }
#endif
#define GPT2S_Q4_SC(h, b0) _mm256_setr_m128(_mm_set1_ps(_cvtsh_ss((h)[b0]) * dx[b0]), \
                                            _mm_set1_ps(_cvtsh_ss((h)[(b0) + 1]) * dx[(b0) + 1]))
        for (int q = g8 / 2; q < np; q++) {
            GPT2S_Q4_PAIR(w0, q, GPT2S_Q4_SC(h0, 2 * q), s0);
            GPT2S_Q4_PAIR(w1, q, GPT2S_Q4_SC(h1, 2 * q), s1);
            GPT2S_Q4_PAIR(w2, q, GPT2S_Q4_SC(h2, 2 * q), s2);
            GPT2S_Q4_PAIR(w3, q, GPT2S_Q4_SC(h3, 2 * q), s3);
        }
#undef GPT2S_Q4_SC
#undef GPT2S_Q4_ROW8
#undef GPT2S_Q4_PAIR
        if (nb & 1) {   /* the last block alone, on 128 bits */
            const __m128i mask4 = _mm_set1_epi8(15);
            __m128i xl = _mm_loadu_si128((const __m128i *)(xq + (int64_t)32 * bt));
            __m128i xh = _mm_loadu_si128((const __m128i *)(xq + (int64_t)32 * bt + 16));
#define GPT2S_Q4_TAIL(w, h, acc) do { \
                __m128i raw_ = _mm_loadu_si128((const __m128i *)((w) + 16 * (int64_t)bt)); \
                __m128 p_ = _mm_cvtepi32_ps(gpt2s_q4_dot4_arch_x86_64_v3( \
                    _mm_and_si128(raw_, mask4), xl, \
                    _mm_and_si128(_mm_srli_epi16(raw_, 4), mask4), xh)); \
                acc = _mm256_fmadd_ps(_mm256_zextps128_ps256(p_), \
                                      _mm256_set1_ps(_cvtsh_ss((h)[bt]) * dx[bt]), acc); \
            } while (0)
            GPT2S_Q4_TAIL(w0, h0, s0);
            GPT2S_Q4_TAIL(w1, h1, s1);
            GPT2S_Q4_TAIL(w2, h2, s2);
            GPT2S_Q4_TAIL(w3, h3, s3);
#undef GPT2S_Q4_TAIL
        }
        float t[4] = {
            gpt2s_hsum_arch_x86_64_v3(s0) - gpt2s_q4_corr16_arch_x86_64_v3(h0, cx, nb),
            gpt2s_hsum_arch_x86_64_v3(s1) - gpt2s_q4_corr16_arch_x86_64_v3(h1, cx, nb),
            gpt2s_hsum_arch_x86_64_v3(s2) - gpt2s_q4_corr16_arch_x86_64_v3(h2, cx, nb),
            gpt2s_hsum_arch_x86_64_v3(s3) - gpt2s_q4_corr16_arch_x86_64_v3(h3, cx, nb)};
        for (int r = 0; r < vr; r++) c[v + r] = accumulate ? c[v + r] + t[r] : t[r];
    }
}

/* C[:, 0:n] (+)= A (M, K) @ W (n, K)^T, W q4 with scales S [n][K/32]: the integer tiles
   above (1 x 4, 2 x 3, 3 x 2, 4 x 2 by rows of A); a non-finite row of A (or no memory for
   the rounded rows) sends the call to the float tiles of tile.h, which carry the NaN as
   float32 weights do */
GPT2S_Q4_FN static void GPT2S_Q4_A(gpt2s_q4_nt)(int M, int n, int K, const float *A, int lda,
        const void *W, int ldw, const uint16_t *S, int accumulate, float *C, int ldc) {
    (void)ldw;
    int nb = K / GPT2S_Q4_BLOCK;
    /* xq, dx, cx, dxp; sw and swp of 4 W rows */
    int64_t need = (int64_t)M * K + (int64_t)24 * M * nb + (int64_t)80 * nb + 64;
    char stack[65536] __attribute__((aligned(64)));
    char *buf = need <= (int64_t)sizeof(stack) ? stack : (char *)malloc((size_t)need);
    if (buf != NULL) {
        float *dx = (float *)buf, *cx = dx + (int64_t)M * nb, *dxp = cx + (int64_t)M * nb;
        float *sw = dxp + (int64_t)4 * M * nb, *swp = sw + 4 * nb;
        int8_t *xq = (int8_t *)(swp + 16 * nb);
        int ok = gpt2s_q4_round_rows_arch_x86_64_v3(M, K, A, lda, xq, dx, cx, dxp) == 0;
        if (ok) {
#define GPT2S_Q4_TILE(RA, RW) GPT2S_Q4_A(gpt2s_q4_i8_tile)(RA, RW, M, n, K, xq, dx, dxp, cx, \
                                  W, S, accumulate, C, ldc, sw, swp)
            if (M == 1)
                GPT2S_Q4_A(gpt2s_q4_i8_row1)(n, K, xq, dx, cx, W, S, accumulate, C);
            else if (M == 2) GPT2S_Q4_TILE(2, 3);
            else if (M == 3) GPT2S_Q4_TILE(3, 2);
            else GPT2S_Q4_TILE(4, 2);
#undef GPT2S_Q4_TILE
        }
        if (buf != stack) free(buf);
        if (ok) return;
    }
    gpt2s_nt_tile_arch_x86_64_v3(GPT2S_ELEM_Q4, M < 4 ? 2 : 4, M < 4 ? 4 : 2, M, n, K, A, lda,
                                 W, K, S, accumulate, C, ldc);
}

#undef GPT2S_Q4_A
#undef GPT2S_Q4_INLINE
#undef GPT2S_Q4_FN
#undef GPT2S_Q4_WIDE
