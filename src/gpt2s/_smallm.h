/* Matrix products with few rows (2 <= M <= GPT2S_SMALLM_MAX): the decoding step of a batch,
   and short prompts.  C (M, n) = A (M, K) @ B (K, n), or @ B (n, K)^T for the tied lm_head.

   Why not sgemm: with M = 8 OpenBLAS packs all of B for every call and then runs its kernel on
   8 columns, reaching ~7 GB/s of B (30 GFLOP/s) where two cores read memory at ~33 GB/s.  The
   whole cost of these products is reading B once, so the kernels below read every element of
   B exactly once from memory, straight into registers, and keep the M x 16 outputs in
   registers while they do:

   - NN (B row-major (K, n), the Conv1D weights): a tile of 6 rows of C x 16 columns (12 AVX
     registers) runs down the rows of B.  Walking one 64-byte column strip down all K rows
     would touch a new 4 KB page per row (B's rows are 3-12 KB apart), so K is cut into blocks
     of 64 rows: within a block all strips are visited left to right (each of the 64 rows is
     read sequentially), partial sums go back to C (M x n floats, in L1/L2) between blocks, and
     the line two strips ahead is prefetched.  Rows 7.. of C reuse the block from L1/L2.
   - NT (B row-major (n, K), the embedding matrix): each output is a dot product of two
     contiguous rows; a tile of 4 rows of A x 3 rows of B keeps 12 partial-sum vectors in
     registers and reads the 3 rows of B once for every 4 rows of A, prefetching the next 3.

   Measured on the 2-core Zen 4 machine (M = 8, two threads, weights not in cache): 15-21 GB/s
   against sgemm's 6-12 (benchmarks/bench.py, case "decode_matmul").

   The kernels are compiled for AVX2 + FMA only (x86-64-v3; their names carry
   "arch_x86_64_v3", which tools/check_wheel.sh relies on) and used after a run-time CPU check;
   elsewhere gpt2s_smallm_ok() is 0 and sgemm does the work. */

#ifndef GPT2S_SMALLM_H
#define GPT2S_SMALLM_H

#include <stdint.h>
#include <string.h>

#define GPT2S_SMALLM_MAX 32

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(GPT2S_NO_CLONES)

typedef float gpt2s_v8f __attribute__((vector_size(32), aligned(4), may_alias));
#define GPT2S_LD(p) (*(const gpt2s_v8f *)(p))
#define GPT2S_ST(p, v) (*(gpt2s_v8f *)(p) = (v))
#define GPT2S_SPLAT(x) ((gpt2s_v8f){(x), (x), (x), (x), (x), (x), (x), (x)})
#define GPT2S_V3 __attribute__((target("avx2,fma"), noinline))
/* row i of a tile that starts at p, or row 0 again when the tile has only n rows */
#define GPT2S_ROW(p, i, n, ld) ((p) + ((n) > (i) ? (int64_t)(i) * (ld) : 0))

enum { GPT2S_SMALLM_KB = 64,   /* rows of B per block (NN) */
       GPT2S_SMALLM_PF = 32 }; /* prefetch distance in floats: two 16-column strips */

