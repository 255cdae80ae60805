/* The C-level harness of the bfloat16 compute GEMM (kernels/bf16gemm.h): every variant against
   an independent double-precision sum of the bfloat16-rounded products, on shapes that hit
   every tail (rows of A past the 8-row tile, columns past the 16- and 32-column halves, odd K,
   K past one packed block), every operand layout the model uses (A and B transposed or not,
   B float32 or bfloat16), accumulate on and off, and a C wider than its rows whose columns past
   N must stay untouched.

   The portable variant must equal a float32 sum in k order of the exact products (checked
   bit for bit against that sum recomputed here); every variant must be within float32
   summation error of the double reference: (K + 8) 2^-23 sum |a b| (+ 2^-120 for the
   denormal products the hardware flushes).

   One line per case: PASS, FAIL, or SKIP-CPU (a variant this CPU cannot run: not a pass).

   Build (native):  cc -O2 -I src/gpt2s/kernels tests/harness/bf16gemm_harness.c -lm
   Build (SIMDe):   cc -O2 -mavx2 -mfma -mf16c -DGPT2S_HARNESS_SIMDE -I <simde include> \
                       -I tests/harness -I src/gpt2s/kernels tests/harness/bf16gemm_harness.c -lm
   tests/test_bf16_compute.py builds and runs both. */

#ifdef GPT2S_HARNESS_SIMDE
#include "simde_shim.h"
static inline simde__m512bh gpt2s_harness_as_bh(simde__m512i x) {
    simde__m512bh r;
    memcpy(&r, &x, sizeof(r));
    return r;
}
#define GPT2S_M512_AS_BH(x) gpt2s_harness_as_bh(x)
#endif
#include "bf16gemm.h"

#include <stdio.h>
#include <math.h>

