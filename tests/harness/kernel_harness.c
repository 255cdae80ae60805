/* The C-level kernel test harness (issue 27): every instruction-set variant of every weight
   type's kernels (kernels/types.h's table) against the portable reference, on shapes that hit
   every tail of the tiles (K and N not multiples of the vector width or block, 1 to 33 rows
   of A, strides wider than the rows, accumulate on and off).

   The reference of a direct kernel C (+)= A @ W is the portable widening of W (the route the
   portable variant takes: widen, then sgemm) multiplied in double precision here; the
   variants' float32 sums may differ from it by the rounding of a float32 dot product in any
   order, (K + 8) 2^-24 sum |a w|, and the integer kernels of the blocked types also by
   their rounding of the activations per block (int8's one-row kernel to int16: max|x| /
   65534 per element, q8.h; int4's kernels, every row count, to int8: max|x| / 254, q4.h).
   Where the kernels promise more, the harness checks more: the widenings are exact
   (bit-for-bit equal to the portable one), and avx-vnni's int8 kernel and int4's avx-vnni,
   avx512 and avx512-vnni kernels equal x86-64-v3's bit for bit.  The quantizers (portable only) are checked against the rules q8.h / q4.h / bf16.h
   state, computed independently here.  neon-dotprod's int8 / int4 kernels must equal neon's
   bit for bit (the same integer sums).  Outputs outside C[0:M, 0:n] must stay untouched.

   One line per case: PASS, FAIL, or SKIP-CPU (a variant this CPU cannot run: not a pass).
   Exit status 1 on any failure.

   Build (native):  cc -O2 -I src/gpt2s/kernels tests/harness/kernel_harness.c -lm
   Build (SIMDe, the AVX-512 / AVX-VNNI variants emulated on any x86-64-v3 CPU):
       cc -O2 -mavx2 -mfma -mf16c -DGPT2S_HARNESS_SIMDE -I <simde_py.get_include()> \
          -I src/gpt2s/kernels tests/harness/kernel_harness.c -lm
   Build (aarch64, run under qemu-user; the neon, neon-dotprod and neon-bf16 levels):
       aarch64-linux-gnu-gcc -O2 -static -I src/gpt2s/kernels tests/harness/kernel_harness.c -lm
       qemu-aarch64 -cpu max ./a.out     (cortex-a76: no bf16; cortex-a53: neither extension)
   Options: --quick (rows 1-9, 16, 17, 32, 33: every tile shape and remainder), --dispatch
   (only the kernels the run-time dispatch picks on this CPU, rows 1, 2, 5).  Every run first
   prints the levels this CPU runs (CPU-LEVELS) and each type's choice (BEST).
   tests/test_kernel_harness.py builds and runs all three. */

#ifdef GPT2S_HARNESS_SIMDE
#include "simde_shim.h"
#endif
#include "types.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static int failures, passes, skips;

