# cython: language_level=3
"""The gpt2s kernels.

One ``*_forward`` / ``*_backward`` pair per layer, outputs first, a comment with the shapes on
top (the llm.c convention).  Every kernel releases the GIL and runs its loops under ``prange``
on our single OpenMP thread pool.  Matmuls go to a single-threaded BLAS ``sgemm`` (SciPy's,
reached through its Cython capsule) called from inside that pool, one column or row block
per thread, so BLAS's own pool never competes with OpenMP's (docs/architecture.md, "The GEMM
note").

Shapes: B batch, T time, C channels (n_embd), NH heads, HS = C / NH head size, V vocab,
N = B * T rows, OC output channels of a matmul.
"""

from cython.parallel cimport prange, parallel, threadid
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
from libc.math cimport sqrtf, sqrt, isfinite, sin, cos  # isfinite: kernels/sampling.pxi
from libc.stdint cimport int64_t, int32_t, uint16_t, int8_t
from libc.limits cimport INT_MAX
from cpython.number cimport PyNumber_Index
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_GetName

import numbers

import numpy as np

# The row kernels (activations, softmax, layernorm rows; gpt2s_expf, gpt2s_dot)
cdef extern from "kernels/rows.h":
    int gpt2s_have_clones() noexcept nogil
    void gpt2s_gelu_row(float *out, const float *x, int n) noexcept nogil
    void gpt2s_gelu_backward_row(float *dinp, const float *x, const float *dout, int n) noexcept nogil
    void gpt2s_erf_row(float *out, const float *x, int n) noexcept nogil
    void gpt2s_erfc_row(float *out, const float *x, int n) noexcept nogil
    void gpt2s_gelu_erf_row(float *out, const float *x, int n) noexcept nogil
    void gpt2s_gelu_erf_backward_row(float *dinp, const float *x, const float *dout, int n) noexcept nogil
    void gpt2s_relu_row(float *out, const float *x, int n) noexcept nogil
    void gpt2s_relu_backward_row(float *dinp, const float *x, const float *dout, int n) noexcept nogil
    void gpt2s_silu_row(float *out, const float *x, int n) noexcept nogil
    void gpt2s_silu_backward_row(float *dinp, const float *x, const float *dout, int n) noexcept nogil
    void gpt2s_quick_gelu_row(float *out, const float *x, int n) noexcept nogil
    void gpt2s_quick_gelu_backward_row(float *dinp, const float *x, const float *dout, int n) noexcept nogil
    float gpt2s_logsumexp_row(const float *x, int n) noexcept nogil
    void gpt2s_scaled_softmax_row(float *d, const float *x, float lse, float scale, int n) noexcept nogil
    float gpt2s_causal_softmax_row(float *row, int valid, int n) noexcept nogil
    void gpt2s_softmax_backward_row(float *p, float *dp, float lse, float D, int valid, int n) noexcept nogil
    void gpt2s_layernorm_row(float *out, float *mean_out, float *rstd_out, const float *x, const float *w, const float *b, int C, float eps) noexcept nogil
    void gpt2s_layernorm_backward_row(float *dinp, float *dw, float *db, const float *dout, const float *x, const float *w, float m, float r, int C) noexcept nogil
    float gpt2s_expf(float x) noexcept nogil
    float gpt2s_dot(const float *x, const float *y, int n) noexcept nogil
    void gpt2s_rmsnorm_row(float *out, float *rstd_out, const float *x, const float *w, int C, float eps) noexcept nogil
    void gpt2s_rmsnorm_backward_row(float *dinp, float *dw, const float *dout, const float *x, const float *w, float r, int C) noexcept nogil
    void gpt2s_rotary_row(float *x, const float *cs, const float *sn, int h) noexcept nogil
    void gpt2s_mul_row(float *out, const float *act, const float *up, int n) noexcept nogil


# whether OpenMP was compiled in, the team size pinned for this thread's public call (with
# the matmul path counters below)
cdef extern from "kernels/runtime.h":
    int gpt2s_have_openmp() noexcept nogil
    int gpt2s_omp_max_threads() noexcept nogil
    int gpt2s_call_threads() noexcept nogil
    void gpt2s_set_call_threads(int n) noexcept nogil


# --------------------------------------------------------------------------------------------
# Integer arguments.  An exported kernel takes its integer arguments (positions, offsets,
# head counts, steps) as Python objects and converts them here: a Cython `int` parameter
# would raise OverflowError (naming neither the kernel nor the argument) for 2^31, and take
# 1.5 as 1.  Every bound the kernel then computes is Py_ssize_t arithmetic written so that
# it cannot overflow (`_span_outside`), and every size handed to a C `int` (BLAS's M, N, K,
# leading dimensions; the row kernels' widths) is checked against INT_MAX first.

cdef Py_ssize_t _int_arg(str kernel, str name, object value) except? -1:
    cdef object v
    try:
        v = PyNumber_Index(value)
    except TypeError:
        raise TypeError(f"{kernel}: {name} must be an integer, got "
                        f"{type(value).__name__} {value!r:.40}") from None
    if not -0x8000000000000000 <= v <= 0x7fffffffffffffff:
        raise ValueError(f"{kernel}: {name}={v} does not fit in 64 bits")
    return v


cdef inline bint _span_outside(Py_ssize_t start, Py_ssize_t length,
                               Py_ssize_t total) noexcept nogil:
    # whether [start, start + length) is not inside [0, total), without computing the sum
    return start < 0 or length < 0 or start > total or length > total - start


cdef inline bint _over_int(Py_ssize_t n) noexcept nogil:
    return n > INT_MAX


# --------------------------------------------------------------------------------------------
# Threads

cdef int _num_threads = 1

# The most threads set_num_threads takes: far more than any CPU has cores, and far fewer than
# the threads a process may start (libgomp crashes when it cannot create the team it was
# asked for: 100000 did, here).
cdef int MAX_THREADS = 1024


# Below this much work (elements touched, or multiply-adds) a kernel runs on the calling
# thread: waking the team costs more than it saves, and on a busy machine every parallel
# region waits for its slowest thread to be scheduled (batch-1 decoding runs ~120 small
# kernels per token).  The one threshold for every kernel, matmuls included (gemm weighs
# its multiply-adds by MATMUL_WORK_PER_MAC).
cdef double PARALLEL_MIN_WORK = 65536.0


# What one multiply-add of a matmul counts for against PARALLEL_MIN_WORK.  A quarter keeps
# the split point gemm had before it shared the threshold (a fixed 5e5 flops): at the default
# 65536 it is 262144 multiply-adds, 5.2e5 flops.
cdef double MATMUL_WORK_PER_MAC = 0.25


cdef inline int team_size() noexcept nogil:
    # the count pinned for the public call running on this thread (pinned_num_threads), else
    # the current setting
    cdef int n = gpt2s_call_threads()
    return n if n > 0 else _num_threads


cdef inline int threads_for(double work) noexcept nogil:
    return team_size() if work >= PARALLEL_MIN_WORK else 1


cdef class pinned_num_threads:
    """``with pinned_num_threads() as n:`` runs every kernel called inside on the same team of
    n threads, the count set when the block was entered, whatever set_num_threads does
    meanwhile in other threads.  Per Python thread, and re-entrant: a block inside another
    keeps the outer block's count.  The façade wraps each public call in one."""

    cdef int previous

    def __enter__(self):
        self.previous = gpt2s_call_threads()
        if self.previous == 0:
            gpt2s_set_call_threads(_num_threads)
        return gpt2s_call_threads()

    def __exit__(self, exc_type, exc, tb):
        gpt2s_set_call_threads(self.previous)
        return False


def set_parallel_min_work(work):
    """Set the size below which kernels stay on one thread (default 65536), matmuls included;
    0 makes every kernel and every matmul use the whole team (the thread tests use it to
    exercise every parallel path)."""
    global PARALLEL_MIN_WORK
    if isinstance(work, bool) or not isinstance(work, numbers.Real):
        raise TypeError(f"set_parallel_min_work: work must be a number, got "
                        f"{type(work).__name__}")
    if not work >= 0:
        raise ValueError(f"set_parallel_min_work: parallel min work must be >= 0, got {work}")
    PARALLEL_MIN_WORK = work


def get_parallel_min_work():
    return PARALLEL_MIN_WORK


def have_isa_clones():
    """True when the row kernels were also built for x86-64-v3 (AVX2 + FMA), picked at load
    time on CPUs that have it."""
    return bool(gpt2s_have_clones())


def have_openmp():
    """True when this build of _core was compiled with OpenMP."""
    return bool(gpt2s_have_openmp())


def omp_max_threads():
    """OpenMP's default team size (OMP_NUM_THREADS or the core count); 1 without OpenMP."""
    return gpt2s_omp_max_threads()


def set_num_threads(n):
    """Set the team size every kernel uses, 1 to 1024.  Without OpenMP this stays 1.  A public
    call already running keeps the count it pinned (pinned_num_threads)."""
    global _num_threads
    cdef Py_ssize_t count = _int_arg("set_num_threads", "n", n)
    if count < 1 or count > MAX_THREADS:
        raise ValueError(f"set_num_threads: number of threads must be between 1 and "
                         f"{MAX_THREADS}, got {count}")
    _num_threads = <int>count if gpt2s_have_openmp() else 1


def max_num_threads():
    """The largest count set_num_threads takes."""
    return MAX_THREADS


def get_num_threads():
    return _num_threads


# --------------------------------------------------------------------------------------------
# BLAS: SciPy's sgemm through its Cython capsule (no link-time BLAS dependency for the wheel).

ctypedef void (*sgemm_t)(char *transa, char *transb, int *m, int *n, int *k, float *alpha,
                         float *a, int *lda, float *b, int *ldb, float *beta, float *c,
                         int *ldc) noexcept nogil

ctypedef void (*sgemv_t)(char *trans, int *m, int *n, float *alpha, float *a, int *lda,
                         float *x, int *incx, float *beta, float *y, int *incy) noexcept nogil

cdef sgemm_t _sgemm = NULL
cdef sgemv_t _sgemv = NULL


def _load_blas():
    global _sgemm, _sgemv
    from gpt2s._blas import cython_blas
    capi = cython_blas().__pyx_capi__
    capsule = capi["sgemm"]
    _sgemm = <sgemm_t>PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule))
    capsule = capi["sgemv"]
    _sgemv = <sgemv_t>PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule))


_load_blas()


# Which way each matmul went: one counter per dispatched path, for the tests that force a
# path and must prove it ran (atomic increments in _runtime.h, which says why they are cheap).
cdef extern from "kernels/runtime.h":
    enum:
        GPT2S_PATH_SERIAL
        GPT2S_PATH_SPLIT_COLUMNS
        GPT2S_PATH_SPLIT_ROWS
        GPT2S_PATH_GEMV_SPLIT_K
        GPT2S_PATH_SMALLM_NN
        GPT2S_PATH_SMALLM_NT
        GPT2S_PATH_GEMV
        GPT2S_PATH_SGEMM
        GPT2S_NPATHS
    long long gpt2s_path_counts[]
    void gpt2s_count_path(int path) noexcept nogil


# the names of the counters, in enum order: gemm's four top-level choices, then what
# gemm_serial ran (the few-row kernels, sgemv for one row, and every sgemm call: a product
# cut into row slices counts one per slice)
_MATMUL_PATHS = ("serial", "split_columns", "split_rows", "gemv_split_k",
                 "smallm_nn", "smallm_nt", "gemv", "sgemm")


def matmul_path_counts():
    """{path: calls} since the last reset_matmul_path_counts(): gemm's choice per matmul
    ("serial", "split_columns", "split_rows", "gemv_split_k") and the leaf calls on each
    thread ("smallm_nn", "smallm_nt", "gemv", "sgemm" per row slice).  Attention's own
    per-head products count as leaf calls too.  For tests and benchmarks."""
    return {name: int(gpt2s_path_counts[i]) for i, name in enumerate(_MATMUL_PATHS)}


def reset_matmul_path_counts():
    """Set every matmul path counter to zero."""
    cdef int i
    for i in range(GPT2S_NPATHS):
        gpt2s_path_counts[i] = 0


cdef inline void sgemm_colmajor(char ta, char tb, int m, int n, int k, float alpha,
                                const float *a, int lda, const float *b, int ldb,
                                float beta, float *c, int ldc) noexcept nogil:
    _sgemm(&ta, &tb, &m, &n, &k, &alpha, <float *>a, &lda, <float *>b, &ldb, &beta, c, &ldc)


# Most rows of C one sgemm call gets (gemm_serial cuts taller products into slices): BLAS
# packs its slice of op(A) into a work buffer whose touched pages then stay resident, and the
# lm_head's dwte (25k rows per thread, 50k on one thread) left ~33 MiB of them.  4096 rows cut
# that by 28 MiB at no measurable cost (lm_head backward, 256 x 50257 x 768, 2 threads:
# 209-219 ms with and 210-216 ms without).
cdef int ROWS_PER_SGEMM = 4096


