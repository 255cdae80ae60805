/* The portable fallbacks of simde_shim.h (what SIMDe 0.8.2 lacks) against the instructions
   themselves, on a CPU that has them: AVX-VNNI vpdpwssd / vpdpbusd and AVX512_BF16
   vcvtne2ps2bf16, plus the masked loads and stores and the 512-bit extensions of AVX-512.
   One line per case (PASS / FAIL / SKIP-CPU); exit 1 on any failure.  Built like the SIMDe
   harness (-mavx2 -mfma -mf16c, SIMDe's include directory); the native side is compiled
   with target attributes before the shim's names exist. */

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <math.h>

#define TV __attribute__((target("avx2,avxvnni"), noinline))
#define T512 __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"), noinline))
#define TBF __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512bf16"), noinline))

TV static void native_dpwssd(int32_t *r, const int32_t *s, const int16_t *a, const int16_t *b) {
    _mm256_storeu_si256((__m256i *)r, _mm256_dpwssd_avx_epi32(
        _mm256_loadu_si256((const __m256i *)s), _mm256_loadu_si256((const __m256i *)a),
        _mm256_loadu_si256((const __m256i *)b)));
}
TV static void native_dpbusd(int32_t *r, const int32_t *s, const uint8_t *a, const int8_t *b) {
    _mm256_storeu_si256((__m256i *)r, _mm256_dpbusd_avx_epi32(
        _mm256_loadu_si256((const __m256i *)s), _mm256_loadu_si256((const __m256i *)a),
        _mm256_loadu_si256((const __m256i *)b)));
}
TBF static void native_cvtne2ps(uint16_t *r, const float *a, const float *b) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    memcpy(r, &v, 64);
}
T512 static void native_masked(float *r, uint16_t *r16, float *st, uint16_t k, const float *p,
                               const uint16_t *p16, const uint8_t *p8, int32_t *e8, int32_t *u8,
                               int16_t *u16, float *red) {
    _mm512_storeu_ps(r, _mm512_maskz_loadu_ps(k, p));
    _mm256_storeu_si256((__m256i *)r16, _mm256_maskz_loadu_epi16(k, p16));
    _mm512_mask_storeu_ps(st, k, _mm512_loadu_ps(p));
    __m128i b = _mm_loadu_si128((const __m128i *)p8);
    _mm512_storeu_si512(e8, _mm512_cvtepi8_epi32(b));
    _mm512_storeu_si512(u8, _mm512_cvtepu8_epi32(b));
    _mm512_storeu_si512(u16, _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p8)));
    *red = _mm512_reduce_add_ps(_mm512_loadu_ps(p));
}

#include "simde_shim.h"

static int failures;
static uint64_t st = 88172645463325252ull;
static uint32_t rnd(void) { st ^= st << 13; st ^= st >> 7; st ^= st << 17; return (uint32_t)st; }

static void report(int ok, const char *what, int cases) {
    printf("%s %s (%d cases)\n", ok ? "PASS" : "FAIL", what, cases);
    failures += !ok;
}
static void skip(const char *what, const char *isa) {
    printf("SKIP-CPU %s (this CPU lacks %s)\n", what, isa);
}