/* ------------------------------------------------------------------ helpers */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double urand(void) {   /* uniform [0, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}
static float srand_f(void) { return (float)(2.0 * urand() - 1.0); }

#define SENTINEL 12345.678f

/* whether this level's functions can run here */
static int level_runs(int isa) {
#ifdef GPT2S_HARNESS_SIMDE
    /* the levels above x86-64-v3 are emulated (simde_shim.h); x86-64-v3 itself is native */
    if (isa > GPT2S_ISA_X86_64_V3) return gpt2s_cpu_has(GPT2S_ISA_X86_64_V3);
#endif
    return gpt2s_cpu_has(isa);
}

static void report(int ok, const char *what, const char *detail) {
    printf("%s %s %s\n", ok ? "PASS" : "FAIL", what, detail);
    if (ok) passes++;
    else failures++;
}

/* stored weights of type t for a logical W (K, N) with element (k, j) = w[k * N + j]:
   input-major [K][ldw] (float32, bfloat16 Conv1D) or output-major [N][ldw] */
typedef struct {
    void *W;
    uint16_t *S;
    float *wide;   /* the portable widening, logical (K, N): wide[k * N + j] */
    int ldw;
} stored;

static size_t elem_size(int t) {
    return t == GPT2S_WTYPE_F32 ? 4 : t == GPT2S_WTYPE_BF16 ? 2 : 1;
}

/* w (K, N) -> stored in the given layout, and its portable widening */
static void store_weights(int t, int output_major, const float *w, int K, int N, stored *s) {
    int rows = output_major ? N : K, cols = output_major ? K : N;
    int blocked = gpt2s_wtypes[t].block > 0;
    s->ldw = blocked ? K : cols + 3;   /* blocked types: rows contiguous (ldw = K) */
    float *x = malloc(sizeof(float) * (size_t)rows * cols);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            x[(size_t)r * cols + c] = output_major ? w[(size_t)c * N + r] : w[(size_t)r * N + c];
    int64_t row_bytes = blocked ? gpt2s_wtype_bytes(t, K) : (int64_t)s->ldw * elem_size(t);
    /* the padding of each stored row and the bytes past the array hold large values
       (float32 / bfloat16 ~1e30, int8 0x77): a kernel that reads them shows it */
    s->W = malloc((size_t)rows * row_bytes + 64);
    if (t == GPT2S_WTYPE_F32)
        for (size_t i = 0; i < ((size_t)rows * row_bytes + 64) / 4; i++) ((float *)s->W)[i] = 1e30f;
    else if (t == GPT2S_WTYPE_BF16)
        for (size_t i = 0; i < ((size_t)rows * row_bytes + 64) / 2; i++)
            ((uint16_t *)s->W)[i] = 0x7149;
    else
        memset(s->W, 0x77, (size_t)rows * row_bytes + 64);
    s->S = blocked ? calloc((size_t)rows * (K / 32) + 1, 2) : NULL;
    if (t == GPT2S_WTYPE_F32) {
        for (int r = 0; r < rows; r++)
            memcpy((float *)s->W + (size_t)r * s->ldw, x + (size_t)r * cols, sizeof(float) * cols);
    } else if (t == GPT2S_WTYPE_BF16) {
        for (int r = 0; r < rows; r++)
            gpt2s_bf16_quantize((uint16_t *)s->W + (size_t)r * s->ldw, NULL, x + (size_t)r * cols,
                                1, cols, cols, 1);
    } else if (gpt2s_wtypes[t].quantize(s->W, s->S, x, rows, cols, cols, 1) != 0) {
        fprintf(stderr, "quantize failed\n");
        exit(2);
    }
    /* the portable widening (float32: the values themselves) */
    float *pw = malloc(sizeof(float) * (size_t)rows * cols);
    if (t == GPT2S_WTYPE_F32) memcpy(pw, x, sizeof(float) * (size_t)rows * cols);
    else gpt2s_wtypes[t].widen[GPT2S_ISA_PORTABLE](pw, cols, s->W, s->ldw, s->S, rows, cols);
    s->wide = malloc(sizeof(float) * (size_t)K * N);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            float v = pw[(size_t)r * cols + c];
            if (output_major) s->wide[(size_t)c * N + r] = v;
            else s->wide[(size_t)r * N + c] = v;
        }
    free(pw);
    free(x);
}

static void free_stored(stored *s) {
    free(s->W);
    free(s->S);
    free(s->wide);
}

/* ------------------------------------------------------------------ direct kernels */

/* the last K of each list is past the one-row kernels' stack scratch (bf16: 8192 floats, the
   blocked types: 16384 int16), which then take the tile route: tried for M <= 2 only */
static const int KS_FLOAT[] = {1, 7, 16, 33, 63, 100, 130, 8195};
static const int KS_BLOCKED[] = {32, 96, 160, 544, 16416};
static const int NS[] = {1, 3, 8, 17, 33, 47, 70};
#define LEN(a) ((int)(sizeof(a) / sizeof((a)[0])))
#define MAXM 33
/* the row counts of A tried: 1 to 33; --quick: those that still reach every tile shape and
   remainder (1: the one-row kernels, 2-9, 16-17, 32-33); --dispatch: 1, 2 and 5 */
static int ms[MAXM], n_ms;

/* For one direct kernel f, every M in 1..33, every (K, N) and accumulate on and off: the
   worst error relative to its bound.  other (may be NULL): a kernel whose outputs f must
   equal bit for bit. */
#if defined(__aarch64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
/* GCC 12 for aarch64 crashes (internal compiler error in vect_transform_reduction) when it
   vectorises the reference sums below: left scalar there */