def set_rows_per_sgemm(n):
    """Set the most rows of C one sgemm call gets (default 4096); returns the previous
    value.  For tests and benchmarks."""
    global ROWS_PER_SGEMM
    cdef Py_ssize_t rows = _int_arg("set_rows_per_sgemm", "n", n)
    if rows < 1:
        raise ValueError(f"set_rows_per_sgemm: rows per sgemm must be >= 1, got {rows}")
    previous = ROWS_PER_SGEMM
    ROWS_PER_SGEMM = <int>min(rows, INT_MAX)   # no product has more rows than an int holds
    return previous


cdef inline void gemm_serial(bint trans_a, bint trans_b, int M, int N, int K, float alpha,
                             const float *A, int lda, const float *B, int ldb,
                             float beta, float *C, int ldc) noexcept nogil:
    # Row-major C[M, N] = alpha op(A)[M, K] op(B)[K, N] + beta C, on the calling thread.
    # A row-major matrix is its column-major transpose, so we ask BLAS for C^T = op(B)^T op(A)^T.
    cdef int one = 1, inc_a, lo = 0, m, j
    cdef char t
    cdef gpt2s_direct_fn direct = NULL
    if M <= 0 or N <= 0:
        return
    if K <= 0:
        # an empty sum: C = beta C.  BLAS must not see it: sgemv refuses the zero leading
        # dimension of an empty operand (it prints an error and returns), and returns early
        # without applying beta = 0 for an empty sum
        for m in range(M):
            if beta == 0.0:
                memset(C + <int64_t>m * ldc, 0, N * sizeof(float))
            elif beta != 1.0:
                for j in range(N):
                    C[<int64_t>m * ldc + j] *= beta
        return
    if not trans_a and alpha == 1.0 and (beta == 0.0 or beta == 1.0):
        direct = direct_kernel(GPT2S_WTYPE_F32, trans_b, M)
    if direct != NULL:
        # a few rows (decoding a batch): kernels that read B once (kernels/f32.h)
        gpt2s_count_path(GPT2S_PATH_SMALLM_NT if trans_b else GPT2S_PATH_SMALLM_NN)
        direct(M, N, K, A, lda, B, ldb, NULL, beta == 1.0, C, ldc)
        return
    if M == 1:
        # One row (batch-1 decoding): a matrix-vector product.  sgemm with one column runs
        # several times slower than sgemv on the same memory-bound work.
        gpt2s_count_path(GPT2S_PATH_GEMV)
        inc_a = lda if trans_a else 1
        if trans_b:   # B (N, K) row-major is column-major (K x N): C = B_cm^T a
            t = b'T'
            _sgemv(&t, &K, &N, &alpha, <float *>B, &ldb, <float *>A, &inc_a, &beta, C, &one)
        else:         # B (K, N) row-major is column-major (N x K): C = B_cm a
            t = b'N'
            _sgemv(&t, &N, &K, &alpha, <float *>B, &ldb, <float *>A, &inc_a, &beta, C, &one)
        return
    while lo < M:   # slices of at most ROWS_PER_SGEMM rows (see there)
        gpt2s_count_path(GPT2S_PATH_SGEMM)
        sgemm_colmajor(b'T' if trans_b else b'N', b'T' if trans_a else b'N', N,
                       min(M - lo, ROWS_PER_SGEMM), K, alpha, B, ldb,
                       (A + lo) if trans_a else (A + <int64_t>lo * lda), lda,
                       beta, C + <int64_t>lo * ldc, ldc)
        lo = lo + ROWS_PER_SGEMM


cdef inline void sgemv_rows(int N, int rows, float alpha, const float *B, int ldb,
                            const float *a, int inc_a, float *out) noexcept nogil:
    # out (N,) = alpha a (rows,) @ B (rows, N); B row-major is column-major (N x rows)
    cdef int one = 1
    cdef float zero = 0.0
    cdef char no_trans = b'N'
    _sgemv(&no_trans, &N, &rows, &alpha, <float *>B, &ldb, <float *>a, &inc_a, &zero, out, &one)


# The partial product of rows lo .. hi of K into part (N,): one thread's share of split_k.
ctypedef void (*partial_product_t)(const void *ctx, int lo, int hi, float *part,
                                   int N) noexcept nogil


