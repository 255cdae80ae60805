/* The weight types: one row of traits per type, the way ggml's type_traits_cpu describes its
   types, so that the matmul driver (matmul.pxi) is written once for all of them.  A new type
   is a header with its portable functions and its variants (like bf16.h) and one row here,
   plus its class in gpt2s/weight_types.py.

   A weight W of a product C (M, N) = A (M, K) @ W is stored in one of two layouts:
   input-major [K][N] (float32 and bfloat16 keep the Conv1D weights so) or output-major
   [N][K] (the tied lm_head / embedding [V][C]; every blocked type, which keeps its blocks of
   one output contiguous along K).  Per layout and instruction-set variant a type may have:

   - direct: C[0:M, 0:n] (+)= A @ W for few rows, reading W once (NULL: none);
   - widen: a panel of W (rows x cols, either layout) into float32, for the panel route that
     hands it to sgemm (NULL for float32, which sgemm reads as it is).

   Every product and its thread split is the driver's; a type only says how its weights are
   read.  Results are deterministic: the same for every thread count that splits a product
   the same way, and bit-identical between runs. */

#ifndef GPT2S_TYPES_H
#define GPT2S_TYPES_H

#include <stdint.h>
#include "isa.h"
#include "f32.h"
#include "bf16.h"
#include "q8.h"
#include "q4.h"

enum { GPT2S_WTYPE_F32 = 0, GPT2S_WTYPE_BF16 = 1, GPT2S_WTYPE_Q8 = 2, GPT2S_WTYPE_Q4 = 3,
       GPT2S_NWTYPES };

/* the C type of the stored array's elements (a uint8 of the 4-bit type holds two weights) */
enum { GPT2S_STORE_FLOAT = 0, GPT2S_STORE_UINT16 = 1, GPT2S_STORE_INT8 = 2,
       GPT2S_STORE_UINT8 = 3 };

/* C[0:M, 0:n] (+)= A (M, K) @ W, W [K][n] (input-major) or [n][K] (output-major) with ldw,
   S its block scales [n][K / block] (NULL when the type has none) */
typedef void (*gpt2s_direct_fn)(int M, int n, int K, const float *A, int lda, const void *W,
                                int ldw, const uint16_t *S, int accumulate, float *C, int ldc);
/* out (rows, cols) float32 (ldo) = rows x cols of W from W (ldw); S: the scales of row 0 */
typedef void (*gpt2s_widen_fn)(float *out, int64_t ldo, const void *W, int64_t ldw,
                               const uint16_t *S, int rows, int cols);
/* stored rows [0, N) of K weights, element (n, k) from x[n * sn + k * sk]; 0 or -1 when a
   value cannot be stored (non-finite, or out of the scales' range) */
typedef int (*gpt2s_quantize_fn)(void *W, uint16_t *S, const float *x, int64_t N, int64_t K,
                                 int64_t sn, int64_t sk);

typedef struct {
    const char *name;
    int store;              /* GPT2S_STORE_*: the element type of the stored array */
    int bits;               /* bits of storage per weight, scales not counted */
    int block;              /* weights per scale along K; 0: no scales */
    int output_major;       /* a Conv1D weight (K, N) is stored [N][K] */
    int direct_min_rows;    /* fewer rows of A go to the panel route (or BLAS) */
    gpt2s_quantize_fn quantize;             /* NULL for float32 */
    gpt2s_direct_fn direct_in[GPT2S_NISA];  /* input-major W */
    gpt2s_direct_fn direct_out[GPT2S_NISA]; /* output-major W */
    gpt2s_widen_fn widen[GPT2S_NISA];       /* either layout; NULL for float32 */
} gpt2s_wtype_traits;

#if GPT2S_HAVE_X86_64_V3
#define GPT2S_IF_V3(f) f
#else
#define GPT2S_IF_V3(f) NULL
#endif
#if GPT2S_HAVE_AVX512
#define GPT2S_IF_V4(f) f
#else
#define GPT2S_IF_V4(f) NULL
#endif

#if GPT2S_HAVE_NEON

/* aarch64: the columns portable, neon, neon-dotprod and neon-bf16 (isa.h; the x86 ones are
   empty); an empty entry of neon-dotprod or neon-bf16 runs neon's */