__attribute__((optimize("no-tree-vectorize")))
#endif
static void check_direct(int t, int output_major, int isa, gpt2s_direct_fn f,
                         gpt2s_direct_fn other, const char *other_name) {
    const char *layout = output_major ? "direct-out" : "direct-in";
    int blocked = gpt2s_wtypes[t].block > 0;
    const int *ks = blocked ? KS_BLOCKED : KS_FLOAT;
    int nk = blocked ? LEN(KS_BLOCKED) : LEN(KS_FLOAT);
    for (int im = 0; im < n_ms; im++) {
        int M = ms[im];
        char what[160], detail[256];
        snprintf(what, sizeof what, "%-8s %-11s %-10s M=%-2d", gpt2s_wtypes[t].name,
                 gpt2s_isa_names[isa], layout, M);
        if (!level_runs(isa)) {
            printf("SKIP-CPU %s (this CPU lacks %s)\n", what, gpt2s_isa_names[isa]);
            skips++;
            continue;
        }
        double worst = 0.0;
        int worst_k = 0, worst_n = 0, worst_acc = 0, untouched = 1, exact = 1, finite = 1;
        for (int ik = 0; ik < nk; ik++)
            for (int in = 0; in < LEN(NS); in++) {
                int K = ks[ik], N = NS[in];
                if (ik == nk - 1 && (M > 2 || N > 17)) continue;
                float *w = malloc(sizeof(float) * (size_t)K * N);
                for (int i = 0; i < K * N; i++) w[i] = srand_f() * (i % 5 == 0 ? 4.0f : 1.0f);
                stored s;
                store_weights(t, output_major, w, K, N, &s);
                int lda = K + 5, ldc = N + 4;
                float *A = malloc(sizeof(float) * (size_t)M * lda);
                float *C = malloc(sizeof(float) * (size_t)M * ldc);
                float *C2 = malloc(sizeof(float) * (size_t)M * ldc);
                float *C0 = malloc(sizeof(float) * (size_t)M * ldc);
                for (int i = 0; i < M * lda; i++) A[i] = srand_f();
                /* max|a| of each block of 32 of each row (the one-row kernels' int16 step) */
                double *bmax = calloc((size_t)M * (K / 32 + 1), sizeof(double));
                if (blocked && M == 1)
                    for (int k = 0; k < K; k++)
                        bmax[k / 32] = fmax(bmax[k / 32], fabs(A[k]));
                for (int acc = 0; acc < 2; acc++) {
                    for (int i = 0; i < M * ldc; i++)
                        C0[i] = (i % ldc) < N ? (acc ? srand_f() : SENTINEL) : SENTINEL;
                    memcpy(C, C0, sizeof(float) * (size_t)M * ldc);
                    f(M, N, K, A, lda, s.W, s.ldw, s.S, acc, C, ldc);
                    if (other) {
                        memcpy(C2, C0, sizeof(float) * (size_t)M * ldc);
                        other(M, N, K, A, lda, s.W, s.ldw, s.S, acc, C2, ldc);
                        if (memcmp(C, C2, sizeof(float) * (size_t)M * ldc) != 0) exact = 0;
                    }
                    for (int m = 0; m < M; m++) {
                        const float *a = A + (size_t)m * lda;
                        for (int j = N; j < ldc; j++)
                            if (C[(size_t)m * ldc + j] != SENTINEL) untouched = 0;
                        for (int j = 0; j < N; j++) {
                            double ref = acc ? C0[(size_t)m * ldc + j] : 0.0, mag = fabs(ref);
                            /* the rounding of the activations per block of 32: int8's
                               one-row kernel to int16, int4's kernels (every M) to int8 */
                            double act = 0.0, step = t == GPT2S_WTYPE_Q4 ? 254.0 : 65534.0;
                            int rounds = blocked && (M == 1 || t == GPT2S_WTYPE_Q4);
                            for (int k = 0; k < K; k++) {
                                double wk = s.wide[(size_t)k * N + j];
                                ref += (double)a[k] * wk;
                                mag += fabs((double)a[k] * wk);
                                if (rounds) {
                                    double amax = 0.0;
                                    for (int i = k - k % 32; i < k - k % 32 + 32; i++)
                                        amax = fmax(amax, fabs(a[i]));
                                    act += fabs(wk) * (amax / step + 4e-7 * fabs(a[k]));
                                }
                            }
                            double bound = (K + 8) * 5.9604644775390625e-08 * mag
                                           + 1.01 * act + 1e-30;
                            double got = C[(size_t)m * ldc + j];
                            if (!isfinite(got)) finite = 0;
                            double r = fabs(got - ref) / bound;
                            if (!(r <= worst) && isfinite(r)) {
                                worst = r;
                                worst_k = K;
                                worst_n = N;
                                worst_acc = acc;
                            }
                        }
                    }
                }
                free(A); free(C); free(C2); free(C0); free(w); free(bmax);
                free_stored(&s);
            }
        int ok = worst <= 1.0 && untouched && exact && finite;
        snprintf(detail, sizeof detail,
                 "worst err/bound %.3g (K=%d N=%d acc=%d)%s%s%s%s%s", worst, worst_k, worst_n,
                 worst_acc, untouched ? "" : "; WROTE OUTSIDE C[0:M, 0:n]",
                 finite ? "" : "; NON-FINITE OUTPUT", other ? (exact ? "; bit-exact vs " :
                 "; NOT BIT-EXACT vs ") : "", other ? other_name : "", "");
        report(ok, what, detail);
    }
}