cdef int split_k(int nt, int N, int K, int align, partial_product_t partial, const void *ctx,
                 float *y, float beta, bint onto_y) noexcept nogil:
    # y (N,) = the sum over K of a one-row product, + beta y: K cut into nt blocks (a multiple
    # of align rows each), each thread's partial product into a buffer of its own, the
    # partials added in thread order (the same result on every run with the same team).  Each
    # thread streams whole rows of W, one contiguous run: a split of the columns gives each
    # thread a piece of every row, more streams than the prefetchers follow (one process
    # alternating the two, 2 threads: GPT-2's mlp.c_fc 768 x 3072 in bfloat16 14.4-17.0 GB/s
    # by columns, 17.2-18.4 by K).  The float32 product (onto_y False) adds the partials,
    # then beta y; the other types add each partial onto beta y.  Returns -1 when the
    # partials cannot be allocated.
    cdef float *part = <float *>malloc(sizeof(float) * <int64_t>nt * N)
    # block bounds in 64 bits: K + nt - 1 may pass INT_MAX
    cdef int64_t lo, hi, step = ((<int64_t>K + nt - 1) // nt + align - 1) // align * align
    cdef int t, j
    cdef float s
    if part == NULL:
        return -1
    for t in prange(nt, num_threads=nt, schedule='static'):
        lo = t * step
        hi = min(<int64_t>K, lo + step)
        if lo < hi:
            partial(ctx, <int>lo, <int>hi, part + <int64_t>t * N, N)
        else:
            memset(part + <int64_t>t * N, 0, N * sizeof(float))
    for j in range(N):
        s = beta * y[j] if onto_y and beta != 0.0 else 0.0
        for t in range(nt):
            s = s + part[<int64_t>t * N + j]
        y[j] = s + beta * y[j] if not onto_y and beta != 0.0 else s
    free(part)
    return 0


cdef struct gemv_rows_ctx:
    float alpha
    const float *a
    int inc_a
    const float *B
    int ldb


cdef void gemv_rows_partial(const void *ctx, int lo, int hi, float *part, int N) noexcept nogil:
    # part (N,) = alpha a[lo:hi] @ B[lo:hi, :]
    cdef const gemv_rows_ctx *c = <const gemv_rows_ctx *>ctx
    sgemv_rows(N, hi - lo, c.alpha, c.B + <int64_t>lo * c.ldb, c.ldb,
               c.a + <int64_t>lo * c.inc_a, c.inc_a, part)


cdef void gemm(bint trans_a, bint trans_b, int M, int N, int K, float alpha,
               const float *A, int lda, const float *B, int ldb,
               float beta, float *C, int ldc) noexcept nogil:
    # gemm_serial split into one block of C per thread (along the longer side of C), each
    # block a single-threaded sgemm, all inside our one OpenMP team.
    cdef int nt = threads_for(MATMUL_WORK_PER_MAC * M * N * K)
    # block bounds in 64 bits: N + nt - 1 and the rounding up to 16 may pass INT_MAX
    cdef int64_t nblocks, blk, lo, hi, step
    cdef gemv_rows_ctx ctx
    if M <= 0 or N <= 0:
        return   # (no block size to split an empty side by, and sgemv refuses it)
    if nt <= 1 or K <= 0:
        gpt2s_count_path(GPT2S_PATH_SERIAL)
        gemm_serial(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        return
    if M == 1 and not trans_b and K >= 2 * nt:
        gpt2s_count_path(GPT2S_PATH_GEMV_SPLIT_K)
        # a row vector times a row-major B (K, N): each thread streams its own contiguous
        # block of B's rows (split_k)
        ctx.alpha, ctx.a, ctx.inc_a, ctx.B, ctx.ldb = alpha, A, lda if trans_a else 1, B, ldb
        if split_k(nt, N, K, 1, gemv_rows_partial, &ctx, C, beta, False) != 0:
            # out of memory for the partial sums: one thread does it all
            gemm_serial(trans_a, False, 1, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        return
    if N >= M:
        # split columns of C: columns of op(B)
        gpt2s_count_path(GPT2S_PATH_SPLIT_COLUMNS)
        step = ((<int64_t>N + nt - 1) // nt + 15) // 16 * 16
        nblocks = (N + step - 1) // step
        for blk in prange(nblocks, num_threads=nt, schedule='static'):
            lo = blk * step
            hi = min(<int64_t>N, lo + step)
            gemm_serial(trans_a, trans_b, M, <int>(hi - lo), K, alpha, A, lda,
                        (B + <int64_t>lo * ldb) if trans_b else (B + lo), ldb,
                        beta, C + lo, ldc)
    else:
        gpt2s_count_path(GPT2S_PATH_SPLIT_ROWS)
        step = ((<int64_t>M + nt - 1) // nt + 15) // 16 * 16
        nblocks = (M + step - 1) // step
        for blk in prange(nblocks, num_threads=nt, schedule='static'):
            lo = blk * step
            hi = min(<int64_t>M, lo + step)
            gemm_serial(trans_a, trans_b, <int>(hi - lo), N, K, alpha,
                        (A + lo) if trans_a else (A + <int64_t>lo * lda), lda, B, ldb,
                        beta, C + <int64_t>lo * ldc, ldc)


include "kernels/matmul.pxi"   # products with a weight of any type of kernels/types.h
include "kernels/bf16compute.pxi"   # the same products in bfloat16 compute (bf16gemm.h)


# --------------------------------------------------------------------------------------------
# Argument checks.  The kernels run with boundscheck=False on raw row pointers: every exported
# kernel checks its shapes (and the token ids, targets and positions it indexes with) once per
# call, and raises a ValueError naming itself and the shapes it got.

def _sh(x):
    """The shape of a memoryview, for error messages: (2, 3)."""
    return tuple(x.shape)


cdef Py_ssize_t _first_outside(const int64_t[::1] ids, int64_t lo, int64_t hi) noexcept:
    # index of the first id outside [lo, hi), or -1: one pass over N ints
    cdef Py_ssize_t i
    for i in range(ids.shape[0]):
        if ids[i] < lo or ids[i] >= hi:
            return i
    return -1


# --------------------------------------------------------------------------------------------
# Embedding

cdef int64_t _check_row_pos(str kernel, const int64_t[::1] row_pos, Py_ssize_t B,
                            Py_ssize_t T, Py_ssize_t limit) except -1:
    # per-row first positions (B,) of T positions each, all within [0, limit); returns the
    # largest one
    cdef Py_ssize_t b
    cdef int64_t top = 0
    if row_pos.shape[0] != B:
        raise ValueError(f"{kernel}: row_pos has {row_pos.shape[0]} entries for {B} rows")
    for b in range(B):
        if row_pos[b] < 0 or row_pos[b] > limit - T:
            raise ValueError(f"{kernel}: row_pos[{b}] = {row_pos[b]}: need 0 <= row_pos and "
                             f"row_pos + T <= {limit} (T={T})")
        top = max(top, row_pos[b])
    return top


def embedding_forward(float[:, ::1] out, const int64_t[::1] idx, wte, const float[:, ::1] wpe,
                      T, pos0, const int64_t[::1] row_pos=None):
    # out (N, C) = wte[idx] + wpe[pos0 + t];  idx (N,) with N = B * T, row n at time n % T;
    # wte (V, C) float32, or a PackedWeight stored untransposed (its rows widened).
    # row_pos (B,): per-row first positions (row n of sequence n // T at row_pos[n // T] + t)
    # instead of pos0 (ragged batches)
    cdef Py_ssize_t N = out.shape[0], C = out.shape[1], n, c, V, nb = 0
    cdef const int64_t *rp = NULL
    cdef Py_ssize_t steps = _int_arg("embedding_forward", "T", T)
    cdef Py_ssize_t first = _int_arg("embedding_forward", "pos0", pos0)
    cdef float *o
    cdef const float *te
    cdef const float *pe
    cdef const float[:, ::1] wf
    cdef PackedWeight pw = None
    cdef gpt2s_widen_fn widen = NULL
    cdef int t = GPT2S_WTYPE_F32
    if isinstance(wte, PackedWeight):
        pw = wte
        t = pw.wtype
        if pw.transposed:
            raise ValueError(f"embedding_forward: wte {pw!r} is stored transposed; an embedding "
                             f"is stored as its rows (V, C)")
        V = pw.rows
        wshape = (pw.rows, pw.cols)
        widen = gpt2s_wtype_widen(t, gpt2s_wtype_variant[t])
        nb = pw.cols // gpt2s_wtypes[t].block if gpt2s_wtypes[t].block else 0
    else:
        wf = wte
        V = wf.shape[0]
        wshape = (wf.shape[0], wf.shape[1])
    if (idx.shape[0] != N or wshape[1] != C or wpe.shape[1] != C or steps < 1
            or N % steps != 0 or _span_outside(first, steps, wpe.shape[0])
            or (pw is not None and _over_int(C))):
        raise ValueError(f"embedding_forward: out {_sh(out)}, idx {_sh(idx)}, wte {wshape}, "
                         f"wpe {_sh(wpe)}, T={T}, pos0={pos0}: need out (B*T, C), idx (B*T,), "
                         f"wte (V, C), wpe (n_ctx, C) and 0 <= pos0, pos0 + T <= n_ctx")
    n = _first_outside(idx, 0, V)
    if n >= 0:
        raise ValueError(f"embedding_forward: token id {idx[n]} at {n} is outside [0, {V})")
    if row_pos is not None:
        _check_row_pos("embedding_forward", row_pos, N // steps, steps, wpe.shape[0])
        if N > 0:
            rp = &row_pos[0]
    if N == 0 or C == 0:
        return
    if pw is None:
        for n in prange(N, nogil=True, num_threads=threads_for(N * C), schedule='static'):
            o = &out[n, 0]
            te = &wf[idx[n], 0]
            pe = &wpe[(rp[n // steps] if rp != NULL else first) + n % steps, 0]
            for c in range(C):
                o[c] = te[c] + pe[c]
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * C), schedule='static'):
        o = &out[n, 0]
        pe = &wpe[(rp[n // steps] if rp != NULL else first) + n % steps, 0]
        widen(o, C, weight_at(t, pw.ptr, idx[n] * C), C,
              pw.sptr + idx[n] * nb if pw.sptr != NULL else NULL, 1, <int>C)
        for c in range(C):
            o[c] = o[c] + pe[c]


def embedding_backward(float[:, ::1] dwte, float[:, ::1] dwpe, const float[:, ::1] dout,
                       const int64_t[::1] idx, T):
    # dwte[idx[n]] += dout[n];  dwpe[t] += sum_b dout[b * T + t].
    # Race-free: thread k owns the vocabulary rows v with v % nt == k, and each position row t
    # belongs to one prange iteration.
    cdef Py_ssize_t N = dout.shape[0], C = dout.shape[1], n, c, b, t, B
    cdef Py_ssize_t steps = _int_arg("embedding_backward", "T", T)
    cdef int nt = threads_for(N * C), k
    cdef float *d
    cdef const float *g
    if (idx.shape[0] != N or dwte.shape[1] != C or dwpe.shape[1] != C or steps < 1
            or N % steps != 0 or steps > dwpe.shape[0]):
        raise ValueError(f"embedding_backward: dwte {_sh(dwte)}, dwpe {_sh(dwpe)}, dout "
                         f"{_sh(dout)}, idx {_sh(idx)}, T={T}: need dout (B*T, C), idx (B*T,), "
                         f"dwte (V, C), dwpe (n_ctx, C) with T <= n_ctx")
    n = _first_outside(idx, 0, dwte.shape[0])
    if n >= 0:
        raise ValueError(f"embedding_backward: token id {idx[n]} at {n} is outside "
                         f"[0, {dwte.shape[0]})")
    if N == 0 or C == 0:
        return
    B = N // steps
    for k in prange(nt, nogil=True, num_threads=nt, schedule='static'):
        for n in range(N):
            if idx[n] % nt == k:
                d = &dwte[idx[n], 0]
                g = &dout[n, 0]
                for c in range(C):
                    d[c] += g[c]
    for t in prange(steps, nogil=True, num_threads=nt, schedule='static'):
        d = &dwpe[t, 0]
        for b in range(B):
            g = &dout[b * steps + t, 0]
            for c in range(C):
                d[c] += g[c]


# --------------------------------------------------------------------------------------------
# LayerNorm

def layernorm_forward(float[:, ::1] out, float[::1] mean, float[::1] rstd,
                      const float[:, ::1] inp, const float[::1] weight, const float[::1] bias,
                      float eps):
    # out (N, C) = (inp - mean) * rstd * weight + bias; mean, rstd (N,) kept for the backward
    # (both empty: not kept)
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], n
    if (out.shape[0] != N or out.shape[1] != C or weight.shape[0] != C or bias.shape[0] != C
            or mean.shape[0] != rstd.shape[0] or (mean.shape[0] != 0 and mean.shape[0] != N)
            or C < 1 or _over_int(C)):
        raise ValueError(f"layernorm_forward: out {_sh(out)}, mean {_sh(mean)}, rstd "
                         f"{_sh(rstd)}, inp {_sh(inp)}, weight {_sh(weight)}, bias {_sh(bias)}: "
                         f"need out like inp (N, C) with 1 <= C < 2^31, weight and bias (C,), "
                         f"mean and rstd both (N,) or both empty")
    if N == 0:
        return
    cdef float *pm = &mean[0] if mean.shape[0] > 0 else NULL
    cdef float *pr = &rstd[0] if rstd.shape[0] > 0 else NULL
    for n in prange(N, nogil=True, num_threads=threads_for(N * C), schedule='static'):
        gpt2s_layernorm_row(&out[n, 0], (pm + n) if pm != NULL else NULL,
                      (pr + n) if pr != NULL else NULL, &inp[n, 0], &weight[0], &bias[0], C, eps)


def residual_layernorm_forward(float[:, ::1] residual, float[:, ::1] out, float[::1] mean,
                               float[::1] rstd, const float[:, ::1] inp1,
                               const float[:, ::1] inp2, const float[::1] weight,
                               const float[::1] bias, float eps):
    # residual (N, C) = inp1 + inp2, then out = layernorm(residual): one pass over the rows
    cdef Py_ssize_t N = inp1.shape[0], C = inp1.shape[1], n, c
    if (inp2.shape[0] != N or inp2.shape[1] != C or residual.shape[0] != N
            or residual.shape[1] != C or out.shape[0] != N or out.shape[1] != C
            or weight.shape[0] != C or bias.shape[0] != C or mean.shape[0] != rstd.shape[0]
            or (mean.shape[0] != 0 and mean.shape[0] != N) or C < 1 or _over_int(C)):
        raise ValueError(f"residual_layernorm_forward: residual {_sh(residual)}, out "
                         f"{_sh(out)}, mean {_sh(mean)}, rstd {_sh(rstd)}, inp1 {_sh(inp1)}, "
                         f"inp2 {_sh(inp2)}, weight {_sh(weight)}, bias {_sh(bias)}: need "
                         f"residual, out, inp2 like inp1 (N, C) with 1 <= C < 2^31, weight "
                         f"and bias (C,), mean and rstd both (N,) or both empty")
    if N == 0:
        return
    cdef float *r
    cdef const float *a
    cdef const float *b
    cdef float *pm = &mean[0] if mean.shape[0] > 0 else NULL
    cdef float *pr = &rstd[0] if rstd.shape[0] > 0 else NULL
    for n in prange(N, nogil=True, num_threads=threads_for(N * C), schedule='static'):
        r = &residual[n, 0]
        a = &inp1[n, 0]
        b = &inp2[n, 0]
        for c in range(C):
            r[c] = a[c] + b[c]
        gpt2s_layernorm_row(&out[n, 0], (pm + n) if pm != NULL else NULL,
                      (pr + n) if pr != NULL else NULL, r, &weight[0], &bias[0], C, eps)


def layernorm_backward(float[:, ::1] dinp, float[::1] dweight, float[::1] dbias,
                       const float[:, ::1] dout, const float[:, ::1] inp,
                       const float[::1] weight, const float[::1] mean, const float[::1] rstd,
                       float[:, ::1] scratch):
    # dinp (N, C) += d/dinp;  dweight, dbias (C,) += column sums.
    # scratch (nt, 2C): per-thread partial dweight/dbias, reduced after the parallel loop.
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], n, c
    # at most one partial sum per scratch row: the caller may have sized scratch for another
    # thread count (a call outside pinned_num_threads, with set_num_threads in between)
    cdef int nt = <int>min(<Py_ssize_t>team_size(), scratch.shape[0]), k, tid
    if (dinp.shape[0] != N or dinp.shape[1] != C or dout.shape[0] != N or dout.shape[1] != C
            or dweight.shape[0] != C or dbias.shape[0] != C or weight.shape[0] != C
            or mean.shape[0] != N or rstd.shape[0] != N or C < 1 or _over_int(C)):
        raise ValueError(f"layernorm_backward: dinp {_sh(dinp)}, dweight {_sh(dweight)}, "
                         f"dbias {_sh(dbias)}, dout {_sh(dout)}, inp {_sh(inp)}, weight "
                         f"{_sh(weight)}, mean {_sh(mean)}, rstd {_sh(rstd)}: need dinp, dout "
                         f"like inp (N, C) with 1 <= C < 2^31, dweight, dbias, weight (C,), "
                         f"mean, rstd (N,)")
    if nt < 1 or scratch.shape[1] < 2 * C:
        raise ValueError(f"layernorm_backward: scratch of shape ({scratch.shape[0]}, "
                         f"{scratch.shape[1]}) too small, need (>= 1, {2 * C})")
    if N == 0:
        return
    with nogil:
        memset(&scratch[0, 0], 0, nt * scratch.shape[1] * sizeof(float))
        with parallel(num_threads=nt):
            tid = threadid()
            for n in prange(N, schedule='static'):
                gpt2s_layernorm_backward_row(&dinp[n, 0], &scratch[tid, 0], &scratch[tid, C],
                                       &dout[n, 0], &inp[n, 0], &weight[0], mean[n], rstd[n], C)
        for k in range(nt):
            for c in range(C):
                dweight[c] += scratch[k, c]
                dbias[c] += scratch[k, C + c]


# --------------------------------------------------------------------------------------------
# RMSNorm (Llama, Qwen2): out = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps)

def rmsnorm_forward(float[:, ::1] out, float[::1] rstd, const float[:, ::1] inp,
                    const float[::1] weight, float eps):
    # out (N, C) = weight * (inp * rstd); rstd (N,) kept for the backward (empty: not kept)
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], n
    if (out.shape[0] != N or out.shape[1] != C or weight.shape[0] != C
            or (rstd.shape[0] != 0 and rstd.shape[0] != N) or C < 1 or _over_int(C)):
        raise ValueError(f"rmsnorm_forward: out {_sh(out)}, rstd {_sh(rstd)}, inp {_sh(inp)}, "
                         f"weight {_sh(weight)}: need out like inp (N, C) with 1 <= C < 2^31, "
                         f"weight (C,), rstd (N,) or empty")
    if N == 0:
        return
    cdef float *pr = &rstd[0] if rstd.shape[0] > 0 else NULL
    for n in prange(N, nogil=True, num_threads=threads_for(N * C), schedule='static'):
        gpt2s_rmsnorm_row(&out[n, 0], (pr + n) if pr != NULL else NULL, &inp[n, 0],
                          &weight[0], C, eps)


def residual_rmsnorm_forward(float[:, ::1] residual, float[:, ::1] out, float[::1] rstd,
                             const float[:, ::1] inp1, const float[:, ::1] inp2,
                             const float[::1] weight, float eps):
    # residual (N, C) = inp1 + inp2, then out = rmsnorm(residual): one pass over the rows
    cdef Py_ssize_t N = inp1.shape[0], C = inp1.shape[1], n, c
    if (inp2.shape[0] != N or inp2.shape[1] != C or residual.shape[0] != N
            or residual.shape[1] != C or out.shape[0] != N or out.shape[1] != C
            or weight.shape[0] != C or (rstd.shape[0] != 0 and rstd.shape[0] != N)
            or C < 1 or _over_int(C)):
        raise ValueError(f"residual_rmsnorm_forward: residual {_sh(residual)}, out {_sh(out)}, "
                         f"rstd {_sh(rstd)}, inp1 {_sh(inp1)}, inp2 {_sh(inp2)}, weight "
                         f"{_sh(weight)}: need residual, out, inp2 like inp1 (N, C) with "
                         f"1 <= C < 2^31, weight (C,), rstd (N,) or empty")
    if N == 0:
        return
    cdef float *r
    cdef const float *a
    cdef const float *b
    cdef float *pr = &rstd[0] if rstd.shape[0] > 0 else NULL
    for n in prange(N, nogil=True, num_threads=threads_for(N * C), schedule='static'):
        r = &residual[n, 0]
        a = &inp1[n, 0]
        b = &inp2[n, 0]
        for c in range(C):
            r[c] = a[c] + b[c]
        gpt2s_rmsnorm_row(&out[n, 0], (pr + n) if pr != NULL else NULL, r, &weight[0], C, eps)


def rmsnorm_backward(float[:, ::1] dinp, float[::1] dweight, const float[:, ::1] dout,
                     const float[:, ::1] inp, const float[::1] weight, const float[::1] rstd,
                     float[:, ::1] scratch):
    # dinp (N, C) += d/dinp;  dweight (C,) += column sums of (inp * rstd) * dout.
    # scratch (nt, C): per-thread partial dweight, reduced after the parallel loop (at most
    # one partial sum per scratch row, as layernorm_backward)
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], n, c
    cdef int nt = <int>min(<Py_ssize_t>team_size(), scratch.shape[0]), k, tid
    if (dinp.shape[0] != N or dinp.shape[1] != C or dout.shape[0] != N or dout.shape[1] != C
            or dweight.shape[0] != C or weight.shape[0] != C or rstd.shape[0] != N or C < 1
            or _over_int(C)):
        raise ValueError(f"rmsnorm_backward: dinp {_sh(dinp)}, dweight {_sh(dweight)}, dout "
                         f"{_sh(dout)}, inp {_sh(inp)}, weight {_sh(weight)}, rstd "
                         f"{_sh(rstd)}: need dinp, dout like inp (N, C) with 1 <= C < 2^31, "
                         f"dweight, weight (C,), rstd (N,)")
    if nt < 1 or scratch.shape[1] < C:
        raise ValueError(f"rmsnorm_backward: scratch of shape ({scratch.shape[0]}, "
                         f"{scratch.shape[1]}) too small, need (>= 1, {C})")
    if N == 0:
        return
    with nogil:
        for k in range(nt):
            memset(&scratch[k, 0], 0, C * sizeof(float))
        with parallel(num_threads=nt):
            tid = threadid()
            for n in prange(N, schedule='static'):
                gpt2s_rmsnorm_backward_row(&dinp[n, 0], &scratch[tid, 0], &dout[n, 0],
                                           &inp[n, 0], &weight[0], rstd[n], C)
        for k in range(nt):
            for c in range(C):
                dweight[c] += scratch[k, c]


# --------------------------------------------------------------------------------------------
# Matmul (Hugging Face Conv1D layout: weight (C, OC), out = inp @ weight + bias)

cdef inline bint _blas_sizes_over(Py_ssize_t a, Py_ssize_t b, Py_ssize_t c) noexcept nogil:
    # BLAS takes M, N, K and the leading dimensions as C ints
    return a > INT_MAX or b > INT_MAX or c > INT_MAX


cdef const void *_weight_operand(str kernel, weight, bint head, Py_ssize_t *K, Py_ssize_t *N,
                                 int *wtype, bint *out_major, int *ldw,
                                 const uint16_t **scales) except? NULL:
    # The stored form of a product's weight: x @ W with W (K, N) (head False), or x @ E^T with
    # E (N, K) (head True, the lm_head).  Sets K, N, the type, the layout and ldw; returns the
    # first element (NULL when the weight is empty).
    cdef const float[:, ::1] wf
    cdef PackedWeight pw
    if isinstance(weight, PackedWeight):
        pw = weight
        wtype[0] = pw.wtype
        out_major[0] = pw.transposed != head
        ldw[0] = pw.cols
        scales[0] = pw.sptr
        if head:
            N[0], K[0] = pw.shape
        else:
            K[0], N[0] = pw.shape
        if gpt2s_wtypes[pw.wtype].block and not out_major[0]:
            raise ValueError(f"{kernel}: a {pw.type_name} weight must be stored output-major "
                             f"(transposed for a Conv1D weight), got {pw!r}")
        return pw.ptr if pw.rows > 0 and pw.cols > 0 else NULL
    wf = weight
    if _blas_sizes_over(wf.shape[0], wf.shape[1], 0):
        raise ValueError(f"{kernel}: weight {_sh(wf)}, each size < 2^31")
    wtype[0] = GPT2S_WTYPE_F32
    out_major[0] = head
    ldw[0] = <int>wf.shape[1]
    scales[0] = NULL
    if head:
        N[0], K[0] = wf.shape[0], wf.shape[1]
    else:
        K[0], N[0] = wf.shape[0], wf.shape[1]
    return &wf[0, 0] if wf.shape[0] > 0 and wf.shape[1] > 0 else NULL


def matmul_forward(float[:, ::1] out, const float[:, ::1] inp, weight, const float[::1] bias):
    # out (N, OC) = inp (N, C) @ weight (C, OC) + bias (OC,) (empty: none); weight float32, or
    # a PackedWeight of that logical shape
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], n, K, OC
    cdef int wtype, ldw, failed = 0
    cdef bint out_major
    cdef const uint16_t *S
    cdef const void *W = _weight_operand("matmul_forward", weight, False, &K, &OC, &wtype,
                                         &out_major, &ldw, &S)
    if (K != C or out.shape[0] != N or out.shape[1] != OC
            or (bias.shape[0] != 0 and bias.shape[0] != OC) or _blas_sizes_over(N, C, OC)):
        raise ValueError(f"matmul_forward: shapes ({N},{C}) @ ({K},{OC}) "
                         f"+ bias ({bias.shape[0]},) -> ({out.shape[0]},{out.shape[1]}), "
                         f"each size < 2^31")
    if N == 0 or OC == 0:
        return
    with nogil:
        if bias.shape[0] > 0:
            # the bias is laid down first and the product accumulates onto it
            for n in prange(N, num_threads=threads_for(N * OC), schedule='static'):
                memcpy(&out[n, 0], &bias[0], OC * sizeof(float))
        failed = weight_gemm(wtype, out_major, <int>N, <int>OC, <int>C,
                             &inp[0, 0] if C > 0 else NULL, <int>C, W, ldw, S,
                             bias.shape[0] > 0, &out[0, 0], <int>OC)
    if failed:
        raise MemoryError("matmul_forward: out of memory for a weight panel")


def matmul_backward(float[:, ::1] dinp, float[:, ::1] dweight, float[::1] dbias,
                    const float[:, ::1] dout, const float[:, ::1] inp,
                    const float[:, ::1] weight, bint accumulate_dinp):
    # dinp (N, C) (+)= dout (N, OC) @ weight^T;  dweight (C, OC) += inp^T @ dout;
    # dbias (OC,) += column sums of dout
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], OC = weight.shape[1]
    cdef Py_ssize_t n, o, lo, hi, blk, nblocks, step
    cdef int nt = threads_for(N * OC)
    cdef float *db
    cdef const float *g
    if (weight.shape[0] != C or dout.shape[0] != N or dout.shape[1] != OC
            or dinp.shape[0] != N or dinp.shape[1] != C or dweight.shape[0] != C
            or dweight.shape[1] != OC or (dbias.shape[0] != 0 and dbias.shape[0] != OC)
            or _blas_sizes_over(N, C, OC)):
        raise ValueError(f"matmul_backward: inp ({N},{C}), weight ({weight.shape[0]},{OC}), "
                         f"dout ({dout.shape[0]},{dout.shape[1]}), dinp ({dinp.shape[0]},"
                         f"{dinp.shape[1]}), dweight ({dweight.shape[0]},{dweight.shape[1]}), "
                         f"dbias ({dbias.shape[0]},), each size < 2^31")
    if N == 0:
        return
    with nogil:
        gemm(False, True, <int>N, <int>C, <int>OC, 1.0, &dout[0, 0], <int>OC, &weight[0, 0],
             <int>OC, 1.0 if accumulate_dinp else 0.0, &dinp[0, 0], <int>C)
        gemm(True, False, <int>C, <int>OC, <int>N, 1.0, &inp[0, 0], <int>C, &dout[0, 0],
             <int>OC, 1.0, &dweight[0, 0], <int>OC)
        if dbias.shape[0] > 0:
            step = ((OC + nt - 1) // nt + 15) // 16 * 16
            nblocks = (OC + step - 1) // step
            for blk in prange(nblocks, num_threads=nt, schedule='static'):
                lo = blk * step
                hi = min(OC, lo + step)
                db = &dbias[0]
                for n in range(N):
                    g = &dout[n, 0]
                    for o in range(lo, hi):
                        db[o] += g[o]


def lm_head_forward(float[:, ::1] logits, const float[:, ::1] inp, wte):
    # logits (N, V) = inp (N, C) @ wte (V, C)^T   (the output head, tied to the embedding or
    # its own lm_head.weight); wte float32, or a PackedWeight of that logical shape
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], K, V
    cdef int wtype, ldw, failed = 0
    cdef bint out_major
    cdef const uint16_t *S
    cdef const void *W = _weight_operand("lm_head_forward", wte, True, &K, &V, &wtype,
                                         &out_major, &ldw, &S)
    if (K != C or logits.shape[0] != N or logits.shape[1] != V
            or _blas_sizes_over(N, C, V)):
        raise ValueError(f"lm_head_forward: shapes ({N},{C}) @ ({V},{K})^T -> "
                         f"({logits.shape[0]},{logits.shape[1]}), each size < 2^31")
    if N == 0 or V == 0:
        return
    with nogil:
        failed = weight_gemm(wtype, out_major, <int>N, <int>V, <int>C,
                             &inp[0, 0] if C > 0 else NULL, <int>C, W, ldw, S, False,
                             &logits[0, 0], <int>V)
    if failed:
        raise MemoryError("lm_head_forward: out of memory for a weight panel")


def lm_head_backward(float[:, ::1] dinp, float[:, ::1] dwte, const float[:, ::1] dlogits,
                     const float[:, ::1] inp, const float[:, ::1] wte):
    # dinp (N, C) = dlogits (N, V) @ wte (V, C);  dwte (V, C) += dlogits^T @ inp
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], V = wte.shape[0]
    if (wte.shape[1] != C or dwte.shape[0] != V or dwte.shape[1] != C or dinp.shape[0] != N
            or dinp.shape[1] != C or dlogits.shape[0] != N or dlogits.shape[1] != V
            or _blas_sizes_over(N, C, V)):
        raise ValueError(f"lm_head_backward: inp ({N},{C}), wte ({V},{wte.shape[1]}), dlogits "
                         f"({dlogits.shape[0]},{dlogits.shape[1]}), dinp ({dinp.shape[0]},"
                         f"{dinp.shape[1]}), dwte ({dwte.shape[0]},{dwte.shape[1]}), each size "
                         f"< 2^31")
    if N == 0 or C == 0:
        return
    with nogil:
        gemm(False, False, <int>N, <int>C, <int>V, 1.0, &dlogits[0, 0], <int>V, &wte[0, 0],
             <int>C, 0.0, &dinp[0, 0], <int>C)
        gemm(True, False, <int>V, <int>C, <int>N, 1.0, &dlogits[0, 0], <int>V, &inp[0, 0],
             <int>C, 1.0, &dwte[0, 0], <int>C)


# --------------------------------------------------------------------------------------------
# Activations by name (Hugging Face's activation_function, see config.ACTIVATION_KERNELS):
# the row kernels are chosen once per call from one table.

ctypedef void (*activation_row_t)(float *out, const float *x, int n) noexcept nogil
ctypedef void (*activation_backward_row_t)(float *dinp, const float *x, const float *dout,
                                           int n) noexcept nogil

_ACTIVATION_KERNELS = ("gelu_tanh", "gelu_erf", "relu", "silu", "quick_gelu")


def activation_kernels():
    """Names of the activation kernels activation_forward/backward accept."""
    return _ACTIVATION_KERNELS


cdef int _activation_index(str kernel, str activation) except -1:
    try:
        return _ACTIVATION_KERNELS.index(activation)
    except ValueError:
        raise ValueError(f"{kernel}: unknown activation kernel {activation!r}; one of "
                         f"{list(_ACTIVATION_KERNELS)}") from None


cdef struct activation_kernel_t:
    activation_row_t forward
    activation_backward_row_t backward


# in the order of _ACTIVATION_KERNELS
cdef activation_kernel_t _activations[5]
_activations[0] = activation_kernel_t(gpt2s_gelu_row, gpt2s_gelu_backward_row)
_activations[1] = activation_kernel_t(gpt2s_gelu_erf_row, gpt2s_gelu_erf_backward_row)
_activations[2] = activation_kernel_t(gpt2s_relu_row, gpt2s_relu_backward_row)
_activations[3] = activation_kernel_t(gpt2s_silu_row, gpt2s_silu_backward_row)
_activations[4] = activation_kernel_t(gpt2s_quick_gelu_row, gpt2s_quick_gelu_backward_row)


def activation_forward(float[:, ::1] out, const float[:, ::1] inp, str activation):
    # out (N, D) = act(inp (N, D)) elementwise; out may be inp.  act: gelu_tanh (gelu_new),
    # gelu_erf = x Phi(x), relu = max(x, 0), silu = x sigmoid(x), quick_gelu = x sigmoid(1.702 x)
    cdef activation_row_t row = _activations[
        _activation_index("activation_forward", activation)].forward
    cdef Py_ssize_t N = inp.shape[0], D = inp.shape[1], n
    if out.shape[0] != N or out.shape[1] != D or _over_int(D):
        raise ValueError(f"activation_forward: out ({out.shape[0]},{out.shape[1]}) and inp "
                         f"({N},{D}): need one shape (N, D) with D < 2^31")
    if N == 0 or D == 0:
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * D), schedule='static'):
        row(&out[n, 0], &inp[n, 0], D)


def activation_backward(float[:, ::1] dinp, const float[:, ::1] inp, const float[:, ::1] dout,
                        str activation):
    # dinp (N, D) = dout * act'(inp), elementwise; dinp may alias dout (docs/backward.md)
    cdef activation_backward_row_t row = _activations[
        _activation_index("activation_backward", activation)].backward
    cdef Py_ssize_t N = inp.shape[0], D = inp.shape[1], n
    if (dinp.shape[0] != N or dinp.shape[1] != D or dout.shape[0] != N
            or dout.shape[1] != D or _over_int(D)):
        raise ValueError(f"activation_backward: dinp ({dinp.shape[0]},{dinp.shape[1]}), inp "
                         f"({N},{D}) and dout ({dout.shape[0]},{dout.shape[1]}): need one shape "
                         f"(N, D) with D < 2^31")
    if N == 0 or D == 0:
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * D), schedule='static'):
        row(&dinp[n, 0], &inp[n, 0], &dout[n, 0], D)