static int failures, passes, skips;

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static double urand(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

#define SENTINEL -7777.25f

static int level_runs(int isa) {
#ifdef GPT2S_HARNESS_SIMDE
    if (isa > GPT2S_ISA_X86_64_V3) return gpt2s_cpu_has(GPT2S_ISA_X86_64_V3);
#endif
    return gpt2s_cpu_has(isa);
}

/* bfloat16 rounding to nearest even written independently of bf16.h: the float's value
   rounded to 8 significant bits through double arithmetic (ties to even by rint) */
static double ref_bf16(float x) {
    if (x == 0.0f || isinf(x) || isnan(x)) return x;
    int e;
    frexp((double)x, &e);                 /* |x| in [2^(e-1), 2^e) */
    int lsb_exp = e - 8;                  /* 8 significant bits */
    if (lsb_exp < -133) lsb_exp = -133;   /* bfloat16 denormals share float32's exponent range */
    double q = ldexp(1.0, lsb_exp);
    return rint((double)x / q) * q;
}

typedef struct {
    int M, N, K, ta, tb, b_bf16, accumulate;
} gemm_case;

static void run_case(int isa, const gemm_case *c) {
    int M = c->M, N = c->N, K = c->K;
    int64_t ldc = N + 3;
    /* A logical (M, K): stored (M, K) or, transposed, (K, M) with a wider row */
    int64_t lda = (c->ta ? M : K) + 2, ars = c->ta ? 1 : lda, acs = c->ta ? lda : 1;
    int64_t ldb = (c->tb ? K : N) + 1, brs = c->tb ? 1 : ldb, bcs = c->tb ? ldb : 1;
    size_t asz = (size_t)(c->ta ? K : M) * lda, bsz = (size_t)(c->tb ? N : K) * ldb;
    float *A = malloc(sizeof(float) * (asz + 1)), *Bf = malloc(sizeof(float) * (bsz + 1));
    uint16_t *Bh = malloc(sizeof(uint16_t) * (bsz + 1));
    float *C = malloc(sizeof(float) * (size_t)M * ldc), *C0 = malloc(sizeof(float) * (size_t)M * ldc);
    float *Cp = malloc(sizeof(float) * (size_t)M * ldc);
    char what[160];
    snprintf(what, sizeof what, "bf16gemm %s M=%d N=%d K=%d ta=%d tb=%d B=%s acc=%d",
             gpt2s_isa_names[isa], M, N, K, c->ta, c->tb, c->b_bf16 ? "bf16" : "f32",
             c->accumulate);
    if (!level_runs(isa) || gpt2s_bf16gemm_variant(isa) == NULL) {
        printf("SKIP-CPU %s\n", what);
        skips++;
        goto done;
    }
    for (size_t i = 0; i < asz; i++) {
        double u = urand();
        /* a few exact ties, zeros and tiny values among ordinary ones */
        A[i] = u < 0.05 ? 0.0f : u < 0.1 ? (float)(1.0 + 1.0 / 256) * (u < 0.075 ? 1 : -1)
             : u < 0.12 ? 1e-39f : (float)(4.0 * urand() - 2.0);
    }
    for (size_t i = 0; i < bsz; i++) {
        Bf[i] = (float)(2.0 * urand() - 1.0) * (urand() < 0.5 ? 1.0f : 0.01f);
        Bh[i] = gpt2s_f32_to_bf16(Bf[i]);
    }
    for (size_t i = 0; i < (size_t)M * ldc; i++)
        C0[i] = (i % ldc) >= (size_t)N ? SENTINEL : (float)(urand() - 0.5);
    memcpy(C, C0, sizeof(float) * (size_t)M * ldc);
    memcpy(Cp, C0, sizeof(float) * (size_t)M * ldc);
    const void *B = c->b_bf16 ? (const void *)Bh : (const void *)Bf;
    int rc = gpt2s_bf16gemm_variant(isa)(M, N, K, A, ars, acs, B, c->b_bf16, brs, bcs,
                                         c->accumulate, C, ldc);
    int ok = rc == 0;
    double worst = 0.0;
    for (int m = 0; m < M && ok; m++) {
        for (int n = 0; n < N; n++) {
            double sum = c->accumulate ? C0[(int64_t)m * ldc + n] : 0.0, mag = fabs(sum);
            float f32 = c->accumulate ? C0[(int64_t)m * ldc + n] : 0.0f;
            for (int k = 0; k < K; k++) {
                double a = ref_bf16(A[m * ars + k * acs]);
                double b = ref_bf16(Bf[k * brs + n * bcs]);
                sum += a * b;
                mag += fabs(a * b);
                f32 += (float)(a * b);   /* exact in float32: 8 x 8 significant bits */
            }
            double got = C[(int64_t)m * ldc + n];
            double tol = (K + 8) * ldexp(mag, -23) + ldexp(1.0, -120) * (K + 1);
            if (!(fabs(got - sum) <= tol)) ok = 0;
            if (isa == GPT2S_ISA_PORTABLE && got != (double)f32) ok = 0;
            if (mag > 0 && fabs(got - sum) / mag > worst) worst = fabs(got - sum) / mag;
        }
        for (int64_t n = N; n < ldc; n++)
            if (C[(int64_t)m * ldc + n] != SENTINEL) ok = 0;
    }
    char detail[64];
    snprintf(detail, sizeof detail, "(max |err| / sum|ab| %.2e)", worst);
    printf("%s %s %s\n", ok ? "PASS" : "FAIL", what, detail);
    if (ok) passes++;
    else failures++;
done:
    free(A); free(Bf); free(Bh); free(C); free(C0); free(Cp);
}

/* the rounding the variants share (bf16.h), against the independent one above */
static void check_rounding(void) {
    int ok = 1;
    for (int i = 0; i < 200000 && ok; i++) {
        uint32_t u = (uint32_t)(urand() * 4294967296.0);
        float x;
        memcpy(&x, &u, 4);
        if (isnan(x) || isinf(x)) continue;
        double r = ref_bf16(x);
        float got = gpt2s_bf16_round_f32(x);
        if (!isinf(got) && (double)got != r) ok = 0;
        if (isinf(got) && fabs(r) < 3.3895313892515355e38) ok = 0;
    }
    printf("%s bf16gemm rounding portable (200000 random floats vs a double-precision rounding)\n",
           ok ? "PASS" : "FAIL");
    if (ok) passes++;
    else failures++;
}

int main(void) {
    static const int Ms[] = {1, 2, 7, 8, 9, 17, 33};
    static const int Ns[] = {1, 15, 16, 17, 31, 32, 33, 70};
    static const int Ks[] = {1, 2, 3, 31, 64, 515, 1100};
    check_rounding();
    for (int isa = 0; isa < GPT2S_NISA; isa++) {
        if (isa != GPT2S_ISA_PORTABLE && isa != GPT2S_ISA_AVX512_BF16) continue;
        for (unsigned mi = 0; mi < sizeof Ms / sizeof *Ms; mi++)
            for (unsigned ni = 0; ni < sizeof Ns / sizeof *Ns; ni++)
                for (unsigned ki = 0; ki < sizeof Ks / sizeof *Ks; ki++) {
                    int sel = (int)(mi * 7 + ni * 3 + ki);   /* layouts cycled over shapes */
                    gemm_case c = {Ms[mi], Ns[ni], Ks[ki], sel & 1, (sel >> 1) & 1,
                                   (sel >> 2) & 1, (sel / 5) & 1};
                    if (Ks[ki] > 600 && Ms[mi] > 9 && Ns[ni] > 33) continue;   /* time */
                    run_case(isa, &c);
                }
        /* rows past one packed panel of A (1024 rows) */
        gemm_case tall = {1030, 40, 70, 1, 0, 0, 1}, tall_t = {1030, 33, 9, 0, 1, 1, 0};
        run_case(isa, &tall);
        run_case(isa, &tall_t);
    }
    printf("%d passed, %d failed, %d skipped (CPU)\n", passes, failures, skips);
    return failures ? 1 : 0;
}
