/* Instruction-set variants of the kernels: which ones this build compiled, which ones this
   CPU can run, and the attributes that compile a function for one of them.

   Every kernel has a portable C version, compiled for the baseline ISA a wheel must run on
   (SSE2 on x86-64).  A kernel may also have variants for wider instruction sets, compiled
   with target attributes and called only after a run-time check of this CPU (CPUID through
   __builtin_cpu_supports), never because of the build machine's flags: one wheel carries them
   all and each CPU runs what it has.  Which variant a weight type runs is a choice per type
   (kernels/types.h, the table; _core's set_kernel_variant forces one for tests).

   A variant's functions carry its name in their symbol names (arch_x86_64_v3, arch_avx_vnni,
   arch_avx512, arch_avx512_vnni, arch_avx512_bf16): tools/check_wheel.sh checks that no other
   function of the wheel touches an AVX register.

   - x86-64-v3: AVX2, FMA and F16C (Haswell, Zen 1 and later).
   - avx-vnni: x86-64-v3 plus AVX-VNNI, the VEX (256-bit) integer dot products vpdpwssd /
     vpdpbusd (Alder Lake and later client CPUs, which have no AVX-512).
   - avx512: x86-64-v3 plus AVX512F, BW, VL and DQ (x86-64-v4: Skylake-SP, Zen 4 and later):
     the direct kernels on 16-float registers, tails by masked loads.
   - avx512-vnni: avx512 plus AVX512_VNNI (vpdpwssd / vpdpbusd on 512 bits: Cascade Lake,
     Ice Lake, Sapphire Rapids, Zen 4).
   - avx512-bf16: avx512 plus AVX512_BF16 (vdpbf16ps: Cooper Lake, Sapphire Rapids, Zen 4).
   A type's variant may leave an entry of the table empty (kernels/types.h): it then runs the
   entry of the nearest level below it that has one (avx-vnni's few-row int8 kernel is
   x86-64-v3's), so every level a type lists is complete.  The levels are in order of
   preference, each after those it is preferred to; a CPU runs the last one it has.
   On aarch64 (Linux, macOS) the levels are:
   - neon: Advanced SIMD, which every aarch64 CPU has (armv8-a): the baseline the wheel is
     compiled for, so these functions need no attribute (they carry "arch_neon" in their names
     all the same, and are chosen like the others).
   - neon-dotprod: neon plus the int8 dot products sdot / udot (FEAT_DotProd: Cortex-A55/A76,
     Neoverse N1, Graviton 2, Apple M1 and later), compiled with the target attribute
     "arch=armv8.2-a+dotprod".
   - neon-bf16: neon plus bfdot / bfmmla / bfmlal (FEAT_BF16, Armv8.6: Graviton 3, Neoverse
     V1/N2, Apple M2 and later), "arch=armv8.2-a+bf16".  No weight type's kernels use it: those
     multiply float32 activations, which bfdot would round to bfloat16 (x86's avx512-bf16 column
     is empty for the same reason); it is the level of a bfloat16 compute GEMM.
   Both are checked at run time (getauxval AT_HWCAP / AT_HWCAP2 on Linux, sysctlbyname
   hw.optional.arm.FEAT_* on macOS), never from the build machine's flags: a function of these
   levels is the only code of the build that holds their instructions
   (tests/test_kernel_harness.py checks the cross-compiled harness for it).
   - GPT2S_CLONES builds a row kernel twice, for the baseline and for x86-64-v3, and lets the
     dynamic linker pick one at load (GCC target_clones, an ifunc: glibc only).  */

#ifndef GPT2S_ISA_H
#define GPT2S_ISA_H

#include <stdint.h>

enum { GPT2S_ISA_PORTABLE = 0, GPT2S_ISA_X86_64_V3 = 1, GPT2S_ISA_AVX_VNNI = 2,
       GPT2S_ISA_AVX512 = 3, GPT2S_ISA_AVX512_VNNI = 4, GPT2S_ISA_AVX512_BF16 = 5,
       GPT2S_ISA_NEON = 6, GPT2S_ISA_NEON_DOTPROD = 7, GPT2S_ISA_NEON_BF16 = 8, GPT2S_NISA };

static const char *const gpt2s_isa_names[GPT2S_NISA] = {
    "portable", "x86-64-v3", "avx-vnni", "avx512", "avx512-vnni", "avx512-bf16",
    "neon", "neon-dotprod", "neon-bf16"};

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(GPT2S_NO_CLONES)
#define GPT2S_HAVE_X86_64_V3 1
#include <immintrin.h>
/* a variant function (not inlined into baseline code), and the helpers it inlines */
#define GPT2S_V3 __attribute__((target("avx2,fma,f16c"), noinline))
#define GPT2S_V3_INLINE static inline __attribute__((target("avx2,fma,f16c"), always_inline))
#else
#define GPT2S_HAVE_X86_64_V3 0
#endif

/* aarch64: NEON is the baseline; dotprod and bf16 as target attributes (GCC 10, clang 17:
   arm_neon.h's intrinsics then compile inside a function of that target) */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__) && defined(__ARM_NEON) \
    && !defined(GPT2S_NO_CLONES)
#define GPT2S_HAVE_NEON 1
#include <arm_neon.h>
#define GPT2S_NEON __attribute__((noinline))
#define GPT2S_NEON_INLINE static inline __attribute__((always_inline))
#if (!defined(__clang__) && __GNUC__ >= 10) || (defined(__clang__) && __clang_major__ >= 17)
#define GPT2S_HAVE_NEON_DOTPROD 1
#define GPT2S_HAVE_NEON_BF16 1
#define GPT2S_T_NEON_DOTPROD "arch=armv8.2-a+dotprod"
#define GPT2S_T_NEON_BF16 "arch=armv8.2-a+bf16"
#define GPT2S_NEON_DP __attribute__((target(GPT2S_T_NEON_DOTPROD), noinline))
#define GPT2S_NEON_DP_INLINE static inline \
    __attribute__((target(GPT2S_T_NEON_DOTPROD), always_inline))