def erf_forward(float[:, ::1] out, const float[:, ::1] inp, bint complement=False):
    # out (N, D) = erf(inp), or erfc(inp) with complement: the float32 erf of the gelu_erf
    # kernel, exported so that its accuracy can be measured against math.erf
    cdef Py_ssize_t N = inp.shape[0], D = inp.shape[1], n
    if out.shape[0] != N or out.shape[1] != D or _over_int(D):
        raise ValueError(f"erf_forward: out ({out.shape[0]},{out.shape[1]}) and inp "
                         f"({N},{D}): need one shape (N, D) with D < 2^31")
    if N == 0 or D == 0:
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * D), schedule='static'):
        if complement:
            gpt2s_erfc_row(&out[n, 0], &inp[n, 0], D)
        else:
            gpt2s_erf_row(&out[n, 0], &inp[n, 0], D)


# --------------------------------------------------------------------------------------------
# Gated linear units (Llama's SwiGLU: act = silu): out = act(gate) * up

def glu_forward(float[:, ::1] out, const float[:, ::1] inp, str activation):
    # out (N, I) = act(inp[:, :I]) * inp[:, I:];  inp (N, 2I) is [gate | up] per row (the
    # output of gate_proj and up_proj as one product); act one of activation_kernels()
    cdef activation_row_t row = _activations[_activation_index("glu_forward", activation)].forward
    cdef Py_ssize_t N = out.shape[0], I = out.shape[1], n
    if inp.shape[0] != N or inp.shape[1] != 2 * I or _over_int(I):
        raise ValueError(f"glu_forward: out {_sh(out)}, inp {_sh(inp)}: need out (N, I) and "
                         f"inp (N, 2I) with I < 2^31")
    if N == 0 or I == 0:
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * I), schedule='static'):
        row(&out[n, 0], &inp[n, 0], I)
        gpt2s_mul_row(&out[n, 0], &out[n, 0], &inp[n, I], I)