/* ------------------------------------------------------------------ widen */

/* the variant's widening equals the portable one bit for bit (every conversion is exact) */
static void check_widen(int t, int isa, gpt2s_widen_fn f) {
    char what[160], detail[200];
    snprintf(what, sizeof what, "%-8s %-11s %-10s rows=1..33", gpt2s_wtypes[t].name,
             gpt2s_isa_names[isa], "widen");
    if (!level_runs(isa)) {
        printf("SKIP-CPU %s (this CPU lacks %s)\n", what, gpt2s_isa_names[isa]);
        skips++;
        return;
    }
    int blocked = gpt2s_wtypes[t].block > 0;
    static const int COLS_F[] = {1, 7, 8, 9, 31, 100};
    static const int COLS_B[] = {32, 64, 160};
    const int *cs = blocked ? COLS_B : COLS_F;
    int ncs = blocked ? LEN(COLS_B) : LEN(COLS_F), bad = 0, cases = 0;
    for (int rows = 1; rows <= MAXM; rows++)
        for (int ic = 0; ic < ncs; ic++) {
            int cols = cs[ic];
            float *w = malloc(sizeof(float) * (size_t)rows * cols);
            for (int i = 0; i < rows * cols; i++) w[i] = srand_f() * 3.0f;
            stored s;   /* as a (cols, rows) weight stored output-major: [rows][ldw] */
            store_weights(t, 1, w, cols, rows, &s);
            int ldo = cols + 2;
            float *o1 = malloc(sizeof(float) * (size_t)rows * ldo);
            float *o2 = malloc(sizeof(float) * (size_t)rows * ldo);
            for (int i = 0; i < rows * ldo; i++) o1[i] = o2[i] = SENTINEL;
            gpt2s_wtypes[t].widen[GPT2S_ISA_PORTABLE](o1, ldo, s.W, s.ldw, s.S, rows, cols);
            f(o2, ldo, s.W, s.ldw, s.S, rows, cols);
            if (memcmp(o1, o2, sizeof(float) * (size_t)rows * ldo) != 0) bad++;
            cases++;
            free(o1); free(o2); free(w);
            free_stored(&s);
        }
    snprintf(detail, sizeof detail, "%d of %d panels bit-exact vs portable", cases - bad, cases);
    report(bad == 0, what, detail);
}

/* ------------------------------------------------------------------ quantize */

static double f16_value(uint16_t h) {   /* independent of q8.h's conversion */
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -v : v;
}