#define GPT2S_NEON_BF __attribute__((target(GPT2S_T_NEON_BF16), noinline))
#define GPT2S_NEON_BF_INLINE static inline \
    __attribute__((target(GPT2S_T_NEON_BF16), always_inline))
#else
#define GPT2S_HAVE_NEON_DOTPROD 0
#define GPT2S_HAVE_NEON_BF16 0
#endif
#if defined(__linux__)
#include <sys/auxv.h>
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#else
#define GPT2S_HAVE_NEON 0
#define GPT2S_HAVE_NEON_DOTPROD 0
#define GPT2S_HAVE_NEON_BF16 0
#endif

/* The AVX-VNNI and AVX-512 levels need a compiler that knows their target names and CPUID
   features (GCC 11, LLVM clang 13, Apple clang 14); the variant functions are compiled for
   them whatever the build machine is. */
#if defined(__apple_build_version__)
#define GPT2S_CLANG_AVXVNNI (__clang_major__ >= 14)
#elif defined(__clang__)
#define GPT2S_CLANG_AVXVNNI (__clang_major__ >= 13)
#endif
#if GPT2S_HAVE_X86_64_V3 && ((defined(__clang__) && GPT2S_CLANG_AVXVNNI) \
                             || (!defined(__clang__) && __GNUC__ >= 11)) \
    && !defined(GPT2S_NO_AVX512)
#define GPT2S_HAVE_AVX512 1
#define GPT2S_T_AVX512 "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq"
#define GPT2S_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni"), noinline))
#define GPT2S_AVXVNNI_INLINE static inline \
    __attribute__((target("avx2,fma,f16c,avxvnni"), always_inline))
#define GPT2S_V4 __attribute__((target(GPT2S_T_AVX512), noinline))
#define GPT2S_V4_INLINE static inline __attribute__((target(GPT2S_T_AVX512), always_inline))
#define GPT2S_V4VNNI __attribute__((target(GPT2S_T_AVX512 ",avx512vnni"), noinline))
#define GPT2S_V4VNNI_INLINE static inline \
    __attribute__((target(GPT2S_T_AVX512 ",avx512vnni"), always_inline))
#define GPT2S_V4BF16 __attribute__((target(GPT2S_T_AVX512 ",avx512bf16"), noinline))
#define GPT2S_V4BF16_INLINE static inline \
    __attribute__((target(GPT2S_T_AVX512 ",avx512bf16"), always_inline))
#else
#define GPT2S_HAVE_AVX512 0
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
#if GPT2S_HAVE_AVX512
    /* __builtin_cpu_supports also checks that the OS saves the registers (XGETBV) */
    static int level[GPT2S_NISA] = {-1, -1, -1, -1, -1, -1};
    if (isa > GPT2S_ISA_X86_64_V3 && isa <= GPT2S_ISA_AVX512_BF16) {
        if (level[isa] < 0) {
            int v4;
            __builtin_cpu_init();
            v4 = gpt2s_cpu_has(GPT2S_ISA_X86_64_V3) && __builtin_cpu_supports("avx512f")
                 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
                 && __builtin_cpu_supports("avx512dq");
            level[isa] = isa == GPT2S_ISA_AVX_VNNI
                             ? gpt2s_cpu_has(GPT2S_ISA_X86_64_V3)
                                   && __builtin_cpu_supports("avxvnni")
                       : isa == GPT2S_ISA_AVX512 ? v4
                       : isa == GPT2S_ISA_AVX512_VNNI ? v4 && __builtin_cpu_supports("avx512vnni")
                       : v4 && __builtin_cpu_supports("avx512bf16");
        }
        return level[isa];
    }
#endif
#if GPT2S_HAVE_NEON
    if (isa == GPT2S_ISA_NEON) return 1;   /* every aarch64 CPU */
    static int arm[GPT2S_NISA] = {-1, -1, -1, -1, -1, -1, -1, -1, -1};
    if ((isa == GPT2S_ISA_NEON_DOTPROD && GPT2S_HAVE_NEON_DOTPROD)
        || (isa == GPT2S_ISA_NEON_BF16 && GPT2S_HAVE_NEON_BF16)) {
        if (arm[isa] < 0) {
#if defined(__linux__)
            /* the kernel's HWCAP bits (asm/hwcap.h), spelled out for older headers */
            unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
            arm[isa] = isa == GPT2S_ISA_NEON_DOTPROD ? (hw & (1ul << 20)) != 0   /* ASIMDDP */
                                                     : (hw2 & (1ul << 14)) != 0; /* BF16 */
#elif defined(__APPLE__)
            int on = 0;
            size_t size = sizeof(on);
            if (sysctlbyname(isa == GPT2S_ISA_NEON_DOTPROD ? "hw.optional.arm.FEAT_DotProd"
                                                           : "hw.optional.arm.FEAT_BF16",
                             &on, &size, NULL, 0) != 0)
                on = 0;
            arm[isa] = on != 0;
#else
            arm[isa] = 0;
#endif
        }
        return arm[isa];
    }
#endif
    return 0;
}

/* Row i of a register tile that starts at p, or row 0 again when the tile has only n rows:
   the rows past the end are computed (on row 0's data) and never stored. */
#define GPT2S_ROW(p, i, n, ld) ((p) + ((n) > (i) ? (int64_t)(i) * (ld) : 0))

#endif