def glu_backward(float[:, ::1] dinp, const float[:, ::1] inp, const float[:, ::1] dout,
                 str activation):
    # dinp (N, 2I) is overwritten: [dgate | dup] = [dout * up * act'(gate) | dout * act(gate)];
    # inp (N, 2I) = [gate | up], dout (N, I)
    cdef activation_kernel_t kern = _activations[_activation_index("glu_backward", activation)]
    cdef Py_ssize_t N = dout.shape[0], I = dout.shape[1], n
    if (inp.shape[0] != N or inp.shape[1] != 2 * I or dinp.shape[0] != N
            or dinp.shape[1] != 2 * I or _over_int(I)):
        raise ValueError(f"glu_backward: dinp {_sh(dinp)}, inp {_sh(inp)}, dout {_sh(dout)}: "
                         f"need dout (N, I), dinp and inp (N, 2I) with I < 2^31")
    if N == 0 or I == 0:
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * I), schedule='static'):
        gpt2s_mul_row(&dinp[n, 0], &dout[n, 0], &inp[n, I], I)     # dout * up
        kern.backward(&dinp[n, 0], &inp[n, 0], &dinp[n, 0], I)     # * act'(gate), in place
        kern.forward(&dinp[n, I], &inp[n, 0], I)                   # act(gate)
        gpt2s_mul_row(&dinp[n, I], &dinp[n, I], &dout[n, 0], I)    # * dout


# --------------------------------------------------------------------------------------------
# Rotary position embeddings (Llama, Qwen2, GPT-NeoX), the rotate_half convention
#
# In place on n_heads consecutive heads of head_dim values starting at column col_off of
# each row (q's heads then k's heads of a [q | k | v] row are one run of heads).  The first
# rot_dim = 2 len(inv_freq) values of each head are rotated, the rest pass (GPT-NeoX's
# rotary_pct); row n is at position positions[n].  The angle of pair i is the float32
# product float(pos) * inv_freq[i], as transformers forms it (position ids cast to float32);
# its cos and sin are taken in double and rounded.  inv_freq carries any rope scaling
# (computed once in Python).  One cos/sin table per row, shared by the row's heads.

cdef int _rotary(str kernel, float[:, ::1] x, const int64_t[::1] positions,
                 const float[::1] inv_freq, col_off, n_heads, head_dim, float sign) except -1:
    cdef Py_ssize_t N = x.shape[0], ld = x.shape[1], h = inv_freq.shape[0], n, i, j
    cdef Py_ssize_t off = _int_arg(kernel, "col_off", col_off)
    cdef Py_ssize_t nh = _int_arg(kernel, "n_heads", n_heads)
    cdef Py_ssize_t hd = _int_arg(kernel, "head_dim", head_dim)
    cdef float *cs
    cdef float *sn
    cdef float *row
    cdef float a
    cdef int no_memory = 0
    if (positions.shape[0] != N or hd < 1 or nh < 0 or h > hd // 2 or nh > ld // hd
            or _span_outside(off, nh * hd, ld) or _over_int(hd)):
        raise ValueError(f"{kernel}: x {_sh(x)}, positions {_sh(positions)}, inv_freq "
                         f"{_sh(inv_freq)}, col_off={col_off}, n_heads={n_heads}, "
                         f"head_dim={head_dim}: need positions (N,) for x (N, ld), "
                         f"head_dim >= 1, 2 len(inv_freq) <= head_dim and "
                         f"col_off + n_heads * head_dim <= ld")
    for n in range(N):
        if positions[n] < 0:
            raise ValueError(f"{kernel}: position {positions[n]} at row {n} is negative")
    if N == 0 or nh == 0 or h == 0:
        return 0
    with nogil, parallel(num_threads=threads_for(<double>N * nh * 2 * h)):
        cs = <float *>malloc(sizeof(float) * 2 * h)
        sn = cs + h
        for n in prange(N, schedule='static'):
            if cs == NULL:   # this thread got no table: flag it, raise after the region
                no_memory += 1
                continue
            for i in range(h):
                a = <float>positions[n] * inv_freq[i]
                cs[i] = <float>cos(<double>a)
                sn[i] = sign * <float>sin(<double>a)
            row = &x[n, off]
            for j in range(nh):
                gpt2s_rotary_row(row + j * hd, cs, sn, <int>h)
        free(cs)
    if no_memory:
        raise MemoryError(f"{kernel}: no memory for a thread's cos/sin table of {h} pairs")
    return 0


def rotary_forward(float[:, ::1] x, const int64_t[::1] positions, const float[::1] inv_freq,
                   col_off, n_heads, head_dim):
    # x (N, ld), in place: each of n_heads heads of head_dim at col_off rotated at its row's
    # position; (a, b) = the two halves of the first 2 len(inv_freq) values of a head
    # become (a cos - b sin, b cos + a sin)
    _rotary("rotary_forward", x, positions, inv_freq, col_off, n_heads, head_dim, 1.0)


def rotary_backward(float[:, ::1] dx, const int64_t[::1] positions, const float[::1] inv_freq,
                    col_off, n_heads, head_dim):
    # dx (N, ld), in place: the gradient through rotary_forward (the rotation by -angle)
    _rotary("rotary_backward", dx, positions, inv_freq, col_off, n_heads, head_dim, -1.0)


# --------------------------------------------------------------------------------------------
# Causal self-attention
#
# Per (batch, head), queries in blocks of QBLOCK rows: S = scale Q_blk K^T (QBLOCK x nk) by
# sgemm into a per-thread scratch, masked softmax row by row, then O_blk = P V by sgemm.
# Only the row log-sum-exp (B, NH, Tq) is kept for the backward, which recomputes P: no
# O(T^2) buffer per head, scratch is O(QBLOCK * T) per thread.
#
# q is (B, Tq, ldq) with head h at columns h*HS; k, v are (B, Tkmax, ldk) likewise (the qkv
# buffer with ld 3C in training, the KV cache with ld C in generation).  Query i sits at
# absolute position pos0 + i and sees keys 0 .. pos0 + i.
#
# Grouped-query attention (Llama, Qwen2): n_kv_head key/value heads, each shared by
# G = n_head / n_kv_head consecutive query heads (query head h reads KV head h // G, as
# transformers' repeat_kv); k and v then hold n_kv_head * HS columns (the qkv row is
# [q (C) | k (KVC) | v (KVC)], the KV cache KVC wide).  n_kv_head = n_head is GPT-2's
# multi-head attention, computed exactly as before.

cdef enum:
    QBLOCK = 64


cdef inline void attention_head_forward(float *out, int ldo, float *lse, const float *q,
                                        int ldq, const float *k, const float *v, int ldk,
                                        int Tq, int pos0, int HS, float scale,
                                        float *S) noexcept nogil:
    cdef int i0, nq, nk, i
    cdef float l
    i0 = 0
    while i0 < Tq:
        nq = min(QBLOCK, Tq - i0)
        nk = pos0 + i0 + nq
        # S (nq, nk) = scale * Q_blk (nq, HS) @ K[0:nk]^T
        gemm_serial(False, True, nq, nk, HS, scale, q + <int64_t>i0 * ldq, ldq, k, ldk,
                    0.0, S, nk)
        for i in range(nq):
            l = gpt2s_causal_softmax_row(S + <int64_t>i * nk, pos0 + i0 + i + 1, nk)
            if lse != NULL:
                lse[i0 + i] = l
        # O_blk (nq, HS) = P (nq, nk) @ V[0:nk] (nk, HS)
        gemm_serial(False, False, nq, HS, nk, 1.0, S, nk, v, ldk, 0.0,
                    out + <int64_t>i0 * ldo, ldo)
        i0 = i0 + nq


