/* The SIMDe build of the kernel harness (kernel_harness.c, -DGPT2S_HARNESS_SIMDE): the
   kernels' AVX-512 and AVX-VNNI intrinsics mapped onto SIMDe's portable implementations
   (simde-py's SIMDe 0.8.2 headers), so that the avx-vnni and avx512 variants run, emulated,
   on any x86-64-v3 CPU.  Built with -mavx2 -mfma -mf16c (so SIMDe leaves the x86-64-v3
   intrinsics native) and no AVX-512 flag; the variants' target attributes are narrowed to
   x86-64-v3 here, so the compiler emits no AVX-512 instruction.

   SIMDe's native aliases (SIMDE_ENABLE_NATIVE_ALIASES) cannot be used: they typedef __m512,
   which the compiler's own immintrin.h already declares.  The names the kernels use are
   mapped one by one instead (a kernel using a new intrinsic fails to compile here until it
   is added below).  What SIMDe 0.8.2 lacks is written here portably -- never in the shipped
   kernels. */

#ifndef GPT2S_SIMDE_SHIM_H
#define GPT2S_SIMDE_SHIM_H

#include <stdint.h>
#include <string.h>
#include <simde/x86/avx512.h>
#include <simde/x86/avx2.h>
#include <simde/x86/f16c.h>
#include "isa.h"   /* includes <immintrin.h> and defines the target attributes, replaced below */

#if !GPT2S_HAVE_AVX512
#error "the SIMDe build needs a compiler that builds the AVX-512 variants (GCC >= 11, clang >= 13)"
#endif

#undef GPT2S_T_AVX512
#undef GPT2S_AVXVNNI
#undef GPT2S_AVXVNNI_INLINE
#undef GPT2S_V4
#undef GPT2S_V4_INLINE
#undef GPT2S_V4VNNI
#undef GPT2S_V4VNNI_INLINE
#undef GPT2S_V4BF16
#undef GPT2S_V4BF16_INLINE
#define GPT2S_SIMDE_T "avx2,fma,f16c"
#define GPT2S_T_AVX512 GPT2S_SIMDE_T
#define GPT2S_AVXVNNI __attribute__((target(GPT2S_SIMDE_T), noinline))
#define GPT2S_AVXVNNI_INLINE static inline __attribute__((target(GPT2S_SIMDE_T), always_inline))
#define GPT2S_V4 GPT2S_AVXVNNI
#define GPT2S_V4_INLINE GPT2S_AVXVNNI_INLINE
#define GPT2S_V4VNNI GPT2S_AVXVNNI
#define GPT2S_V4VNNI_INLINE GPT2S_AVXVNNI_INLINE
#define GPT2S_V4BF16 GPT2S_AVXVNNI
#define GPT2S_V4BF16_INLINE GPT2S_AVXVNNI_INLINE

/* the types */
#define __m512 simde__m512
#define __m512i simde__m512i
#define __m512d simde__m512d
#define __mmask16 simde__mmask16
#define __mmask32 simde__mmask32
#define __mmask64 simde__mmask64

