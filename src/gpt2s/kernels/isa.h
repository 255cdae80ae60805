/* Instruction-set variants of the kernels: which ones this build compiled, which ones this
   CPU can run, and the attributes that compile a function for one of them.

   Every kernel has a portable C version, compiled for the baseline ISA a wheel must run on
   (SSE2 on x86-64).  A kernel may also have variants for wider instruction sets, compiled
   with target attributes and called only after a run-time check of this CPU (CPUID through
   __builtin_cpu_supports), never because of the build machine's flags: one wheel carries them
   all and each CPU runs what it has.  Which variant a weight type runs is a choice per type
   (kernels/types.h, the table; _core's set_kernel_variant forces one for tests).

   A variant's functions carry its name in their symbol names (arch_x86_64_v3):
   tools/check_wheel.sh checks that no other function of the wheel touches an AVX register.

   - x86-64-v3: AVX2, FMA and F16C (Haswell, Zen 1 and later).
   - GPT2S_CLONES builds a row kernel twice, for the baseline and for x86-64-v3, and lets the
     dynamic linker pick one at load (GCC target_clones, an ifunc: glibc only).  */

#ifndef GPT2S_ISA_H
#define GPT2S_ISA_H

#include <stdint.h>

enum { GPT2S_ISA_PORTABLE = 0, GPT2S_ISA_X86_64_V3 = 1, GPT2S_NISA };

static const char *const gpt2s_isa_names[GPT2S_NISA] = {"portable", "x86-64-v3"};

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(GPT2S_NO_CLONES)
#define GPT2S_HAVE_X86_64_V3 1
#include <immintrin.h>
/* a variant function (not inlined into baseline code), and the helpers it inlines */
#define GPT2S_V3 __attribute__((target("avx2,fma,f16c"), noinline))
#define GPT2S_V3_INLINE static inline __attribute__((target("avx2,fma,f16c"), always_inline))
#else
#define GPT2S_HAVE_X86_64_V3 0
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) \
    && !defined(GPT2S_NO_CLONES)
#define GPT2S_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
static int gpt2s_have_clones(void) { return 1; }
#else
#define GPT2S_CLONES
static int gpt2s_have_clones(void) { return 0; }
#endif

/* Whether this build has the variant and this CPU can run it (checked once). */
static int gpt2s_cpu_has(int isa) {
    if (isa == GPT2S_ISA_PORTABLE) return 1;
#if GPT2S_HAVE_X86_64_V3
    static int v3 = -1;
    if (isa == GPT2S_ISA_X86_64_V3) {
        if (v3 < 0) {
            __builtin_cpu_init();
            v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                 && __builtin_cpu_supports("f16c");
        }
        return v3;
    }
#endif
    return 0;
}

/* Row i of a register tile that starts at p, or row 0 again when the tile has only n rows:
   the rows past the end are computed (on row 0's data) and never stored. */
#define GPT2S_ROW(p, i, n, ld) ((p) + ((n) > (i) ? (int64_t)(i) * (ld) : 0))

#endif