cdef int _attention_heads(float *out, float *lse, const float *q, int ldq, const float *k,
                         const float *v, int ldk, Py_ssize_t kbs, Py_ssize_t B, Py_ssize_t Tq,
                         Py_ssize_t first, const int64_t *rp, Py_ssize_t NH, Py_ssize_t G,
                         Py_ssize_t HS, float scale) noexcept nogil:
    # attention_forward's work on raw pointers: out (B, Tq, NH HS); lse (B, NH, Tq) or NULL;
    # q (B, Tq, ldq) at its first head; k, v (B, Tkmax, ldk) at their first KV head, kbs
    # floats from one sequence to the next.
    # Returns how many threads got no score scratch (0: done).
    cdef Py_ssize_t C = NH * HS, bh, b, h
    cdef float *S
    cdef int no_memory = 0
    # a few queries (decoding) read the cache once for little arithmetic: count each key and
    # value they read as 4 multiply-adds' worth of work (GPT-2 decoding, 12 layers' caches of
    # 80 positions: one thread 106-117 us a layer, two 80 us)
    with parallel(num_threads=threads_for(<double>B * NH * max(Tq, 4) * (first + Tq) * HS)):
        S = <float *>malloc(sizeof(float) * QBLOCK * (first + Tq))
        for bh in prange(B * NH, schedule='static'):
            if S == NULL:   # this thread got no scratch: flag it, raise after the region
                no_memory += 1
                continue
            b = bh // NH
            h = bh % NH
            attention_head_forward(out + (b * Tq * C + h * HS), <int>C,
                                   (lse + (b * NH + h) * Tq) if lse != NULL else NULL,
                                   q + (b * Tq * ldq + h * HS), ldq,
                                   k + (b * kbs + (h // G) * HS),
                                   v + (b * kbs + (h // G) * HS),
                                   ldk, <int>Tq, <int>(rp[b] if rp != NULL else first),
                                   <int>HS, scale, S)
        free(S)
    return no_memory


def attention_forward(float[:, :, ::1] out, float[:, :, ::1] lse,
                      const float[:, :, ::1] q, q_off, const float[:, :, ::1] k, k_off,
                      const float[:, :, ::1] v, v_off, pos0, n_head, float scale,
                      n_kv_head=None, const int64_t[::1] row_pos=None):
    # out (B, Tq, C); lse (B, NH, Tq) or empty; q (B, Tq, ldq) at column q_off; k, v
    # (B, Tkmax, ldk) at columns k_off, v_off, KVC = n_kv_head * HS wide (n_kv_head: n_head
    # when None), with Tkmax >= pos0 + Tq.  The scores are scale * q.k (GPT-2: scale =
    # 1/sqrt(HS); GPT2Config.attention_scale has the variants).
    # row_pos (B,): per-row first query positions instead of pos0 (ragged batches); row b
    # then reads keys 0 .. row_pos[b] + Tq - 1, exactly as a one-row call with pos0=row_pos[b]
    cdef Py_ssize_t B = out.shape[0], Tq = out.shape[1], C = out.shape[2]
    cdef Py_ssize_t ldq = q.shape[2], ldk = k.shape[2], Tkmax = k.shape[1]
    cdef Py_ssize_t qo = _int_arg("attention_forward", "q_off", q_off)
    cdef Py_ssize_t ko = _int_arg("attention_forward", "k_off", k_off)
    cdef Py_ssize_t vo = _int_arg("attention_forward", "v_off", v_off)
    cdef Py_ssize_t first = _int_arg("attention_forward", "pos0", pos0)
    cdef Py_ssize_t NH = _int_arg("attention_forward", "n_head", n_head)
    cdef Py_ssize_t NKV = NH if n_kv_head is None else _int_arg("attention_forward",
                                                                "n_kv_head", n_kv_head)
    cdef Py_ssize_t HS, KVC = 0, G = 1
    cdef bint keep_lse = lse.shape[0] > 0
    cdef int no_memory = 0
    cdef const int64_t *rp = NULL
    if NH >= 1 and NKV >= 1 and NH % NKV == 0 and C >= NH and C % NH == 0:
        G = NH // NKV
        KVC = C // G
    if (NH < 1 or C < NH or C % NH != 0 or NKV < 1 or NH % NKV != 0 or q.shape[0] != B
            or q.shape[1] != Tq or k.shape[0] < B or v.shape[0] < B
            or _span_outside(qo, C, ldq) or _span_outside(ko, KVC, ldk)
            or _span_outside(vo, KVC, v.shape[2]) or first < 0
            or (keep_lse and (lse.shape[0] != B or lse.shape[1] != NH
                              or lse.shape[2] != Tq))):
        raise ValueError(f"attention_forward: out {_sh(out)}, lse {_sh(lse)}, q {_sh(q)} at "
                         f"column {q_off}, k {_sh(k)} at {k_off}, v {_sh(v)} at {v_off}, "
                         f"pos0={pos0}, n_head={n_head}, n_kv_head={n_kv_head}: need out "
                         f"(B, Tq, C) with C a positive multiple of n_head, n_head a multiple "
                         f"of n_kv_head >= 1, lse (B, n_head, Tq) or empty, q (B, Tq, >= q_off "
                         f"+ C), k and v (B, Tk, >= off + KVC), KVC = C n_kv_head / n_head")
    HS = C // NH
    if row_pos is not None:
        first = _check_row_pos("attention_forward", row_pos, B, Tq, Tkmax)
        if B > 0:
            rp = &row_pos[0]
    if _span_outside(first, Tq, Tkmax) or v.shape[1] != Tkmax or v.shape[2] != ldk:
        raise ValueError(f"attention_forward: key/value buffers too short: k {_sh(k)}, "
                         f"v {_sh(v)} for pos0={pos0} and {Tq} queries (need the same shape "
                         f"with pos0 + Tq <= Tk)")
    if _over_int(ldq) or _over_int(ldk) or _over_int(Tkmax):
        raise ValueError(f"attention_forward: q {_sh(q)}, k {_sh(k)}: sizes beyond 2^31 - 1 "
                         f"(BLAS takes C ints)")
    if B == 0 or Tq == 0:
        return
    with nogil:
        no_memory = _attention_heads(&out[0, 0, 0], &lse[0, 0, 0] if keep_lse else NULL,
                                     &q[0, 0, qo], <int>ldq, &k[0, 0, ko], &v[0, 0, vo],
                                     <int>ldk, Tkmax * ldk, B, Tq, first, rp, NH, G, HS,
                                     scale)
    if no_memory:
        raise MemoryError(f"attention_forward: no memory for a thread's {QBLOCK} x "
                          f"{first + Tq} score scratch")


cdef inline void attention_head_backward(float *dq, float *dk, float *dv, int ldd,
                                         const float *dout, const float *out, int ldo,
                                         const float *lse, const float *q, const float *k,
                                         const float *v, int ld, int T, int HS, float scale,
                                         float *P, float *dP, float *D) noexcept nogil:
    # All of one head, causal from position 0.  dq is overwritten; dk, dv accumulate over the
    # query blocks (they start at zero: the caller zeroes them).
    cdef int i0, nq, nk, i, j, valid
    cdef float l
    cdef float *prow
    cdef float *dprow
    i0 = 0
    while i0 < T:
        nq = min(QBLOCK, T - i0)
        nk = i0 + nq
        for i in range(nq):
            D[i] = gpt2s_dot(out + <int64_t>(i0 + i) * ldo, dout + <int64_t>(i0 + i) * ldo, HS)
        # recompute P = exp(scale Q K^T - lse), masked
        gemm_serial(False, True, nq, nk, HS, scale, q + <int64_t>i0 * ld, ld, k, ld, 0.0, P, nk)
        # dP = dO_blk (nq, HS) @ V^T (HS, nk)
        gemm_serial(False, True, nq, nk, HS, 1.0, dout + <int64_t>i0 * ldo, ldo, v, ld, 0.0,
                    dP, nk)
        for i in range(nq):
            # P = exp(S - lse), and dS = P * (dP - D) stored over dP
            gpt2s_softmax_backward_row(P + <int64_t>i * nk, dP + <int64_t>i * nk, lse[i0 + i],
                                       D[i], i0 + i + 1, nk)
        # dQ_blk = scale dS @ K;  dK += scale dS^T @ Q_blk;  dV += P^T @ dO_blk
        gemm_serial(False, False, nq, HS, nk, scale, dP, nk, k, ld, 0.0,
                    dq + <int64_t>i0 * ldd, ldd)
        gemm_serial(True, False, nk, HS, nq, scale, dP, nk, q + <int64_t>i0 * ld, ld, 1.0,
                    dk, ldd)
        gemm_serial(True, False, nk, HS, nq, 1.0, P, nk, dout + <int64_t>i0 * ldo, ldo, 1.0,
                    dv, ldd)
        i0 = i0 + nq


def attention_backward(float[:, :, ::1] dqkv, const float[:, :, ::1] dout,
                       const float[:, :, ::1] out, const float[:, :, ::1] lse,
                       const float[:, :, ::1] qkv, n_head, float scale, n_kv_head=None):
    # dqkv (B, T, C + 2 KVC) is overwritten; dout, out (B, T, C); lse (B, NH, T); qkv
    # (B, T, C + 2 KVC) = [q | k | v], KVC = n_kv_head * HS (n_kv_head: n_head when None);
    # scale: the forward's score scale.  One task per (batch, KV head): the G query heads
    # sharing a KV head add into its dk, dv one after the other (no race).
    cdef Py_ssize_t B = out.shape[0], T = out.shape[1], C = out.shape[2]
    cdef Py_ssize_t NH = _int_arg("attention_backward", "n_head", n_head)
    cdef Py_ssize_t NKV = NH if n_kv_head is None else _int_arg("attention_backward",
                                                                "n_kv_head", n_kv_head)
    cdef Py_ssize_t HS, KVC = 0, G = 1, W, bh, b, h, t, kh, g
    cdef float *P
    cdef float *dP
    cdef float *D
    cdef int no_memory = 0
    if NH >= 1 and NKV >= 1 and NH % NKV == 0 and C >= NH and C % NH == 0:
        G = NH // NKV
        KVC = C // G
    W = C + 2 * KVC
    if (NH < 1 or C < NH or C % NH != 0 or NKV < 1 or NH % NKV != 0 or dout.shape[0] != B
            or dout.shape[1] != T or dout.shape[2] != C or dqkv.shape[0] != B
            or dqkv.shape[1] != T or dqkv.shape[2] != W or qkv.shape[0] != B
            or qkv.shape[1] != T or qkv.shape[2] != W or lse.shape[0] != B
            or lse.shape[1] != NH or lse.shape[2] != T):
        raise ValueError(f"attention_backward: dqkv {_sh(dqkv)}, dout {_sh(dout)}, out "
                         f"{_sh(out)}, lse {_sh(lse)}, qkv {_sh(qkv)}, n_head={n_head}, "
                         f"n_kv_head={n_kv_head}: need dout like out (B, T, C) with C a "
                         f"positive multiple of n_head, n_head a multiple of n_kv_head >= 1, "
                         f"dqkv and qkv (B, T, C + 2 KVC) with KVC = C n_kv_head / n_head, "
                         f"lse (B, n_head, T)")
    if _over_int(W) or _over_int(T):
        raise ValueError(f"attention_backward: qkv {_sh(qkv)}: sizes beyond 2^31 - 1 (BLAS "
                         f"takes C ints)")
    if B == 0 or T == 0:
        return
    HS = C // NH
    with nogil, parallel(num_threads=threads_for(<double>B * NH * T * T * HS)):
        P = <float *>malloc(sizeof(float) * QBLOCK * T)
        dP = <float *>malloc(sizeof(float) * QBLOCK * T)
        D = <float *>malloc(sizeof(float) * QBLOCK)
        for bh in prange(B * NKV, schedule='static'):
            if P == NULL or dP == NULL or D == NULL:   # flagged, raised after the region
                no_memory += 1
                continue
            b = bh // NKV
            kh = bh % NKV
            for t in range(T):
                memset(&dqkv[b, t, C + kh * HS], 0, HS * sizeof(float))
                memset(&dqkv[b, t, C + KVC + kh * HS], 0, HS * sizeof(float))
            for g in range(G):
                h = kh * G + g
                attention_head_backward(&dqkv[b, 0, h * HS], &dqkv[b, 0, C + kh * HS],
                                        &dqkv[b, 0, C + KVC + kh * HS], <int>W,
                                        &dout[b, 0, h * HS], &out[b, 0, h * HS], <int>C,
                                        &lse[b, h, 0], &qkv[b, 0, h * HS],
                                        &qkv[b, 0, C + kh * HS], &qkv[b, 0, C + KVC + kh * HS],
                                        <int>W, <int>T, <int>HS, scale, P, dP, D)
        free(P)
        free(dP)
        free(D)
    if no_memory:
        raise MemoryError(f"attention_backward: no memory for a thread's 2 x {QBLOCK} x {T} "
                          f"probability scratch")


def kv_cache_write(float[:, :, ::1] kcache, float[:, :, ::1] vcache,
                   const float[:, :, ::1] qkv, pos0, q_width=None,
                   const int64_t[::1] row_pos=None):
    # kcache, vcache (B, n_ctx, KVC)[:, pos0:pos0+T] = k, v parts of qkv (B, T, Q + 2 KVC),
    # the row [q (Q) | k (KVC) | v (KVC)]; Q = q_width, KVC when None (GPT-2: qkv (B, T, 3C)).
    # With grouped-query attention the cache holds the KV heads only.  With row_pos (B,),
    # row b's at row_pos[b] .. row_pos[b] + T - 1 instead (ragged batches).
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], C = kcache.shape[2], b, t, f
    cdef Py_ssize_t first = _int_arg("kv_cache_write", "pos0", pos0)
    cdef Py_ssize_t Q = C if q_width is None else _int_arg("kv_cache_write", "q_width",
                                                           q_width)
    cdef const int64_t *rp = NULL
    if row_pos is not None:
        first = _check_row_pos("kv_cache_write", row_pos, B, T, kcache.shape[1])
        if B > 0:
            rp = &row_pos[0]
    if (vcache.shape[0] != kcache.shape[0] or vcache.shape[1] != kcache.shape[1]
            or vcache.shape[2] != C or Q < 0 or Q > qkv.shape[2] or qkv.shape[2] - Q != 2 * C
            or B > kcache.shape[0] or _span_outside(first, T, kcache.shape[1])):
        raise ValueError(f"kv_cache_write: kcache {_sh(kcache)}, vcache {_sh(vcache)}, qkv "
                         f"{_sh(qkv)}, pos0={pos0}, q_width={q_width}: need kcache, vcache "
                         f"(>= B, n_ctx, KVC), qkv (B, T, Q + 2 KVC) with Q = q_width (KVC "
                         f"when None) and 0 <= pos0, pos0 + T <= n_ctx")
    if B == 0 or T == 0 or C == 0:
        return
    with nogil:
        for b in range(B):
            f = rp[b] if rp != NULL else first
            for t in range(T):
                memcpy(&kcache[b, f + t, 0], &qkv[b, t, Q], C * sizeof(float))
                memcpy(&vcache[b, f + t, 0], &qkv[b, t, Q + C], C * sizeof(float))


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy, fused

def crossentropy_forward(float[::1] losses, float[::1] lse, const float[:, ::1] logits,
                         const int64_t[::1] targets):
    # losses (N,) = lse - logits[n, target]; 0 where target == -1.  lse (N,) kept for backward.
    cdef Py_ssize_t N = logits.shape[0], V = logits.shape[1], n
    cdef float l
    if (losses.shape[0] != N or lse.shape[0] != N or targets.shape[0] != N or V < 1
            or _over_int(V)):
        raise ValueError(f"crossentropy_forward: losses {_sh(losses)}, lse {_sh(lse)}, logits "
                         f"{_sh(logits)}, targets {_sh(targets)}: need losses, lse, targets (N,) "
                         f"for logits (N, V) with 1 <= V < 2^31")
    n = _first_outside(targets, -1, V)
    if n >= 0:
        raise ValueError(f"crossentropy_forward: target {targets[n]} at {n} is outside "
                         f"[0, {V}) and not the ignore value -1")
    if N == 0:
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * V), schedule='static'):
        l = gpt2s_logsumexp_row(&logits[n, 0], <int>V)
        lse[n] = l
        if targets[n] < 0:
            losses[n] = 0.0
        else:
            losses[n] = l - logits[n, targets[n]]


def crossentropy_backward(float[:, ::1] dlogits, const float[:, ::1] logits,
                          const float[::1] lse, const int64_t[::1] targets, float dloss):
    # dlogits (N, V) = dloss * (softmax(logits) - onehot(target)); zero rows where target == -1.
    # dlogits may be logits itself (in place).
    cdef Py_ssize_t N = logits.shape[0], V = logits.shape[1], n
    cdef float *d
    if (dlogits.shape[0] != N or dlogits.shape[1] != V or lse.shape[0] != N
            or targets.shape[0] != N or V < 1 or _over_int(V)):
        raise ValueError(f"crossentropy_backward: dlogits {_sh(dlogits)}, logits "
                         f"{_sh(logits)}, lse {_sh(lse)}, targets {_sh(targets)}: need dlogits "
                         f"like logits (N, V) with 1 <= V < 2^31, lse and targets (N,)")
    n = _first_outside(targets, -1, V)
    if n >= 0:
        raise ValueError(f"crossentropy_backward: target {targets[n]} at {n} is outside "
                         f"[0, {V}) and not the ignore value -1")
    if N == 0:
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * V), schedule='static'):
        d = &dlogits[n, 0]
        if targets[n] < 0:
            memset(d, 0, V * sizeof(float))
            continue
        gpt2s_scaled_softmax_row(d, &logits[n, 0], lse[n], dloss, <int>V)
        d[targets[n]] -= dloss