static void check_quantize_bf16(void) {
    int bad = 0, n = 0;
    float x[4096];
    for (int i = 0; i < 4096; i++) {
        double v = srand_f() * ldexp(1.0, (int)(urand() * 60) - 30);
        x[i] = (float)v;
    }
    x[0] = 0.0f; x[1] = -0.0f; x[2] = INFINITY; x[3] = -INFINITY; x[4] = NAN;
    x[5] = 3.4028234663852886e38f;  /* rounds to inf */
    x[6] = 1e-40f;                  /* subnormal */
    /* exact ties: a bf16 plus half its last unit */
    x[7] = (float)(1.0 + ldexp(1.0, -8));
    x[8] = (float)(1.0 + 3 * ldexp(1.0, -8));
    uint16_t out[4096];
    /* through the table's entry, strided (sk = 2) and contiguous */
    gpt2s_wtypes[GPT2S_WTYPE_BF16].quantize(out, NULL, x, 1, 4096, 0, 1);
    for (int i = 0; i < 4096; i++, n++) {
        float f = x[i];
        uint16_t want;
        if (isnan(f)) {
            bad += !((out[i] & 0x7f80) == 0x7f80 && (out[i] & 0x7f) != 0);
            continue;
        }
        /* the two bf16 around f, by truncation and the next one up in magnitude */
        uint32_t u;
        memcpy(&u, &f, 4);
        uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
        double dlo = gpt2s_bf16_to_f32(lo), dhi;
        if ((hi & 0x7fff) >= 0x7f80) dhi = (lo & 0x8000) ? -INFINITY : INFINITY;
        else dhi = gpt2s_bf16_to_f32(hi);
        double el = fabs((double)f - dlo), eh;
        if (isinf(dhi)) {   /* past the largest bf16: overflow when at least halfway */
            double half_ulp = ldexp(1.0, 127 - 8);
            eh = fabs(fabs((double)f) - (fabs(dlo) + 2 * half_ulp));
        } else {
            eh = fabs((double)f - dhi);
        }
        want = el < eh ? lo : el > eh ? hi : ((lo & 1) ? hi : lo);
        if (isinf(f)) want = lo;
        if (out[i] != want) bad++;
    }
    float xs[2 * 64];
    uint16_t o2[64];
    for (int i = 0; i < 64; i++) { xs[2 * i] = x[100 + i]; xs[2 * i + 1] = 0.0f; }
    gpt2s_wtypes[GPT2S_WTYPE_BF16].quantize(o2, NULL, xs, 1, 64, 0, 2);
    if (memcmp(o2, out + 100, sizeof o2) != 0) bad++;
    char detail[120];
    snprintf(detail, sizeof detail, "%d of %d values rounded to nearest even (+ strided)",
             n - bad, n);
    report(bad == 0, "bfloat16 portable    quantize", detail);
}

/* a row of K weights in varied blocks: random magnitudes, all-zero, tiny (fp16 subnormal
   scales), a single spike, ties */
static void fill_blocks(float *x, int K) {
    for (int b = 0; b < K / 32; b++) {
        float *y = x + b * 32;
        int kind = b % 6;
        double scale = ldexp(1.0, (int)(urand() * 20) - 10);
        for (int i = 0; i < 32; i++) {
            y[i] = kind == 1 ? 0.0f
                 : kind == 2 ? (float)(srand_f() * 1e-6)
                 : (float)(srand_f() * scale);
        }
        if (kind == 3) y[(b * 7) % 32] = (float)(50.0 * scale);
        if (kind == 4) y[(b * 5) % 32] = (float)(-50.0 * scale);
    }
}

