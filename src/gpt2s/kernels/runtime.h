/* Run-time facts and counters of _core: whether OpenMP was compiled in and its default team
   size (the Threads section of _core.pyx: have_openmp, omp_max_threads), the team size pinned
   for the public call running on this thread, and the matmul path
   counters (gemm and gemm_serial in _core.pyx count their choices here; matmul_path_counts /
   reset_matmul_path_counts read and clear them).  */

#ifndef GPT2S_RUNTIME_H
#define GPT2S_RUNTIME_H

#ifdef _OPENMP
#include <omp.h>
static int gpt2s_have_openmp(void) { return 1; }
static int gpt2s_omp_max_threads(void) { return omp_get_max_threads(); }
#else
static int gpt2s_have_openmp(void) { return 0; }
static int gpt2s_omp_max_threads(void) { return 1; }
#endif

/* The team size of the public call running on this (Python) thread, 0 when none is: a call
   reads gpt2s.set_num_threads's count once when it starts (_core.pinned_num_threads) and
   every kernel it runs takes its team from here, so a set_num_threads from another thread
   during the call cannot run part of it on another team, whose float32 sums would be
   ordered otherwise.  Thread-local: each Python thread has its own call.  Kernels read it on
   the calling thread only (before they open a parallel region), never inside one. */
#if defined(_MSC_VER)
#define GPT2S_THREAD_LOCAL __declspec(thread)
#else
#define GPT2S_THREAD_LOCAL __thread
#endif
static GPT2S_THREAD_LOCAL int gpt2s_call_team;
static int gpt2s_call_threads(void) { return gpt2s_call_team; }
static void gpt2s_set_call_threads(int n) { gpt2s_call_team = n; }

/* Which way each matmul went: one counter per dispatched path, for the tests that force a
   path and must prove it ran (matmul_path_counts).  Atomic (relaxed) increments, once per
   gemm / gemm_serial call and never per element, so they are exact under threads and cost
   nothing measurable. */
enum { GPT2S_PATH_SERIAL, GPT2S_PATH_SPLIT_COLUMNS, GPT2S_PATH_SPLIT_ROWS,
       GPT2S_PATH_GEMV_SPLIT_K, GPT2S_PATH_SMALLM_NN, GPT2S_PATH_SMALLM_NT,
       GPT2S_PATH_GEMV, GPT2S_PATH_SGEMM, GPT2S_NPATHS };
static long long gpt2s_path_counts[GPT2S_NPATHS];
#if defined(_MSC_VER)
#include <intrin.h>
static void gpt2s_count_path(int path) {
    _InterlockedIncrement64((volatile __int64 *)&gpt2s_path_counts[path]);
}
#else
static void gpt2s_count_path(int path) {
    __atomic_fetch_add(&gpt2s_path_counts[path], 1, __ATOMIC_RELAXED);
}
#endif

#endif