# --------------------------------------------------------------------------------------------
# Whole-buffer helpers

def fill_zero(float[::1] buf):
    cdef Py_ssize_t n = buf.shape[0], i, lo, hi, step
    cdef int nt = threads_for(n), k
    if n == 0:
        return
    step = (n + nt - 1) // nt
    for k in prange(nt, nogil=True, num_threads=nt, schedule='static'):
        lo = k * step
        hi = min(n, lo + step)
        if hi > lo:
            memset(&buf[lo], 0, (hi - lo) * sizeof(float))


def sum_squares(const float[::1] buf):
    """Sum of squares of a float32 buffer: float32 partial sums per 4096-element block, added
    in double across blocks so a 124M-element sum keeps its precision."""
    cdef Py_ssize_t n = buf.shape[0], nb = (n + 4095) // 4096, blk, i, lo, hi
    cdef double total = 0.0
    cdef float part
    for blk in prange(nb, nogil=True, num_threads=threads_for(n), schedule='static'):
        lo = blk * 4096
        hi = min(n, lo + 4096)
        part = gpt2s_dot(&buf[lo], &buf[lo], <int>(hi - lo))
        total += part
    return total


cdef void adamw_segment(float *pp, const float *pg, float *pm, float *pv, Py_ssize_t lo,
                        Py_ssize_t hi, float shrink, float beta1, float beta2, float eps,
                        float step_size, float inv_sqrt_bc2, float grad_scale,
                        int nt) noexcept nogil:
    cdef Py_ssize_t i
    cdef float g, mi, vi
    for i in prange(lo, hi, num_threads=nt, schedule='static'):
        g = pg[i] * grad_scale
        mi = beta1 * pm[i] + (<float>1.0 - beta1) * g
        vi = beta2 * pv[i] + (<float>1.0 - beta2) * g * g
        pm[i] = mi
        pv[i] = vi
        pp[i] = pp[i] * shrink - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps)


def adamw_step(float[::1] params, const float[::1] grads, float[::1] m, float[::1] v,
               const int64_t[::1] seg_start, const int64_t[::1] seg_stop,
               const float[::1] seg_decay, float lr, double beta1, double beta2, float eps,
               step, float grad_scale, bf16_out=None):
    """One fused AdamW pass over the parameter segments, in torch.optim.AdamW's order:
    p *= 1 - lr * wd;  m, v updated;  p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
    Segment s covers params[seg_start[s]:seg_stop[s]] with weight decay seg_decay[s];
    grad_scale multiplies every gradient (gradient-norm clipping); step >= 1 counts the
    updates, this one included (the bias corrections divide by 1 - beta^step).  bf16_out (a
    uint16 vector like params, or None): the bfloat16 copies of the new parameters are
    written there in the same pass (compute_dtype="bfloat16")."""
    cdef Py_ssize_t nseg = seg_start.shape[0], s
    cdef uint16_t[::1] mirror
    cdef uint16_t *po = NULL
    cdef Py_ssize_t t = _int_arg("adamw_step", "step", step)
    cdef double bc1, bc2
    cdef float step_size, inv_sqrt_bc2
    if t < 1:
        raise ValueError(f"adamw_step: step must be >= 1 (the bias corrections divide by "
                         f"1 - beta^step), got {step}")
    if grads.shape[0] != params.shape[0] or m.shape[0] != params.shape[0] \
            or v.shape[0] != params.shape[0]:
        raise ValueError("adamw_step: params, grads and state differ in length")
    if seg_stop.shape[0] != nseg or seg_decay.shape[0] != nseg:
        raise ValueError("adamw_step: segment arrays differ in length")
    for s in range(nseg):
        if seg_start[s] < 0 or seg_stop[s] > params.shape[0] or seg_start[s] > seg_stop[s]:
            raise ValueError(f"adamw_step: segment {s} out of range")
    # bias corrections in double from the exact betas, as torch computes them in Python floats
    bc1 = 1.0 - beta1 ** <double>t
    bc2 = 1.0 - beta2 ** <double>t
    step_size = <float>(lr / bc1)
    inv_sqrt_bc2 = <float>(1.0 / sqrt(bc2))
    if params.shape[0] == 0:
        return
    if bf16_out is not None:
        mirror = bf16_out
        if mirror.shape[0] != params.shape[0]:
            raise ValueError(f"adamw_step: bf16_out ({mirror.shape[0]},) for params "
                             f"({params.shape[0]},)")
        po = &mirror[0]
    with nogil:
        for s in range(nseg):
            if po != NULL:
                adamw_segment_bf16(&params[0], &grads[0], &m[0], &v[0], po, seg_start[s],
                                   seg_stop[s], <float>1.0 - lr * seg_decay[s], beta1, beta2,
                                   eps, step_size, inv_sqrt_bc2, grad_scale,
                                   threads_for(seg_stop[s] - seg_start[s]))
                continue
            adamw_segment(&params[0], &grads[0], &m[0], &v[0], seg_start[s], seg_stop[s],
                          <float>1.0 - lr * seg_decay[s], beta1, beta2, eps, step_size,
                          inv_sqrt_bc2, grad_scale,
                          threads_for(seg_stop[s] - seg_start[s]))


def scale_inplace(float[::1] buf, float factor):
    cdef Py_ssize_t n = buf.shape[0], i
    cdef float *p
    if n == 0:
        return
    p = &buf[0]
    for i in prange(n, nogil=True, num_threads=threads_for(n), schedule='static'):
        p[i] = p[i] * factor


# --------------------------------------------------------------------------------------------
# A Llama decoder's blocks for inference, all in one call (LlamaForCausalLM's forward without
# the backward's activations, and its KV-cache forward).  The same kernels in the same order
# as the per-kernel calls of its training forward (each result bit for bit the same), without
# a Python round trip per kernel: decoding one token of a 30-block model made ~330 kernel
# calls, ~3-5 us of argument handling each, plus the Python between them.

cdef struct _wref:
    # a stored weight (out, in) read as an output head (y = x W^T), from _weight_operand
    const void *ptr
    const uint16_t *scales
    int wtype
    int ldw
    bint out_major


cdef struct _plan_layer:
    const float *ln1
    const float *ln2
    const float *ln1_b   # the LayerNorm biases (norm "layernorm"); NULL for RMSNorm
    const float *ln2_b
    _wref qkv
    _wref o
    _wref gu
    _wref down
    const float *qkv_b   # NULL: no bias
    const float *o_b
    const float *gu_b
    const float *down_b


cdef inline void _add_bias_rows(float *y, const float *bias, Py_ssize_t N,
                                Py_ssize_t n) noexcept nogil:
    # y (N, n) += bias (n,), row by row (NumPy's y += bias, the same float adds)
    cdef Py_ssize_t r, j
    cdef float *row
    if bias == NULL:
        return
    for r in range(N):
        row = y + r * n
        for j in range(n):
            row[j] = row[j] + bias[j]


cdef inline void _plan_norm_row(float *out, const float *x, const float *w, const float *b,
                                int H, float eps, bint layernorm) noexcept nogil:
    # the block's norm of one row: LayerNorm (weight w, bias b) or RMSNorm (weight w)
    if layernorm:
        gpt2s_layernorm_row(out, NULL, NULL, x, w, b, H, eps)
    else:
        gpt2s_rmsnorm_row(out, NULL, x, w, H, eps)