static void check_quantize_blocked(int t) {
    const int K = 32 * 30, N = 5;
    float *x = malloc(sizeof(float) * K * N), *xt = malloc(sizeof(float) * K * N);
    for (int n = 0; n < N; n++) fill_blocks(x + n * K, K);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) xt[(size_t)k * N + n] = x[(size_t)n * K + k];
    size_t bytes = (size_t)gpt2s_wtype_bytes(t, K) * N;
    uint8_t *W = malloc(bytes), *W2 = malloc(bytes);
    uint16_t *S = malloc(2 * N * (K / 32)), *S2 = malloc(2 * N * (K / 32));
    int bad = 0, rc = gpt2s_wtypes[t].quantize(W, S, x, N, K, K, 1);
    /* the transposed source, strided (a Conv1D weight [K, N]: sn = 1, sk = N) */
    int rc2 = gpt2s_wtypes[t].quantize(W2, S2, xt, N, K, 1, N);
    if (rc || rc2 || memcmp(W, W2, bytes) || memcmp(S, S2, 2 * N * (K / 32))) bad++;
    for (int n = 0; n < N && !bad; n++)
        for (int b = 0; b < K / 32; b++) {
            const float *y = x + n * K + b * 32;
            uint16_t h = S[n * (K / 32) + b];
            double d = f16_value(h), amax = 0.0, m = 0.0;
            for (int i = 0; i < 32; i++)
                if (fabs(y[i]) > amax) { amax = fabs(y[i]); m = y[i]; }
            for (int i = 0; i < 32; i++) {
                int q;
                if (t == GPT2S_WTYPE_Q8) {
                    q = ((const int8_t *)W)[(size_t)n * K + b * 32 + i];
                    /* the smallest fp16 scale with 127 d >= max|w|; q = round(w / d) */
                    if (i == 0 && (d * 127.0 < amax || (h > 0 && f16_value(h - 1) * 127.0 >= amax)))
                        bad++;
                    double want = d == 0.0 ? 0.0 : nearbyint((double)y[i] / d);
                    if (q != (int)want || q < -127 || q > 127) bad++;
                } else {
                    uint8_t byte = W[(size_t)n * (K / 2) + b * 16 + (i & 15)];
                    q = (i < 16 ? byte & 15 : byte >> 4);
                    /* d: the fp16 nearest to max|w| / 8, the sign opposite to the largest
                       element's, which becomes q = 0; the others within |d| / 2, a clamped
                       one at 15 within |d| (for a normal fp16 d: a subnormal one is too coarse
                       for m / d to stay near -8, as in llama.cpp's Q4_0) */
                    if (i == 0) {
                        uint16_t mag = h & 0x7fff;
                        double want = amax / 8.0;
                        double e0 = fabs(f16_value(mag) - want);
                        if ((mag > 0 && fabs(f16_value(mag - 1) - want) < e0)
                            || fabs(f16_value(mag + 1) - want) < e0
                            || (m != 0.0 && (d > 0) == (m > 0))) {
                            if (getenv("HARNESS_DEBUG")) fprintf(stderr, "q4 scale n=%d b=%d h=%04x amax=%g m=%g\n", n, b, h, amax, m);
                            bad++;
                        }
                    }
                    double err = fabs(y[i] - d * (q - 8));
                    double lim = q == 15 ? fabs(d) : fabs(d) * 0.5;
                    if (err > lim * (1 + 1e-6) + 1e-45 && !(fabs(d) < 6.103515625e-05)) {
                        if (getenv("HARNESS_DEBUG")) fprintf(stderr, "q4 n=%d b=%d i=%d y=%g d=%g q=%d\n", n, b, i, y[i], d, q);
                        bad++;
                    }
                    if (y[i] == m && m != 0.0 && q != 0 && !(fabs(d) < 6.103515625e-05)) {
                        if (getenv("HARNESS_DEBUG")) fprintf(stderr, "q4 max n=%d b=%d i=%d q=%d d=%g m=%g\n", n, b, i, q, d, m);
                        bad++;
                    }
                }
            }
        }
    /* a non-finite weight or an out-of-range one is refused */
    float z[32] = {0};
    z[3] = NAN;
    if (gpt2s_wtypes[t].quantize(W, S, z, 1, 32, 32, 1) != -1) bad++;
    z[3] = INFINITY;
    if (gpt2s_wtypes[t].quantize(W, S, z, 1, 32, 32, 1) != -1) bad++;
    z[3] = 3e38f;
    if (gpt2s_wtypes[t].quantize(W, S, z, 1, 32, 32, 1) != -1) bad++;
    char what[80], detail[120];
    snprintf(what, sizeof what, "%-8s %-11s %s", gpt2s_wtypes[t].name, "portable", "quantize");
    snprintf(detail, sizeof detail, "%d blocks: scales, levels, strided source, refusals: %s",
             N * K / 32, bad ? "WRONG" : "as specified");
    report(bad == 0, what, detail);
    free(x); free(xt); free(W); free(W2); free(S); free(S2);
}

/* The portable widening (the reference of the others) against the format's definition,
   recomputed here: bfloat16 the top half of a float32, int8 d q, int4 d (q - 8) with the
   nibble order of q4.h, d an fp16 scale per block of 32 */