/* C[:, 0:n] (+)= A (M, K) @ B (K, n).  The caller gives this thread its own columns. */
GPT2S_V3 static void gpt2s_smallm_nn_arch_x86_64_v3(int M, int n, int K, const float *A,
        int lda, const float *B, int ldb, int accumulate, float *C, int ldc) {
    int n16 = n - n % 16;
    for (int k0 = 0; k0 < K; k0 += GPT2S_SMALLM_KB) {
        int k1 = k0 + GPT2S_SMALLM_KB < K ? k0 + GPT2S_SMALLM_KB : K;
        int load = accumulate || k0 > 0;
        for (int j = 0; j < n16; j += 16) {
            int pf = j + 16 + GPT2S_SMALLM_PF <= n16;
            for (int m0 = 0; m0 < M; m0 += 6) {
                int mr = M - m0 < 6 ? M - m0 : 6;
                /* rows past mr repeat row m0: computed, never stored */
                const float *a0 = A + (int64_t)m0 * lda;
                const float *a1 = GPT2S_ROW(a0, 1, mr, lda), *a2 = GPT2S_ROW(a0, 2, mr, lda);
                const float *a3 = GPT2S_ROW(a0, 3, mr, lda), *a4 = GPT2S_ROW(a0, 4, mr, lda);
                const float *a5 = GPT2S_ROW(a0, 5, mr, lda);
                float *c0 = C + (int64_t)m0 * ldc + j;
                float *c1 = GPT2S_ROW(c0, 1, mr, ldc), *c2 = GPT2S_ROW(c0, 2, mr, ldc);
                float *c3 = GPT2S_ROW(c0, 3, mr, ldc), *c4 = GPT2S_ROW(c0, 4, mr, ldc);
                float *c5 = GPT2S_ROW(c0, 5, mr, ldc);
                gpt2s_v8f z = GPT2S_SPLAT(0.0f);
                gpt2s_v8f s00 = z, s01 = z, s10 = z, s11 = z, s20 = z, s21 = z;
                gpt2s_v8f s30 = z, s31 = z, s40 = z, s41 = z, s50 = z, s51 = z;
                if (load) {
                    s00 = GPT2S_LD(c0); s01 = GPT2S_LD(c0 + 8);
                    s10 = GPT2S_LD(c1); s11 = GPT2S_LD(c1 + 8);
                    s20 = GPT2S_LD(c2); s21 = GPT2S_LD(c2 + 8);
                    s30 = GPT2S_LD(c3); s31 = GPT2S_LD(c3 + 8);
                    s40 = GPT2S_LD(c4); s41 = GPT2S_LD(c4 + 8);
                    s50 = GPT2S_LD(c5); s51 = GPT2S_LD(c5 + 8);
                }
                const float *b = B + (int64_t)k0 * ldb + j;
                int prefetch = pf && m0 == 0;
                for (int k = k0; k < k1; k++, b += ldb) {
                    if (prefetch) __builtin_prefetch(b + GPT2S_SMALLM_PF);
                    gpt2s_v8f b0 = GPT2S_LD(b), b1 = GPT2S_LD(b + 8), t;
                    t = GPT2S_SPLAT(a0[k]); s00 += t * b0; s01 += t * b1;
                    t = GPT2S_SPLAT(a1[k]); s10 += t * b0; s11 += t * b1;
                    t = GPT2S_SPLAT(a2[k]); s20 += t * b0; s21 += t * b1;
                    t = GPT2S_SPLAT(a3[k]); s30 += t * b0; s31 += t * b1;
                    t = GPT2S_SPLAT(a4[k]); s40 += t * b0; s41 += t * b1;
                    t = GPT2S_SPLAT(a5[k]); s50 += t * b0; s51 += t * b1;
                }
                /* aliased rows (past mr) point at row m0: store them first, row m0 last */
                GPT2S_ST(c5, s50); GPT2S_ST(c5 + 8, s51);
                GPT2S_ST(c4, s40); GPT2S_ST(c4 + 8, s41);
                GPT2S_ST(c3, s30); GPT2S_ST(c3 + 8, s31);
                GPT2S_ST(c2, s20); GPT2S_ST(c2 + 8, s21);
                GPT2S_ST(c1, s10); GPT2S_ST(c1 + 8, s11);
                GPT2S_ST(c0, s00); GPT2S_ST(c0 + 8, s01);
            }
        }
    }
    /* the last n % 16 columns: plain loops */
    for (int m = 0; m < M; m++) {
        for (int j = n16; j < n; j++) {
            float s = accumulate ? C[(int64_t)m * ldc + j] : 0.0f;
            for (int k = 0; k < K; k++) s += A[(int64_t)m * lda + k] * B[(int64_t)k * ldb + j];
            C[(int64_t)m * ldc + j] = s;
        }
    }
}