cdef class LlamaPlan:
    """The blocks of a Llama model (RMSNorm, rotary embeddings, grouped-query attention,
    gated MLP, sequential residual) for inference in one call: `forward` runs every block on a
    residual stream in place.  Built once per set of weights (LlamaForCausalLM rebuilds it when
    its store's parameters are replaced); it holds the weights it reads.

    Args:
        layers: per block, the tuple (input_layernorm weight, [q|k|v] weight, its bias or
            None, o_proj weight, its bias or None, post_attention_layernorm weight,
            [gate|up] weight, its bias or None, down_proj weight, its bias or None); each
            weight float32 (out, in) or a PackedWeight of that logical shape.
        hidden, n_head, n_kv_head, head_dim, intermediate: the sizes.
        eps: the RMSNorm epsilon; scale: the attention score scale; activation: the gate's
            activation kernel (activation_kernels()).
        norm: "rmsnorm", or "layernorm": then each layer's tuple carries two more entries,
            the input_layernorm bias and the post_attention_layernorm bias (GPT-NeoX).
        parallel_residual: the parallel residual x + attn(ln1 x) + mlp(ln2 x), summed as
            (mlp + attn) + x (GPT-NeoX), instead of the sequential one.
        gated: the MLP is act(gate) * up over the [gate|up] product (2 intermediate rows);
            False: act(up) over an (intermediate, hidden) up product.
        interleaved: the q|k|v product's rows are per head [n_head, 3, head_dim] (GPT-NeoX's
            query_key_value; needs n_kv_head == n_head): each row is put back into
            [q | k | v] after its bias, before the rotary embedding.
    """

    cdef _plan_layer *layers
    cdef object refs
    cdef readonly int n_layer, hidden, n_head, n_kv_head, head_dim, intermediate
    cdef float eps, scale
    cdef activation_row_t act
    cdef readonly bint layernorm, parallel_residual, gated, interleaved

    def __cinit__(self):
        self.layers = NULL

    def __dealloc__(self):
        free(self.layers)

    def __init__(self, layers, hidden, n_head, n_kv_head, head_dim, intermediate, float eps,
                 float scale, str activation, *, str norm="rmsnorm", bint parallel_residual=False,
                 bint gated=True, bint interleaved=False):
        cdef Py_ssize_t L = len(layers), l
        cdef Py_ssize_t H = _int_arg("LlamaPlan", "hidden", hidden)
        cdef Py_ssize_t NH = _int_arg("LlamaPlan", "n_head", n_head)
        cdef Py_ssize_t NKV = _int_arg("LlamaPlan", "n_kv_head", n_kv_head)
        cdef Py_ssize_t HD = _int_arg("LlamaPlan", "head_dim", head_dim)
        cdef Py_ssize_t I = _int_arg("LlamaPlan", "intermediate", intermediate)
        cdef Py_ssize_t Q, KV, U
        if (H < 1 or NH < 1 or NKV < 1 or NH % NKV != 0 or HD < 1 or I < 1 or L < 1
                or _blas_sizes_over(H, NH * HD * 3, 2 * I)):
            raise ValueError(f"LlamaPlan: hidden={hidden}, n_head={n_head}, "
                             f"n_kv_head={n_kv_head}, head_dim={head_dim}, "
                             f"intermediate={intermediate}, {L} layers: need positive sizes, "
                             f"n_head a multiple of n_kv_head, at least one layer")
        if norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"LlamaPlan: norm {norm!r}: need 'rmsnorm' or 'layernorm'")
        if interleaved and NKV != NH:
            raise ValueError(f"LlamaPlan: interleaved q|k|v rows need n_kv_head == n_head, got "
                             f"{n_kv_head} and {n_head}")
        self.layernorm, self.parallel_residual = norm == "layernorm", parallel_residual
        self.gated, self.interleaved = gated, interleaved
        Q, KV = NH * HD, NKV * HD
        self.act = _activations[_activation_index("LlamaPlan", activation)].forward
        self.n_layer, self.hidden, self.n_head, self.n_kv_head = L, H, NH, NKV
        self.head_dim, self.intermediate, self.eps, self.scale = HD, I, eps, scale
        self.refs = []
        self.layers = <_plan_layer *>malloc(sizeof(_plan_layer) * L)
        if self.layers == NULL:
            raise MemoryError("LlamaPlan: no memory for the layer table")
        U = 2 * I if gated else I
        for l in range(L):
            entry = tuple(layers[l])
            if len(entry) != (12 if self.layernorm else 10):
                raise ValueError(f"LlamaPlan: layer {l}: {len(entry)} entries, need "
                                 f"{12 if self.layernorm else 10} (norm {norm!r})")
            ln1, qkv, qkv_b, o, o_b, ln2, gu, gu_b, down, down_b = entry[:10]
            self.layers[l].ln1_b = NULL
            self.layers[l].ln2_b = NULL
            self.layers[l].qkv_b = NULL
            self.layers[l].o_b = NULL
            self.layers[l].gu_b = NULL
            self.layers[l].down_b = NULL
            self.layers[l].ln1 = self._vector(ln1, H, l, "input_layernorm weight")
            self.layers[l].ln2 = self._vector(ln2, H, l, "post_attention_layernorm weight")
            if self.layernorm:
                if entry[10] is None or entry[11] is None:
                    raise ValueError(f"LlamaPlan: layer {l}: norm 'layernorm' needs both "
                                     f"norm biases")
                self.layers[l].ln1_b = self._vector(entry[10], H, l, "input_layernorm bias")
                self.layers[l].ln2_b = self._vector(entry[11], H, l,
                                                    "post_attention_layernorm bias")
            self._weight(&self.layers[l].qkv, qkv, Q + 2 * KV, H, l, "q|k|v weight")
            self._weight(&self.layers[l].o, o, H, Q, l, "o_proj weight")
            self._weight(&self.layers[l].gu, gu, U, H, l, "gate|up weight")
            self._weight(&self.layers[l].down, down, H, I, l, "down_proj weight")
            self.layers[l].qkv_b = self._vector(qkv_b, Q + 2 * KV, l, "q|k|v bias")
            self.layers[l].o_b = self._vector(o_b, H, l, "o_proj bias")
            self.layers[l].gu_b = self._vector(gu_b, U, l, "gate|up bias")
            self.layers[l].down_b = self._vector(down_b, H, l, "down_proj bias")

    cdef const float *_vector(self, v, Py_ssize_t n, Py_ssize_t l, str what) except? NULL:
        cdef const float[::1] a
        if v is None:
            return NULL
        a = v
        if a.shape[0] != n:
            raise ValueError(f"LlamaPlan: layer {l}: {what} of shape {_sh(a)}, need ({n},)")
        self.refs.append(v)
        return &a[0]

    cdef int _weight(self, _wref *r, w, Py_ssize_t n_out, Py_ssize_t n_in, Py_ssize_t l,
                     str what) except -1:
        cdef Py_ssize_t K = 0, N = 0
        r.ptr = _weight_operand("LlamaPlan", w, True, &K, &N, &r.wtype, &r.out_major, &r.ldw,
                                &r.scales)
        if K != n_in or N != n_out or r.ptr == NULL:
            raise ValueError(f"LlamaPlan: layer {l}: {what} of logical shape ({N}, {K}), need "
                             f"({n_out}, {n_in})")
        self.refs.append(w)
        return 0

    def work_size(self, n_rows):
        """Floats of the work buffer `forward` needs for n_rows rows."""
        cdef Py_ssize_t N = _int_arg("LlamaPlan.work_size", "n_rows", n_rows)
        cdef Py_ssize_t H = self.hidden, Q = self.n_head * self.head_dim
        cdef Py_ssize_t W = Q + 2 * self.n_kv_head * self.head_dim
        return N * (3 * H + W + Q + 3 * self.intermediate + self.head_dim
                    + (W if self.interleaved else 0))

    def forward(self, float[:, ::1] x, B, const int64_t[::1] positions,
                const float[::1] inv_freq, float[::1] work, float[:, :, :, :] keys=None,
                float[:, :, :, :] values=None, pos0=0):
        """Every block on the residual stream x (B T, hidden), in place: x becomes the last
        block's output.  Rows are B sequences of T positions; row n is rotated at
        positions[n].  Without keys/values, attention is causal within each sequence (from
        position 0); with them (the KV cache, (n_layer, >= B, capacity, n_kv_head head_dim)),
        the rows sit at positions pos0 .. pos0 + T - 1: their keys and values are written to
        the cache and attention reads positions 0 .. pos0 + T - 1 from it.  work: at least
        work_size(B T) floats."""
        cdef Py_ssize_t N = x.shape[0], H = self.hidden, nb = _int_arg("LlamaPlan.forward",
                                                                      "B", B)
        cdef Py_ssize_t first = _int_arg("LlamaPlan.forward", "pos0", pos0)
        cdef Py_ssize_t NH = self.n_head, NKV = self.n_kv_head, HD = self.head_dim
        cdef Py_ssize_t I = self.intermediate, Q = NH * HD, KV = NKV * HD, W = Q + 2 * KV
        cdef Py_ssize_t U = 2 * I if self.gated else I, h = inv_freq.shape[0], T, n, i, l, j
        cdef Py_ssize_t c, s, cap = 0
        cdef Py_ssize_t kbs = 0
        cdef float *ln
        cdef float *qkv
        cdef float *atty
        cdef float *proj
        cdef float *res2
        cdef float *gu
        cdef float *hid
        cdef float *tab
        cdef float *raw
        cdef float *qkv_out
        cdef bint lnorm = self.layernorm, par = self.parallel_residual, inter = self.interleaved
        cdef float *kc
        cdef float *vc
        cdef float *r
        cdef const float *a
        cdef const float *bb
        cdef float ang
        cdef const _plan_layer *P
        cdef bint cached = keys is not None
        cdef int failed = 0, nt
        if (nb < 1 or x.shape[1] != H or N % nb != 0 or positions.shape[0] != N
                or 2 * h > HD or work.shape[0] < self.work_size(N)):
            raise ValueError(f"LlamaPlan.forward: x {_sh(x)}, B={B}, positions "
                             f"{_sh(positions)}, inv_freq {_sh(inv_freq)}, work {_sh(work)}: "
                             f"need x (B T, {H}), positions (B T,), 2 len(inv_freq) <= "
                             f"{HD}, work of >= work_size(B T) floats")
        T = N // nb
        for n in range(N):
            if positions[n] < 0:
                raise ValueError(f"LlamaPlan.forward: position {positions[n]} at row {n} is "
                                 f"negative")
        if cached:
            if (values is None or keys.shape[0] != self.n_layer or keys.shape[1] < nb
                    or keys.shape[3] != KV or values.shape[0] != keys.shape[0]
                    or values.shape[1] != keys.shape[1] or values.shape[2] != keys.shape[2]
                    or values.shape[3] != KV or keys.strides[3] != 4 or values.strides[3] != 4
                    or keys.strides[2] != 4 * KV or values.strides[2] != 4 * KV
                    or keys.strides[1] != values.strides[1] or keys.strides[1] % 4 != 0
                    or _span_outside(first, T, keys.shape[2]) or _over_int(keys.shape[2])):
                raise ValueError(f"LlamaPlan.forward: keys {_sh(keys)}, values "
                                 f"{_sh(values) if values is not None else None}, B={B}, "
                                 f"T={T}, pos0={pos0}: need two caches ({self.n_layer}, >= B, "
                                 f"capacity, {KV}), each position's row contiguous, with "
                                 f"pos0 + T <= capacity")
            cap = keys.shape[2]
            kbs = keys.strides[1] // 4   # floats from one sequence's cache to the next
        if N == 0:
            return
        ln = &work[0]
        qkv = ln + N * H
        atty = qkv + N * W
        proj = atty + N * Q
        res2 = proj + N * H
        gu = res2 + N * H
        hid = gu + N * U
        tab = hid + N * I   # (N, 2h): cos | sin of each row's angles, shared by the blocks
        raw = tab + N * HD   # (interleaved) the per-head q|k|v product, before its reorder
        qkv_out = raw if inter else qkv
        with nogil:
            for n in range(N):
                for i in range(h):
                    ang = <float>positions[n] * inv_freq[i]
                    tab[n * 2 * h + i] = <float>cos(<double>ang)
                    tab[n * 2 * h + h + i] = <float>sin(<double>ang)
            for l in range(self.n_layer):
                P = &self.layers[l]
                # ln = rmsnorm(x); from the second block on x = res2 + proj first
                # (parallel residual: x is the previous block's output already)
                nt = threads_for(N * H)
                if l == 0 or par:
                    for n in prange(N, num_threads=nt, schedule='static'):
                        _plan_norm_row(ln + n * H, &x[n, 0], P.ln1, P.ln1_b, <int>H, self.eps,
                                       lnorm)
                else:
                    for n in prange(N, num_threads=nt, schedule='static'):
                        r = &x[n, 0]
                        a = res2 + n * H
                        bb = proj + n * H
                        for c in range(H):
                            r[c] = a[c] + bb[c]
                        _plan_norm_row(ln + n * H, r, P.ln1, P.ln1_b, <int>H, self.eps, lnorm)
                # qkv = ln @ [q|k|v]^T (+ bias), rotated
                failed = failed + weight_gemm(P.qkv.wtype, P.qkv.out_major, <int>N, <int>W,
                                              <int>H, ln, <int>H, P.qkv.ptr, P.qkv.ldw,
                                              P.qkv.scales, False, qkv_out, <int>W)
                _add_bias_rows(qkv_out, P.qkv_b, N, W)
                if inter:   # per head [q_h | k_h | v_h] -> [q | k | v]
                    for n in range(N):
                        for j in range(NH):
                            for s in range(3):
                                memcpy(qkv + n * W + s * Q + j * HD,
                                       raw + n * W + (3 * j + s) * HD, HD * sizeof(float))
                if h > 0:
                    for n in prange(N, num_threads=threads_for(<double>N * (NH + NKV) * 2 * h),
                                    schedule='static'):
                        for j in range(NH + NKV):
                            gpt2s_rotary_row(qkv + n * W + j * HD, tab + n * 2 * h,
                                             tab + n * 2 * h + h, <int>h)
                # attention
                if cached:
                    kc = &keys[l, 0, 0, 0]
                    vc = &values[l, 0, 0, 0]
                    for n in range(N):   # row n: sequence n // T, position pos0 + n % T
                        memcpy(kc + (n // T) * kbs + (first + n % T) * KV,
                               qkv + n * W + Q, KV * sizeof(float))
                        memcpy(vc + (n // T) * kbs + (first + n % T) * KV,
                               qkv + n * W + Q + KV, KV * sizeof(float))
                    failed = failed + _attention_heads(atty, NULL, qkv, <int>W, kc, vc,
                                                       <int>KV, kbs, nb, T, first, NULL, NH,
                                                       NH // NKV, HD, self.scale)
                else:
                    failed = failed + _attention_heads(atty, NULL, qkv, <int>W, qkv + Q,
                                                       qkv + Q + KV, <int>W, T * W, nb, T, 0,
                                                       NULL, NH, NH // NKV, HD, self.scale)
                # proj = atty @ o^T (+ bias); res2 = x + proj, ln = rmsnorm(res2)
                failed = failed + weight_gemm(P.o.wtype, P.o.out_major, <int>N, <int>H,
                                              <int>Q, atty, <int>Q, P.o.ptr, P.o.ldw,
                                              P.o.scales, False, proj, <int>H)
                _add_bias_rows(proj, P.o_b, N, H)
                if par:   # ln = norm2(x)
                    for n in prange(N, num_threads=nt, schedule='static'):
                        _plan_norm_row(ln + n * H, &x[n, 0], P.ln2, P.ln2_b, <int>H, self.eps,
                                       lnorm)
                else:
                    for n in prange(N, num_threads=nt, schedule='static'):
                        r = res2 + n * H
                        a = &x[n, 0]
                        bb = proj + n * H
                        for c in range(H):
                            r[c] = a[c] + bb[c]
                        _plan_norm_row(ln + n * H, r, P.ln2, P.ln2_b, <int>H, self.eps, lnorm)
                # the MLP: hid = act(gate) * up, proj = hid @ down^T (+ bias)
                failed = failed + weight_gemm(P.gu.wtype, P.gu.out_major, <int>N, <int>U,
                                              <int>H, ln, <int>H, P.gu.ptr, P.gu.ldw,
                                              P.gu.scales, False, gu, <int>U)
                _add_bias_rows(gu, P.gu_b, N, U)
                for n in prange(N, num_threads=threads_for(N * I), schedule='static'):
                    self.act(hid + n * I, gu + n * U, <int>I)
                    if self.gated:
                        gpt2s_mul_row(hid + n * I, hid + n * I, gu + n * U + I, <int>I)
                if par:   # mlp (in res2) = hid @ down^T (+ bias); x = (mlp + proj) + x
                    failed = failed + weight_gemm(P.down.wtype, P.down.out_major, <int>N,
                                                  <int>H, <int>I, hid, <int>I, P.down.ptr,
                                                  P.down.ldw, P.down.scales, False, res2,
                                                  <int>H)
                    _add_bias_rows(res2, P.down_b, N, H)
                    for n in prange(N, num_threads=nt, schedule='static'):
                        r = &x[n, 0]
                        a = res2 + n * H
                        bb = proj + n * H
                        for c in range(H):
                            r[c] = (a[c] + bb[c]) + r[c]
                else:
                    failed = failed + weight_gemm(P.down.wtype, P.down.out_major, <int>N,
                                                  <int>H, <int>I, hid, <int>I, P.down.ptr,
                                                  P.down.ldw, P.down.scales, False, proj,
                                                  <int>H)
                    _add_bias_rows(proj, P.down_b, N, H)
            # x = res2 + proj: the last block's output (parallel residual: x is it already)
            if not par:
                for n in prange(N, num_threads=threads_for(N * H), schedule='static'):
                    r = &x[n, 0]
                    a = res2 + n * H
                    bb = proj + n * H
                    for c in range(H):
                        r[c] = a[c] + bb[c]
        if failed:
            raise MemoryError("LlamaPlan.forward: out of memory for a thread's scratch "
                              "(a weight panel or attention scores)")


# --------------------------------------------------------------------------------------------
# Sampling (greedy, temperature, top-k, top-p) lives in its own file, compiled into _core.

include "kernels/sampling.pxi"