static void check_widen_portable(int t) {
    static const int COLS_F[] = {1, 7, 33};
    static const int COLS_B[] = {32, 96};
    int blocked = gpt2s_wtypes[t].block > 0, bad = 0, cases = 0;
    const int *cs = blocked ? COLS_B : COLS_F;
    int ncs = blocked ? LEN(COLS_B) : LEN(COLS_F);
    for (int rows = 1; rows <= MAXM; rows += 8)
        for (int ic = 0; ic < ncs; ic++) {
            int cols = cs[ic];
            float *w = malloc(sizeof(float) * (size_t)rows * cols);
            for (int i = 0; i < rows * cols; i++) w[i] = srand_f() * 3.0f;
            stored s;
            store_weights(t, 1, w, cols, rows, &s);   /* s.wide: the portable widening */
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++) {
                    double want;
                    if (t == GPT2S_WTYPE_BF16) {
                        uint32_t u = (uint32_t)((const uint16_t *)s.W)[(size_t)r * s.ldw + c] << 16;
                        float f;
                        memcpy(&f, &u, 4);
                        want = f;
                    } else {
                        double d = f16_value(s.S[(size_t)r * (cols / 32) + c / 32]);
                        int q;
                        if (t == GPT2S_WTYPE_Q8) {
                            q = ((const int8_t *)s.W)[(size_t)r * cols + c];
                        } else {
                            uint8_t byte = ((const uint8_t *)s.W)[(size_t)r * (cols / 2)
                                                                  + (c / 32) * 16 + c % 16];
                            q = (c % 32 < 16 ? byte & 15 : byte >> 4) - 8;
                        }
                        want = d * q;
                    }
                    /* s.wide is logical (K = cols, N = rows): element (c, r) */
                    if ((double)s.wide[(size_t)c * rows + r] != want) bad++;
                    cases++;
                }
            free(w);
            free_stored(&s);
        }
    char what[80], detail[120];
    snprintf(what, sizeof what, "%-8s %-11s %s", gpt2s_wtypes[t].name, "portable", "widen");
    snprintf(detail, sizeof detail, "%d of %d weights equal to the format's definition",
             cases - bad, cases);
    report(bad == 0, what, detail);
}

/* ------------------------------------------------------------------ main */

#if GPT2S_HAVE_NEON_BF16
/* The neon-bf16 level compiles and runs what it promises: bfdot and bfmmla (which no weight
   type's kernels use, isa.h) in a function of that target, called only where the CPU has
   them, on bfloat16 inputs whose products and sums are exact in float32. */
GPT2S_NEON_BF static void bf16_probe_arch_neon_bf16(const uint16_t *a, const uint16_t *b,
                                                    float *dot, float *mmla) {
    bfloat16x8_t va = vreinterpretq_bf16_u16(vld1q_u16(a));
    bfloat16x8_t vb = vreinterpretq_bf16_u16(vld1q_u16(b));
    vst1q_f32(dot, vbfdotq_f32(vdupq_n_f32(0.0f), va, vb));
    vst1q_f32(mmla, vbfmmlaq_f32(vdupq_n_f32(0.0f), va, vb));
}

static void check_bf16_probe(void) {
    const char *what = "neon-bf16 probe      bfdot, bfmmla";
    if (!level_runs(GPT2S_ISA_NEON_BF16)) {
        printf("SKIP-CPU %s (this CPU lacks neon-bf16)\n", what);
        skips++;
        return;
    }
    uint16_t a[8], b[8];
    float x[8], y[8], dot[4], mmla[4];
    for (int i = 0; i < 8; i++) {   /* small integers: exact in bfloat16, products and sums */
        x[i] = (float)(i - 3);
        y[i] = (float)(2 * i + 1);
        a[i] = gpt2s_f32_to_bf16(x[i]);
        b[i] = gpt2s_f32_to_bf16(y[i]);
    }
    bf16_probe_arch_neon_bf16(a, b, dot, mmla);
    int bad = 0;
    for (int i = 0; i < 4; i++)   /* bfdot: lane i = pair i of a . pair i of b */
        bad += dot[i] != x[2 * i] * y[2 * i] + x[2 * i + 1] * y[2 * i + 1];
    for (int i = 0; i < 2; i++)   /* bfmmla: (2 x 4 of a) @ (2 x 4 of b)^T, row-major 2 x 2 */
        for (int j = 0; j < 2; j++) {
            float want = 0.0f;
            for (int k = 0; k < 4; k++) want += x[4 * i + k] * y[4 * j + k];
            bad += mmla[2 * i + j] != want;
        }
    report(bad == 0, what, bad ? "WRONG" : "exact on small integers");
}
#endif