#if GPT2S_HAVE_NEON_DOTPROD
#define GPT2S_IF_NEON_DP(f) f
#else
#define GPT2S_IF_NEON_DP(f) NULL
#endif
static const gpt2s_wtype_traits gpt2s_wtypes[GPT2S_NWTYPES] = {
    {"float32", GPT2S_STORE_FLOAT, 32, 0, 0, GPT2S_F32_DIRECT_MIN_ROWS, NULL,
     {[GPT2S_ISA_NEON] = gpt2s_f32_nn_arch_neon},
     {[GPT2S_ISA_NEON] = gpt2s_f32_nt_arch_neon},
     {NULL}},
    {"bfloat16", GPT2S_STORE_UINT16, 16, 0, 0, 1, gpt2s_bf16_quantize,
     {[GPT2S_ISA_NEON] = gpt2s_bf16_nn_arch_neon},
     {[GPT2S_ISA_NEON] = gpt2s_bf16_nt_arch_neon},
     {gpt2s_bf16_widen, [GPT2S_ISA_NEON] = gpt2s_bf16_widen_arch_neon}},
    {"int8", GPT2S_STORE_INT8, 8, GPT2S_Q8_BLOCK, 1, 1, gpt2s_q8_quantize,
     {NULL},
     {[GPT2S_ISA_NEON] = gpt2s_q8_nt_arch_neon,
      [GPT2S_ISA_NEON_DOTPROD] = GPT2S_IF_NEON_DP(gpt2s_q8_nt_arch_neon_dotprod)},
     {gpt2s_q8_widen, [GPT2S_ISA_NEON] = gpt2s_q8_widen_arch_neon}},
    {"int4", GPT2S_STORE_UINT8, 4, GPT2S_Q4_BLOCK, 1, 1, gpt2s_q4_quantize,
     {NULL},
     {[GPT2S_ISA_NEON] = gpt2s_q4_nt_arch_neon,
      [GPT2S_ISA_NEON_DOTPROD] = GPT2S_IF_NEON_DP(gpt2s_q4_nt_arch_neon_dotprod)},
     {gpt2s_q4_widen, [GPT2S_ISA_NEON] = gpt2s_q4_widen_arch_neon}},
};

#else

/* the columns of each row: portable, x86-64-v3, avx-vnni, avx512, avx512-vnni, avx512-bf16
   (isa.h); an empty entry of a level above x86-64-v3 runs the nearest level below's */
static const gpt2s_wtype_traits gpt2s_wtypes[GPT2S_NWTYPES] = {
    {"float32", GPT2S_STORE_FLOAT, 32, 0, 0, GPT2S_F32_DIRECT_MIN_ROWS, NULL,
     {NULL, GPT2S_IF_V3(gpt2s_f32_nn_arch_x86_64_v3), NULL,
      GPT2S_IF_V4(gpt2s_f32_nn_arch_avx512), NULL, NULL},
     {NULL, GPT2S_IF_V3(gpt2s_f32_nt_arch_x86_64_v3), NULL,
      GPT2S_IF_V4(gpt2s_f32_nt_arch_avx512), NULL, NULL},
     {NULL, NULL, NULL, NULL, NULL, NULL}},
    {"bfloat16", GPT2S_STORE_UINT16, 16, 0, 0, 1, gpt2s_bf16_quantize,
     {NULL, GPT2S_IF_V3(gpt2s_bf16_nn_arch_x86_64_v3), NULL,
      GPT2S_IF_V4(gpt2s_bf16_nn_arch_avx512), NULL, NULL},
     {NULL, GPT2S_IF_V3(gpt2s_bf16_nt_arch_x86_64_v3), NULL,
      GPT2S_IF_V4(gpt2s_bf16_nt_arch_avx512), NULL, NULL},
     {gpt2s_bf16_widen, GPT2S_IF_V3(gpt2s_bf16_widen_arch_x86_64_v3), NULL, NULL, NULL, NULL}},
    {"int8", GPT2S_STORE_INT8, 8, GPT2S_Q8_BLOCK, 1, 1, gpt2s_q8_quantize,
     {NULL, NULL, NULL, NULL, NULL, NULL},
     {NULL, GPT2S_IF_V3(gpt2s_q8_nt_arch_x86_64_v3), GPT2S_IF_V4(gpt2s_q8_nt_arch_avx_vnni),
      GPT2S_IF_V4(gpt2s_q8_nt_arch_avx512), NULL, NULL},
     {gpt2s_q8_widen, GPT2S_IF_V3(gpt2s_q8_widen_arch_x86_64_v3), NULL, NULL, NULL, NULL}},
    {"int4", GPT2S_STORE_UINT8, 4, GPT2S_Q4_BLOCK, 1, 1, gpt2s_q4_quantize,
     {NULL, NULL, NULL, NULL, NULL, NULL},
     {NULL, GPT2S_IF_V3(gpt2s_q4_nt_arch_x86_64_v3), GPT2S_IF_V4(gpt2s_q4_nt_arch_avx_vnni),
      GPT2S_IF_V4(gpt2s_q4_nt_arch_avx512), GPT2S_IF_V4(gpt2s_q4_nt_arch_avx512_vnni), NULL},
     {gpt2s_q4_widen, GPT2S_IF_V3(gpt2s_q4_widen_arch_x86_64_v3), NULL, NULL, NULL, NULL}},
};