/* AVX-512 F/BW/VL/DQ intrinsics the kernels use, as SIMDe has them */
#define _mm512_add_epi32 simde_mm512_add_epi32
#define _mm512_add_ps simde_mm512_add_ps
#define _mm512_and_si512 simde_mm512_and_si512
#define _mm512_add_epi16 simde_mm512_add_epi16
#define _mm512_maddubs_epi16 simde_mm512_maddubs_epi16
#define _mm512_castps512_ps256 simde_mm512_castps512_ps256
#define _mm512_extractf32x8_ps simde_mm512_extractf32x8_ps
#define _mm512_set1_epi8 simde_mm512_set1_epi8
#define _mm512_setzero_si512 simde_mm512_setzero_si512
#define _mm512_shuffle_i64x2 simde_mm512_shuffle_i64x2
#define _mm512_srli_epi16 simde_mm512_srli_epi16
#define _mm512_castsi512_ps simde_mm512_castsi512_ps
#define _mm512_cvtepi32_ps simde_mm512_cvtepi32_ps
#define _mm512_cvtepi8_epi16 simde_mm512_cvtepi8_epi16
#define _mm512_cvtepu16_epi32 simde_mm512_cvtepu16_epi32
#define _mm512_cvtph_ps simde_mm512_cvtph_ps
#define _mm512_fmadd_ps simde_mm512_fmadd_ps
#define _mm512_loadu_ps simde_mm512_loadu_ps
#define _mm512_loadu_si512 simde_mm512_loadu_si512
#define _mm512_madd_epi16 simde_mm512_madd_epi16
#define _mm512_mul_ps simde_mm512_mul_ps
#define _mm512_permutex2var_ps simde_mm512_permutex2var_ps
#define _mm512_set1_epi16 simde_mm512_set1_epi16
#define _mm512_set1_epi32 simde_mm512_set1_epi32
#define _mm512_set1_ps simde_mm512_set1_ps
#undef _mm512_setr_epi32
#define _mm512_setr_epi32 simde_mm512_setr_epi32
#define _mm512_setzero_ps simde_mm512_setzero_ps
#define _mm512_slli_epi32 simde_mm512_slli_epi32
#define _mm512_storeu_ps simde_mm512_storeu_ps
#define _mm512_sub_epi16 simde_mm512_sub_epi16
#define _mm512_sub_epi32 simde_mm512_sub_epi32
#define _mm512_dpwssd_epi32 simde_mm512_dpwssd_epi32
#define _mm512_dpbusd_epi32 simde_mm512_dpbusd_epi32
#undef _mm256_dpbusd_epi32   /* a macro in GCC's avx512vnnivlintrin.h */
#define _mm256_dpbusd_epi32 simde_mm256_dpbusd_epi32
#define _mm512_dpbf16_ps simde_mm512_dpbf16_ps

/* ---- what SIMDe 0.8.2 lacks, written portably on SIMDe's types ---- */

/* Masked loads and stores touch only the lanes of the mask, as the hardware does (which
   suppresses faults on the others): SIMDe 0.8.2 loads all 64 bytes and then masks, which
   reads past the end of a row's buffer -- the tails the harness is there to test. */
static inline simde__m512 gpt2s_shim_mm512_maskz_loadu_ps(simde__mmask16 k, const void *p) {
    simde__m512_private r;
    for (int i = 0; i < 16; i++) r.f32[i] = (k >> i) & 1 ? ((const float *)p)[i] : 0.0f;
    return simde__m512_from_private(r);
}
#define _mm512_maskz_loadu_ps gpt2s_shim_mm512_maskz_loadu_ps
static inline void gpt2s_shim_mm512_mask_storeu_ps(void *p, simde__mmask16 k, simde__m512 a) {
    simde__m512_private v = simde__m512_to_private(a);
    for (int i = 0; i < 16; i++)
        if ((k >> i) & 1) ((float *)p)[i] = v.f32[i];
}
#define _mm512_mask_storeu_ps gpt2s_shim_mm512_mask_storeu_ps
static inline __m256i gpt2s_shim_mm256_maskz_loadu_epi16(simde__mmask16 k, const void *p) {
    uint16_t r[16];
    for (int i = 0; i < 16; i++) r[i] = (k >> i) & 1 ? ((const uint16_t *)p)[i] : 0;
    __m256i out;
    memcpy(&out, r, 32);
    return out;
}
#define _mm256_maskz_loadu_epi16 gpt2s_shim_mm256_maskz_loadu_epi16

/* the zero-extension of 32 bytes to 32 int16 */
static inline simde__m512i gpt2s_shim_mm512_cvtepu8_epi16(simde__m256i a) {
    simde__m256i_private p = simde__m256i_to_private(a);
    simde__m512i_private r;
    for (int i = 0; i < 32; i++) r.u16[i] = p.u8[i];
    return simde__m512i_from_private(r);
}
#define _mm512_cvtepu8_epi16 gpt2s_shim_mm512_cvtepu8_epi16

