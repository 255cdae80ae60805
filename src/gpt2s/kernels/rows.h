/* The row kernels: the per-row C loops under the elementwise, activation, softmax and
   layernorm kernels of _core.pyx (each prange'd over rows there), with what they share:

   - gpt2s_expf, a polynomial exp that vectorises (libm's expf stays scalar);
   - the 16-lane row reductions (gpt2s_max, gpt2s_sum, gpt2s_dot, ...), which vectorise
     without -ffast-math;
   - the activations (GELU tanh and erf, erf/erfc, relu, silu, quick_gelu) forward and
     backward, the softmax rows (log-sum-exp, causal softmax, its backward, crossentropy's
     scaled softmax) and the layernorm rows forward and backward.

   Each exported row kernel is built for the baseline and for x86-64-v3 (GPT2S_CLONES, isa.h).
   Called from _core.pyx (layernorm_*, activation_*, erf_forward, attention_*,
   crossentropy_*) and kernels/sampling.pxi (gpt2s_expf). */

#ifndef GPT2S_ROWS_H
#define GPT2S_ROWS_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include "isa.h"

/* exp(x) for float32 without libm, so that loops calling it vectorise at -O3 (libm's
   expf stays scalar).  x = n ln2 + r with |r| <= ln2/2; exp(r) by its degree-7 Taylor
   polynomial (truncation error < 7.1e-9 relative; measured total < 1e-7, ~1.6 ulp); 2^n by building the exponent bits.
   Rounding to n uses the 1.5 * 2^23 trick, which needs no SSE4.1 round instruction.
   Inputs are clamped to [-87.3, 88.3]: below that the true value is < 1.2e-38 and we return
   ~1.2e-38 (harmless in every sum it enters); above it float32 overflows anyway.  */
static inline float gpt2s_expf(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f;       /* ln2 split hi + lo for an exact r */
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, sizeof(s));
    return p * s;
}

/* Row reductions with 16 independent partial results, so that the compiler vectorises
   them without -ffast-math (which would license it to reorder any float sum).  Still
   fp32 accumulation; the 16-way split only changes the order of the additions. */