int main(int argc, char **argv) {
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    int dispatch = argc > 1 && strcmp(argv[1], "--dispatch") == 0;
    if (argc > 1 && !quick && !dispatch) {
        fprintf(stderr, "usage: %s [--quick | --dispatch]\n", argv[0]);
        return 2;
    }
    for (int M = 1; M <= MAXM; M++)
        if (dispatch ? M == 1 || M == 2 || M == 5
                     : !quick || M <= 9 || M == 16 || M == 17 || M == 32 || M == 33)
            ms[n_ms++] = M;
    printf("kernel harness: %s build%s\n",
#ifdef GPT2S_HARNESS_SIMDE
           "SIMDe (levels above x86-64-v3 emulated)",
#elif defined(__aarch64__)
           "aarch64",
#else
           "native",
#endif
           quick ? ", quick" : dispatch ? ", dispatch only" : "");
    /* what the run-time checks found, and what each type therefore runs */
    printf("CPU-LEVELS");
    for (int isa = 0; isa < GPT2S_NISA; isa++)
        if (gpt2s_cpu_has(isa)) printf(" %s", gpt2s_isa_names[isa]);
    printf("\n");
    for (int t = 0; t < GPT2S_NWTYPES; t++)
        printf("BEST %s %s\n", gpt2s_wtypes[t].name,
               gpt2s_isa_names[gpt2s_wtype_best_variant(t)]);
    check_quantize_bf16();
    check_quantize_blocked(GPT2S_WTYPE_Q8);
    check_quantize_blocked(GPT2S_WTYPE_Q4);
    for (int t = GPT2S_WTYPE_BF16; t < GPT2S_NWTYPES; t++) check_widen_portable(t);
    if (dispatch) {
        /* the kernels the table's dispatch picks on this CPU, through the same lookups as
           _core's (gpt2s_wtype_direct / gpt2s_wtype_widen of the best variant) */
        for (int t = 0; t < GPT2S_NWTYPES; t++) {
            int best = gpt2s_wtype_best_variant(t);
            for (int om = 0; om < 2; om++) {
                gpt2s_direct_fn f = best ? gpt2s_wtype_direct(t, om, best) : NULL;
                if (f) check_direct(t, om, best, f, NULL, "");
            }
            if (best && gpt2s_wtypes[t].widen[GPT2S_ISA_PORTABLE])
                check_widen(t, best, gpt2s_wtype_widen(t, best));
        }
#if GPT2S_HAVE_NEON_BF16
        check_bf16_probe();
#endif
        printf("%d passed, %d failed, %d skipped by CPU\n", passes, failures, skips);
        return failures ? 1 : 0;
    }
    int tested = 0;
    for (int t = 0; t < GPT2S_NWTYPES; t++) {
        for (int isa = 1; isa < GPT2S_NISA; isa++) {
            if (!gpt2s_wtype_built_variant(t, isa)) continue;   /* runs its base level's */
            for (int om = 0; om < 2; om++) {
                gpt2s_direct_fn f = om ? gpt2s_wtypes[t].direct_out[isa]
                                       : gpt2s_wtypes[t].direct_in[isa];
                if (!f) continue;
                /* avx-vnni's int8 kernel, and int4's avx-vnni, avx512 and avx512-vnni
                   kernels (the same int32 block sums by other instructions), promise
                   x86-64-v3's outputs bit for bit */
                gpt2s_direct_fn other = NULL;
                const char *other_name = gpt2s_isa_names[gpt2s_isa_base(isa)];
                if ((isa == GPT2S_ISA_AVX_VNNI && t == GPT2S_WTYPE_Q8)
                    || (t == GPT2S_WTYPE_Q4
                        && (isa == GPT2S_ISA_AVX_VNNI || isa == GPT2S_ISA_AVX512
                            || isa == GPT2S_ISA_AVX512_VNNI))) {
                    other = gpt2s_wtype_direct(t, om, GPT2S_ISA_X86_64_V3);
                    other_name = gpt2s_isa_names[GPT2S_ISA_X86_64_V3];
                }
                /* neon-dotprod's int8 / int4 kernels compute neon's integer sums and then
                   the same float arithmetic: neon's outputs bit for bit */
                if (isa == GPT2S_ISA_NEON_DOTPROD && gpt2s_wtypes[t].block > 0)
                    other = gpt2s_wtype_direct(t, om, GPT2S_ISA_NEON);
                check_direct(t, om, isa, f, other, other_name);
                tested++;
            }
            if (gpt2s_wtypes[t].widen[isa]) {
                check_widen(t, isa, gpt2s_wtypes[t].widen[isa]);
                tested++;
            }
        }
    }
#if GPT2S_HAVE_NEON_BF16
    check_bf16_probe();
#endif
    printf("%d passed, %d failed, %d skipped by CPU (%d kernels of this build)\n", passes,
           failures, skips, tested);
    if (tested == 0) printf("note: this build has no variant above portable\n");
    return failures ? 1 : 0;
}