int main(void) {
    __builtin_cpu_init();
    const int N = 20000;
    if (__builtin_cpu_supports("avxvnni")) {
        int bad1 = 0, bad2 = 0;
        for (int c = 0; c < N; c++) {
            int32_t s[8], r1[8], r2[8];
            int16_t a[16], b[16];
            uint8_t ua[32];
            int8_t sb[32];
            for (int i = 0; i < 8; i++) s[i] = c % 4 == 0 ? (int32_t)0x7fffff00 + (int)(rnd() % 512) : (int32_t)rnd();
            for (int i = 0; i < 16; i++) { a[i] = (int16_t)rnd(); b[i] = c % 3 ? (int16_t)rnd() : -32768; }
            for (int i = 0; i < 32; i++) { ua[i] = (uint8_t)rnd(); sb[i] = (int8_t)rnd(); }
            native_dpwssd(r1, s, a, b);
            __m256i v = _mm256_dpwssd_avx_epi32(_mm256_loadu_si256((const __m256i *)s),
                _mm256_loadu_si256((const __m256i *)a), _mm256_loadu_si256((const __m256i *)b));
            memcpy(r2, &v, 32);
            bad1 += memcmp(r1, r2, 32) != 0;
            native_dpbusd(r1, s, ua, sb);
            v = _mm256_dpbusd_avx_epi32(_mm256_loadu_si256((const __m256i *)s),
                _mm256_loadu_si256((const __m256i *)ua), _mm256_loadu_si256((const __m256i *)sb));
            memcpy(r2, &v, 32);
            bad2 += memcmp(r1, r2, 32) != 0;
        }
        report(!bad1, "shim _mm256_dpwssd_avx_epi32 == AVX-VNNI vpdpwssd", N);
        report(!bad2, "shim _mm256_dpbusd_avx_epi32 == AVX-VNNI vpdpbusd", N);
    } else {
        skip("shim _mm256_dpwssd_avx_epi32 / _mm256_dpbusd_avx_epi32", "avxvnni");
    }
    if (__builtin_cpu_supports("avx512bf16")) {
        int bad = 0;
        for (int c = 0; c < N; c++) {
            float a[16], b[16];
            uint16_t r1[32], r2[32];
            for (int i = 0; i < 16; i++) {
                uint32_t u = rnd(), w = rnd();
                if (c % 5 == 0) u &= 0x807fffffu;              /* denormals */
                if (c % 7 == 0) u = (u & 0xffff0000u) | 0x8000u; /* ties */
                if (c % 11 == 0) u |= 0x7f800000u;             /* inf / NaN */
                memcpy(&a[i], &u, 4);
                memcpy(&b[i], &w, 4);
            }
            native_cvtne2ps(r1, a, b);
            __m512i v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
            memcpy(r2, &v, 64);
            for (int i = 0; i < 32; i++) {
                /* NaN: any quiet NaN of the same sign */
                int nan1 = (r1[i] & 0x7f80) == 0x7f80 && (r1[i] & 0x7f);
                int nan2 = (r2[i] & 0x7f80) == 0x7f80 && (r2[i] & 0x7f);
                if (nan1 || nan2) bad += !(nan1 && nan2 && (r1[i] >> 15) == (r2[i] >> 15));
                else bad += r1[i] != r2[i];
            }
        }
        report(!bad, "shim _mm512_cvtne2ps_pbh == AVX512_BF16 vcvtne2ps2bf16", N);
    } else {
        skip("shim _mm512_cvtne2ps_pbh", "avx512bf16");
    }
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl")) {
        int bad = 0;
        for (int c = 0; c < N / 10; c++) {
            float p[16], r1[16], r2[16], s1[16], s2[16], red1, red2;
            uint16_t p16[16], q1[16], q2[16];
            uint8_t p8[32];
            int32_t e1[16], e2[16], u1[16], u2[16];
            int16_t w1[32], w2[32];
            uint16_t k = (uint16_t)rnd();
            for (int i = 0; i < 16; i++) { p[i] = (float)(int32_t)rnd() / 1e6f; p16[i] = (uint16_t)rnd(); }
            for (int i = 0; i < 32; i++) p8[i] = (uint8_t)rnd();
            for (int i = 0; i < 16; i++) s1[i] = s2[i] = -1.0f;
            native_masked(r1, q1, s1, k, p, p16, p8, e1, u1, w1, &red1);
            _mm512_storeu_ps(r2, _mm512_maskz_loadu_ps(k, p));
            _mm256_storeu_si256((__m256i *)q2, _mm256_maskz_loadu_epi16(k, p16));
            _mm512_mask_storeu_ps(s2, k, _mm512_loadu_ps(p));
            __m128i b = _mm_loadu_si128((const __m128i *)p8);
            simde_mm512_storeu_si512(e2, _mm512_cvtepi8_epi32(b));
            simde_mm512_storeu_si512(u2, _mm512_cvtepu8_epi32(b));
            simde_mm512_storeu_si512(w2, _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p8)));
            red2 = _mm512_reduce_add_ps(_mm512_loadu_ps(p));
            bad += memcmp(r1, r2, 64) || memcmp(q1, q2, 32) || memcmp(s1, s2, 64)
                   || memcmp(e1, e2, 64) || memcmp(u1, u2, 64) || memcmp(w1, w2, 64);
            /* the reduction's order is the compiler's: equal within the sum's rounding */
            float mag = 0.0f;
            for (int i = 0; i < 16; i++) mag += fabsf(p[i]);
            bad += fabsf(red1 - red2) > 16 * 6e-8f * mag;
        }
        report(!bad, "shim masked loads/stores, cvtep[iu]8 widenings, reduce_add == AVX-512", N / 10);
    } else {
        skip("shim masked loads/stores, widenings, reduce_add", "avx512f/bw/vl");
    }
    return failures ? 1 : 0;
}