#define GPT2S_LANES 16
static inline float gpt2s_max(const float *x, int n) {
    int i, k;
    float m;
    if (n < GPT2S_LANES) {
        m = x[0];
        for (i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
        return m;
    }
    float acc[GPT2S_LANES];
    for (k = 0; k < GPT2S_LANES; k++) acc[k] = x[k];
    for (i = GPT2S_LANES; i + GPT2S_LANES <= n; i += GPT2S_LANES)
        for (k = 0; k < GPT2S_LANES; k++) acc[k] = x[i + k] > acc[k] ? x[i + k] : acc[k];
    m = acc[0];
    for (k = 1; k < GPT2S_LANES; k++) m = acc[k] > m ? acc[k] : m;
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}
static inline float gpt2s_sum(const float *x, int n) {
    float acc[GPT2S_LANES] = {0}, s = 0.0f;
    int i, k;
    for (i = 0; i + GPT2S_LANES <= n; i += GPT2S_LANES)
        for (k = 0; k < GPT2S_LANES; k++) acc[k] += x[i + k];
    for (; i < n; i++) s += x[i];
    for (k = 0; k < GPT2S_LANES; k++) s += acc[k];
    return s;
}
static inline float gpt2s_dot(const float *x, const float *y, int n) {
    float acc[GPT2S_LANES] = {0}, s = 0.0f;
    int i, k;
    for (i = 0; i + GPT2S_LANES <= n; i += GPT2S_LANES)
        for (k = 0; k < GPT2S_LANES; k++) acc[k] += x[i + k] * y[i + k];
    for (; i < n; i++) s += x[i] * y[i];
    for (k = 0; k < GPT2S_LANES; k++) s += acc[k];
    return s;
}
/* sum_i (x_i - m)^2 */
static inline float gpt2s_sum_sq_dev(const float *x, float m, int n) {
    float acc[GPT2S_LANES] = {0}, s = 0.0f, d;
    int i, k;
    for (i = 0; i + GPT2S_LANES <= n; i += GPT2S_LANES)
        for (k = 0; k < GPT2S_LANES; k++) { d = x[i + k] - m; acc[k] += d * d; }
    for (; i < n; i++) { d = x[i] - m; s += d * d; }
    for (k = 0; k < GPT2S_LANES; k++) s += acc[k];
    return s;
}
/* sum_i exp(x_i - shift) */
static inline float gpt2s_sum_exp(const float *x, float shift, int n) {
    float acc[GPT2S_LANES] = {0}, s = 0.0f;
    int i, k;
    for (i = 0; i + GPT2S_LANES <= n; i += GPT2S_LANES)
        for (k = 0; k < GPT2S_LANES; k++) acc[k] += gpt2s_expf(x[i + k] - shift);
    for (; i < n; i++) s += gpt2s_expf(x[i] - shift);
    for (k = 0; k < GPT2S_LANES; k++) s += acc[k];
    return s;
}
/* out_i = exp(x_i - shift) (out may be x); returns their sum */
static inline float gpt2s_exp_store_sum(float *out, const float *x, float shift, int n) {
    float acc[GPT2S_LANES] = {0}, s = 0.0f, e;
    int i, k;
    for (i = 0; i + GPT2S_LANES <= n; i += GPT2S_LANES)
        for (k = 0; k < GPT2S_LANES; k++) {
            e = gpt2s_expf(x[i + k] - shift);
            out[i + k] = e;
            acc[k] += e;
        }
    for (; i < n; i++) { e = gpt2s_expf(x[i] - shift); out[i] = e; s += e; }
    for (k = 0; k < GPT2S_LANES; k++) s += acc[k];
    return s;
}

/* Row kernels are built twice on x86-64 Linux (GPT2S_CLONES, isa.h): for the baseline ISA a
   wheel must run on, and for x86-64-v3, chosen once at load time by the dynamic linker.  The
   polynomial exp runs 3.5x faster with 8-wide FMA. */

/* The logistic sigmoid 1 / (1 + exp(-z)).  GELU uses 0.5 (1 + tanh(u)) = sigmoid(2u),
   which, unlike 1 + tanh(u), keeps its relative precision in the far negative tail. */
static inline float gpt2s_sigmoidf(float z) {
    return 1.0f / (1.0f + gpt2s_expf(-z));
}

#define GPT2S_GELU_2S 1.5957691216057308f   /* 2 sqrt(2 / pi) */

/* out = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3) */
GPT2S_CLONES static void gpt2s_gelu_row(float *out, const float *x, int n) {
    for (int i = 0; i < n; i++) {
        float xi = x[i];
        out[i] = xi * gpt2s_sigmoidf(GPT2S_GELU_2S * (xi + 0.044715f * xi * xi * xi));
    }
}
/* dinp = dout * (s + x s (1 - s) 2 u'), s = sigmoid(2u); dinp may alias dout */
GPT2S_CLONES static void gpt2s_gelu_backward_row(float *dinp, const float *x,
                                                 const float *dout, int n) {
    for (int i = 0; i < n; i++) {
        float xi = x[i];
        float sg = gpt2s_sigmoidf(GPT2S_GELU_2S * (xi + 0.044715f * xi * xi * xi));
        dinp[i] = dout[i] * (sg + xi * sg * (1.0f - sg) * GPT2S_GELU_2S
                             * (1.0f + (float)(3.0 * 0.044715) * xi * xi));
    }
}
/* The other activations of Hugging Face's GPT-2 configs (activation_function), each a
   forward and a backward row kernel like GELU's: branch-free loops (selects, the
   polynomial exp) that vectorise.  The backward kernels recompute what they need from x
   and may write dinp over dout. */

/* erf(z) and erfc(z) in float32 without libm (whose erff/erfcf stay scalar).  Two
   pieces, both evaluated and one selected, so loops over them vectorise:
     |z| < 1:  erf(a) = a + a Pc(a^2), Pc a degree-6 minimax fit of erf(a)/a - 1
               (relative error 1.2e-9 before float32 rounding);
     |z| >= 1: erfc(a) = exp(-a^2) t Pt(t), t = 1 / (1 + a/2), Pt a degree-8 minimax fit
               of erfc(a) exp(a^2) / t on [1, 9.3] (relative error < 2e-9).
   exp(-a^2) = exp(-ah^2) exp(-(a - ah)(a + ah)) with ah = a cut to 12 significant bits, so
   ah^2 is exact and erfc keeps its relative precision far into the tail (a plain a * a
   would lose 1e-6 at a = 4).  Measured in tests/test_variants.py against math.erf /
   math.erfc.  Beyond a = 9.3 erfc stays at erfc(9.3) ~ 4e-39 (a subnormal; the true value
   is smaller still). */
#define GPT2S_ERF_TAIL_MAX 9.3f
static inline float gpt2s_erf_core(float a) {       /* erf(a) for 0 <= a < 1 */
    float s = a * a;
    float p = 7.853903483823199e-05f;
    p = p * s - 8.010207615328918e-04f;
    p = p * s + 5.188329475438139e-03f;
    p = p * s - 2.685381303671422e-02f;
    p = p * s + 1.1283585181667258e-01f;
    p = p * s - 3.7612625828503155e-01f;
    p = p * s + 1.2837916572829755e-01f;           /* 2/sqrt(pi) - 1 */
    return a + a * p;
}
static inline float gpt2s_erfc_tail(float a) {      /* erfc(a) for a >= 1 */
    a = a > GPT2S_ERF_TAIL_MAX ? GPT2S_ERF_TAIL_MAX : a;
    uint32_t bits;
    float ah;
    memcpy(&bits, &a, sizeof(bits));
    bits &= 0xFFFFF000u;
    memcpy(&ah, &bits, sizeof(ah));
    float e = gpt2s_expf(-(ah * ah)) * gpt2s_expf(-((a - ah) * (a + ah)));
    float t = 1.0f / (1.0f + 0.5f * a);
    float p = -4.295244997325508e-02f;
    p = p * t + 2.3600061290038346e-01f;
    p = p * t - 4.2776384211645985e-01f;
    p = p * t + 2.4072426712842213e-01f;
    p = p * t - 1.4365268889132622e-02f;
    p = p * t + 2.0102252505356902e-01f;
    p = p * t + 2.4299800549775957e-01f;
    p = p * t + 2.8242973300297985e-01f;
    p = p * t + 2.820822030399326e-01f;
    return e * t * p;
}
/* erfc(|z|) */
static inline float gpt2s_erfc_abs(float z) {
    float a = z < 0.0f ? -z : z;
    return a < 1.0f ? 1.0f - gpt2s_erf_core(a) : gpt2s_erfc_tail(a);
}
static inline float gpt2s_erff(float z) {
    float a = z < 0.0f ? -z : z;
    float r = a < 1.0f ? gpt2s_erf_core(a) : 1.0f - gpt2s_erfc_tail(a);
    return z < 0.0f ? -r : r;
}
GPT2S_CLONES static void gpt2s_erf_row(float *out, const float *x, int n) {
    for (int i = 0; i < n; i++) out[i] = gpt2s_erff(x[i]);
}
GPT2S_CLONES static void gpt2s_erfc_row(float *out, const float *x, int n) {
    for (int i = 0; i < n; i++) {
        float e = gpt2s_erfc_abs(x[i]);
        out[i] = x[i] < 0.0f ? 2.0f - e : e;
    }
}

#define GPT2S_SQRT1_2 0.70710678118654752f
#define GPT2S_INV_SQRT_2PI 0.39894228040143268f
/* Phi(x) = 0.5 erfc(-x / sqrt 2), the standard normal CDF, from erfc of |x| / sqrt 2 so
   that the negative tail keeps its relative precision (1 + erf would cancel to 0) */
static inline float gpt2s_normal_cdf(float x) {
    float h = 0.5f * gpt2s_erfc_abs(x * GPT2S_SQRT1_2);
    return x > 0.0f ? 1.0f - h : h;
}
/* gelu (erf): out = x Phi(x) */
GPT2S_CLONES static void gpt2s_gelu_erf_row(float *out, const float *x, int n) {
    for (int i = 0; i < n; i++) out[i] = x[i] * gpt2s_normal_cdf(x[i]);
}
/* dinp = dout (Phi(x) + x phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi) */
GPT2S_CLONES static void gpt2s_gelu_erf_backward_row(float *dinp, const float *x,
                                                     const float *dout, int n) {
    for (int i = 0; i < n; i++) {
        float xi = x[i];
        float pdf = GPT2S_INV_SQRT_2PI * gpt2s_expf(-0.5f * xi * xi);
        dinp[i] = dout[i] * (gpt2s_normal_cdf(xi) + xi * pdf);
    }
}
/* relu: out = max(x, 0) (NaN stays NaN); relu'(x) = 1 for x > 0, else 0 (torch's choice
   at 0) */
GPT2S_CLONES static void gpt2s_relu_row(float *out, const float *x, int n) {
    for (int i = 0; i < n; i++) out[i] = x[i] < 0.0f ? 0.0f : x[i];
}
GPT2S_CLONES static void gpt2s_relu_backward_row(float *dinp, const float *x,
                                                 const float *dout, int n) {
    for (int i = 0; i < n; i++) dinp[i] = x[i] > 0.0f ? dout[i] : 0.0f;
}
/* x sigmoid(k x) (silu: k = 1; quick_gelu: k = 1.702) and its derivative
   s (1 + k x (1 - s)), s = sigmoid(k x) */
static inline void gpt2s_x_sigmoid_row(float *out, const float *x, float k, int n) {
    for (int i = 0; i < n; i++) out[i] = x[i] * gpt2s_sigmoidf(k * x[i]);
}
static inline void gpt2s_x_sigmoid_backward_row(float *dinp, const float *x,
                                                const float *dout, float k, int n) {
    for (int i = 0; i < n; i++) {
        float xi = x[i];
        float sg = gpt2s_sigmoidf(k * xi);
        dinp[i] = dout[i] * (sg * (1.0f + k * xi * (1.0f - sg)));
    }
}
GPT2S_CLONES static void gpt2s_silu_row(float *out, const float *x, int n) {
    gpt2s_x_sigmoid_row(out, x, 1.0f, n);
}
GPT2S_CLONES static void gpt2s_silu_backward_row(float *dinp, const float *x,
                                                 const float *dout, int n) {
    gpt2s_x_sigmoid_backward_row(dinp, x, dout, 1.0f, n);
}
#define GPT2S_QUICK_GELU_K 1.702f
GPT2S_CLONES static void gpt2s_quick_gelu_row(float *out, const float *x, int n) {
    gpt2s_x_sigmoid_row(out, x, GPT2S_QUICK_GELU_K, n);
}
GPT2S_CLONES static void gpt2s_quick_gelu_backward_row(float *dinp, const float *x,
                                                       const float *dout, int n) {
    gpt2s_x_sigmoid_backward_row(dinp, x, dout, GPT2S_QUICK_GELU_K, n);
}

GPT2S_CLONES static float gpt2s_logsumexp_row(const float *x, int n) {
    float m = gpt2s_max(x, n);
    return m + logf(gpt2s_sum_exp(x, m, n));
}
/* d = scale * exp(x - lse) */
GPT2S_CLONES static void gpt2s_scaled_softmax_row(float *d, const float *x, float lse,
                                                  float scale, int n) {
    for (int i = 0; i < n; i++) d[i] = scale * gpt2s_expf(x[i] - lse);
}
/* row[0:valid] = softmax(row[0:valid]), row[valid:n] = 0; returns the log-sum-exp */
GPT2S_CLONES static float gpt2s_causal_softmax_row(float *row, int valid, int n) {
    float m = gpt2s_max(row, valid);
    float s = gpt2s_exp_store_sum(row, row, m, valid);
    float inv = 1.0f / s;
    for (int j = 0; j < valid; j++) row[j] *= inv;
    for (int j = valid; j < n; j++) row[j] = 0.0f;
    return m + logf(s);
}
/* p = exp(p - lse), dp = p (dp - D) over [0, valid); both zero on [valid, n) */
GPT2S_CLONES static void gpt2s_softmax_backward_row(float *p, float *dp, float lse, float D,
                                                    int valid, int n) {
    for (int j = 0; j < valid; j++) {
        float e = gpt2s_expf(p[j] - lse);
        p[j] = e;
        dp[j] = e * (dp[j] - D);
    }
    for (int j = valid; j < n; j++) { p[j] = 0.0f; dp[j] = 0.0f; }
}
GPT2S_CLONES static void gpt2s_layernorm_row(float *out, float *mean_out, float *rstd_out,
                                             const float *x, const float *w,
                                             const float *b, int C, float eps) {
    float m = gpt2s_sum(x, C) / C;
    float r = 1.0f / sqrtf(gpt2s_sum_sq_dev(x, m, C) / C + eps);
    for (int c = 0; c < C; c++) out[c] = (x[c] - m) * r * w[c] + b[c];
    if (mean_out) { *mean_out = m; *rstd_out = r; }
}
/* dinp += r (dnorm - mean(dnorm) - norm mean(dnorm norm)), dw += norm dout, db += dout,
   with norm = (x - m) r and dnorm = w dout */
GPT2S_CLONES static void gpt2s_layernorm_backward_row(float *dinp, float *dw, float *db,
                                                      const float *dout, const float *x,
                                                      const float *w, float m, float r,
                                                      int C) {
    float a1[GPT2S_LANES] = {0}, a2[GPT2S_LANES] = {0}, s1 = 0.0f, s2 = 0.0f;
    int c, k;
    for (c = 0; c + GPT2S_LANES <= C; c += GPT2S_LANES)
        for (k = 0; k < GPT2S_LANES; k++) {
            float norm = (x[c + k] - m) * r, dnorm = w[c + k] * dout[c + k];
            a1[k] += dnorm;
            a2[k] += dnorm * norm;
        }
    for (; c < C; c++) {
        float norm = (x[c] - m) * r, dnorm = w[c] * dout[c];
        s1 += dnorm;
        s2 += dnorm * norm;
    }
    for (k = 0; k < GPT2S_LANES; k++) { s1 += a1[k]; s2 += a2[k]; }
    float dnorm_mean = s1 / C, dnorm_norm_mean = s2 / C;
    for (c = 0; c < C; c++) {
        float norm = (x[c] - m) * r, dnorm = w[c] * dout[c];
        db[c] += dout[c];
        dw[c] += norm * dout[c];
        dinp[c] += r * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
    }
}

/* RMSNorm (Llama, Qwen2), in the float32 order of transformers' LlamaRMSNorm:
   r = 1 / sqrt(mean(x^2) + eps), out = w * (x * r); r kept for the backward */
GPT2S_CLONES static void gpt2s_rmsnorm_row(float *out, float *rstd_out, const float *x,
                                           const float *w, int C, float eps) {
    float r = 1.0f / sqrtf(gpt2s_sum_sq_dev(x, 0.0f, C) / C + eps);
    for (int c = 0; c < C; c++) out[c] = w[c] * (x[c] * r);
    if (rstd_out) *rstd_out = r;
}
/* dinp += r (dnorm - norm mean(dnorm norm)), dw += norm dout, with norm = x r and
   dnorm = w dout */
GPT2S_CLONES static void gpt2s_rmsnorm_backward_row(float *dinp, float *dw, const float *dout,
                                                    const float *x, const float *w, float r,
                                                    int C) {
    float a[GPT2S_LANES] = {0}, s = 0.0f;
    int c, k;
    for (c = 0; c + GPT2S_LANES <= C; c += GPT2S_LANES)
        for (k = 0; k < GPT2S_LANES; k++)
            a[k] += (w[c + k] * dout[c + k]) * (x[c + k] * r);
    for (; c < C; c++) s += (w[c] * dout[c]) * (x[c] * r);
    for (k = 0; k < GPT2S_LANES; k++) s += a[k];
    float m = s / C;
    for (c = 0; c < C; c++) {
        float norm = x[c] * r;
        dw[c] += norm * dout[c];
        dinp[c] += r * (w[c] * dout[c] - norm * m);
    }
}
/* Rotary position embedding of one head, in place, the rotate_half convention of
   transformers' Llama and GPT-NeoX: the first 2h values x = (a, b) of the head become
   (a cos - b sin, b cos + a sin), element by element with cos[i], sin[i] for i < h; the rest
   of the head is left as it is.  The backward is the same call with -sin (the transpose of
   a rotation is the rotation by the opposite angle). */
GPT2S_CLONES static void gpt2s_rotary_row(float *x, const float *cs, const float *sn, int h) {
    for (int i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cs[i] - b * sn[i];
        x[i + h] = b * cs[i] + a * sn[i];
    }
}
/* gated linear unit, the half after the activation: out = act * up (out may be act) */
GPT2S_CLONES static void gpt2s_mul_row(float *out, const float *act, const float *up, int n) {
    for (int i = 0; i < n; i++) out[i] = act[i] * up[i];
}

#endif