/* the sign- and zero-extensions of 16 bytes to 16 int32 */
static inline simde__m512i gpt2s_shim_mm512_cvtepi8_epi32(simde__m128i a) {
    simde__m128i_private p = simde__m128i_to_private(a);
    simde__m512i_private r;
    for (int i = 0; i < 16; i++) r.i32[i] = p.i8[i];
    return simde__m512i_from_private(r);
}
#define _mm512_cvtepi8_epi32 gpt2s_shim_mm512_cvtepi8_epi32
static inline simde__m512i gpt2s_shim_mm512_cvtepu8_epi32(simde__m128i a) {
    simde__m128i_private p = simde__m128i_to_private(a);
    simde__m512i_private r;
    for (int i = 0; i < 16; i++) r.i32[i] = p.u8[i];
    return simde__m512i_from_private(r);
}
#define _mm512_cvtepu8_epi32 gpt2s_shim_mm512_cvtepu8_epi32

/* the sum of the 16 floats, in the hardware's (GCC's expansion's) order: halves, then
   halves again -- the order matters for the last bit only */
static inline float gpt2s_shim_mm512_reduce_add_ps(simde__m512 a) {
    simde__m512_private p = simde__m512_to_private(a);
    float s[16];
    for (int i = 0; i < 16; i++) s[i] = p.f32[i];
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) s[i] = s[i] + s[i + w];
    return s[0];
}
#define _mm512_reduce_add_ps gpt2s_shim_mm512_reduce_add_ps

/* AVX-VNNI (VEX) vpdpwssd: src + the sums of adjacent int16 products, per int32 lane,
   wrapping (no saturation) as the instruction does */
static inline __m256i gpt2s_shim_mm256_dpwssd_avx_epi32(__m256i src, __m256i a, __m256i b) {
    int32_t s[8], r[8];
    int16_t x[16], y[16];
    memcpy(s, &src, 32);
    memcpy(x, &a, 32);
    memcpy(y, &b, 32);
    for (int i = 0; i < 8; i++)
        r[i] = (int32_t)((uint32_t)s[i] + (uint32_t)((int32_t)x[2 * i] * y[2 * i])
                         + (uint32_t)((int32_t)x[2 * i + 1] * y[2 * i + 1]));
    __m256i out;
    memcpy(&out, r, 32);
    return out;
}
#define _mm256_dpwssd_avx_epi32 gpt2s_shim_mm256_dpwssd_avx_epi32

/* AVX-VNNI (VEX) vpdpbusd: src + the sums of 4 products of unsigned bytes of a and signed
   bytes of b, per int32 lane, wrapping */
static inline __m256i gpt2s_shim_mm256_dpbusd_avx_epi32(__m256i src, __m256i a, __m256i b) {
    int32_t s[8];
    uint8_t x[32];
    int8_t y[32];
    memcpy(s, &src, 32);
    memcpy(x, &a, 32);
    memcpy(y, &b, 32);
    for (int i = 0; i < 8; i++) {
        uint32_t t = (uint32_t)s[i];
        for (int j = 0; j < 4; j++) t += (uint32_t)((int32_t)x[4 * i + j] * y[4 * i + j]);
        s[i] = (int32_t)t;
    }
    __m256i out;
    memcpy(&out, s, 32);
    return out;
}
#define _mm256_dpbusd_avx_epi32 gpt2s_shim_mm256_dpbusd_avx_epi32

/* AVX512_BF16 vcvtne2ps2bf16: 32 bfloat16, a's 16 floats in the high half and b's in the
   low, rounded to nearest even (NaN kept quiet), as the instruction (which also flushes
   denormal inputs to zero: bf16.h's gpt2s_f32_to_bf16 keeps them, so a kernel whose inputs
   are denormal may differ there) */
static inline uint16_t gpt2s_shim_bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;   /* denormal -> signed zero */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline simde__m512i gpt2s_shim_mm512_cvtne2ps_pbh(simde__m512 a, simde__m512 b) {
    simde__m512_private pa = simde__m512_to_private(a), pb = simde__m512_to_private(b);
    simde__m512i_private r;
    for (int i = 0; i < 16; i++) {
        r.u16[i] = gpt2s_shim_bf16_rne(pb.f32[i]);
        r.u16[16 + i] = gpt2s_shim_bf16_rne(pa.f32[i]);
    }
    return simde__m512i_from_private(r);
}
#define _mm512_cvtne2ps_pbh gpt2s_shim_mm512_cvtne2ps_pbh

#endif