/* C[:, 0:n] (+)= A (M, K) @ B (n, K)^T */
GPT2S_V3 static void gpt2s_smallm_nt_arch_x86_64_v3(int M, int n, int K, const float *A,
        int lda, const float *B, int ldb, int accumulate, float *C, int ldc) {
    int k8 = K - K % 8;
    for (int v = 0; v < n; v += 3) {
        int vr = n - v < 3 ? n - v : 3;
        const float *b0 = B + (int64_t)v * ldb;
        const float *b1 = GPT2S_ROW(b0, 1, vr, ldb), *b2 = GPT2S_ROW(b0, 2, vr, ldb);
        for (int m0 = 0; m0 < M; m0 += 4) {
            int mr = M - m0 < 4 ? M - m0 : 4;
            const float *a0 = A + (int64_t)m0 * lda;
            const float *a1 = GPT2S_ROW(a0, 1, mr, lda), *a2 = GPT2S_ROW(a0, 2, mr, lda);
            const float *a3 = GPT2S_ROW(a0, 3, mr, lda);
            gpt2s_v8f z = GPT2S_SPLAT(0.0f);
            gpt2s_v8f s00 = z, s01 = z, s02 = z, s10 = z, s11 = z, s12 = z;
            gpt2s_v8f s20 = z, s21 = z, s22 = z, s30 = z, s31 = z, s32 = z;
            /* the first pass over these rows fetches the next tile's rows ahead of use
               (17 -> 22 GB/s for the lm_head at 8 rows) */
            int prefetch = m0 == 0 && v + 6 <= n;
            for (int k = 0; k < k8; k += 8) {
                if (prefetch) {
                    __builtin_prefetch(b0 + 3 * (int64_t)ldb + k + 16);
                    __builtin_prefetch(b1 + 3 * (int64_t)ldb + k + 16);
                    __builtin_prefetch(b2 + 3 * (int64_t)ldb + k + 16);
                }
                gpt2s_v8f w0 = GPT2S_LD(b0 + k), w1 = GPT2S_LD(b1 + k), w2 = GPT2S_LD(b2 + k), t;
                t = GPT2S_LD(a0 + k); s00 += t * w0; s01 += t * w1; s02 += t * w2;
                t = GPT2S_LD(a1 + k); s10 += t * w0; s11 += t * w1; s12 += t * w2;
                t = GPT2S_LD(a2 + k); s20 += t * w0; s21 += t * w1; s22 += t * w2;
                t = GPT2S_LD(a3 + k); s30 += t * w0; s31 += t * w1; s32 += t * w2;
            }
            gpt2s_v8f s[4][3] = {{s00, s01, s02}, {s10, s11, s12},
                                 {s20, s21, s22}, {s30, s31, s32}};
            const float *ar[4] = {a0, a1, a2, a3};
            const float *br[3] = {b0, b1, b2};
            for (int i = 0; i < mr; i++) {
                for (int t = 0; t < vr; t++) {
                    float r = 0.0f;
                    for (int l = 0; l < 8; l++) r += s[i][t][l];
                    for (int k = k8; k < K; k++) r += ar[i][k] * br[t][k];
                    float *c = C + (int64_t)(m0 + i) * ldc + v + t;
                    *c = accumulate ? *c + r : r;
                }
            }
        }
    }
}

static int gpt2s_smallm_ok(void) {
    static int ok = -1;
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return ok;
}

static void gpt2s_smallm(int trans_b, int M, int n, int K, const float *A, int lda,
                         const float *B, int ldb, int accumulate, float *C, int ldc) {
    if (K <= 0) {   /* an empty sum: C = 0, or C unchanged when accumulating (as sgemm) */
        if (!accumulate)
            for (int m = 0; m < M; m++) memset(C + (int64_t)m * ldc, 0, sizeof(float) * n);
        return;
    }
    if (trans_b)
        gpt2s_smallm_nt_arch_x86_64_v3(M, n, K, A, lda, B, ldb, accumulate, C, ldc);
    else
        gpt2s_smallm_nn_arch_x86_64_v3(M, n, K, A, lda, B, ldb, accumulate, C, ldc);
}

#else  /* no AVX2 kernels on this compiler or architecture: sgemm does the work */

static int gpt2s_smallm_ok(void) { return 0; }
static void gpt2s_smallm(int trans_b, int M, int n, int K, const float *A, int lda,
                         const float *B, int ldb, int accumulate, float *C, int ldc) {
    (void)trans_b; (void)M; (void)n; (void)K; (void)A; (void)lda; (void)B; (void)ldb;
    (void)accumulate; (void)C; (void)ldc;
}

#endif
#endif