#endif

/* the chosen variant of each type: the best this CPU runs, unless a test forced another */
static int gpt2s_wtype_variant[GPT2S_NWTYPES];

/* The level a level above x86-64-v3 (or neon) builds on: its empty entries are that level's.
   (avx512 does not build on avx-vnni, nor neon-bf16 on neon-dotprod: a CPU may have either
   without the other.) */
static int gpt2s_isa_base(int isa) {
    switch (isa) {
    case GPT2S_ISA_AVX512_VNNI: case GPT2S_ISA_AVX512_BF16: return GPT2S_ISA_AVX512;
    case GPT2S_ISA_AVX512: case GPT2S_ISA_AVX_VNNI: return GPT2S_ISA_X86_64_V3;
    case GPT2S_ISA_NEON_DOTPROD: case GPT2S_ISA_NEON_BF16: return GPT2S_ISA_NEON;
    default: return GPT2S_ISA_PORTABLE;
    }
}

/* the direct kernel of a variant: its own entry, else its base level's (never portable's:
   the portable variant has no direct kernels) */
static gpt2s_direct_fn gpt2s_wtype_direct(int t, int output_major, int isa) {
    for (; isa > GPT2S_ISA_PORTABLE; isa = gpt2s_isa_base(isa)) {
        gpt2s_direct_fn f = output_major ? gpt2s_wtypes[t].direct_out[isa]
                                         : gpt2s_wtypes[t].direct_in[isa];
        if (f) return f;
    }
    return NULL;
}

static gpt2s_widen_fn gpt2s_wtype_widen(int t, int isa) {
    for (; isa > GPT2S_ISA_PORTABLE; isa = gpt2s_isa_base(isa))
        if (gpt2s_wtypes[t].widen[isa]) return gpt2s_wtypes[t].widen[isa];
    return gpt2s_wtypes[t].widen[GPT2S_ISA_PORTABLE];
}

/* whether this build has functions of its own for the type at that level (portable: always) */
static int gpt2s_wtype_built_variant(int t, int isa) {
    if (isa < 0 || isa >= GPT2S_NISA) return 0;
    return isa == GPT2S_ISA_PORTABLE || gpt2s_wtypes[t].direct_in[isa]
           || gpt2s_wtypes[t].direct_out[isa] || gpt2s_wtypes[t].widen[isa];
}

/* whether the type has a variant of its own at that level and this CPU runs it */
static int gpt2s_wtype_has_variant(int t, int isa) {
    return gpt2s_wtype_built_variant(t, isa) && gpt2s_cpu_has(isa);
}

static int gpt2s_wtype_best_variant(int t) {
    for (int isa = GPT2S_NISA - 1; isa > 0; isa--)
        if (gpt2s_wtype_has_variant(t, isa)) return isa;
    return GPT2S_ISA_PORTABLE;
}

/* bytes of the first n weights of a stored row (n a multiple of the block for blocked types) */
static int64_t gpt2s_wtype_bytes(int t, int64_t n) { return n * gpt2s_wtypes[t].bits / 8; }

/* weights per element of the stored array */
static int gpt2s_wtype_per_element(int t) {
    int element_bits = gpt2s_wtypes[t].store == GPT2S_STORE_FLOAT ? 32
                     : gpt2s_wtypes[t].store == GPT2S_STORE_UINT16 ? 16 : 8;
    return element_bits / gpt2s_wtypes[t].bits;
}

#endif
