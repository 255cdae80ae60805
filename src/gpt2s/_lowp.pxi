# Low-precision weights for inference (issue 11): bfloat16 and int8 blocks, included into
# _core.pyx.  The C lives in _lowp.h (storage formats, why the int8 weight is stored [N][K],
# the kernels); this file is the glue: the run-time choice of kernels, the split over output
# columns inside our one OpenMP team, the panel route to the float32 gemm, and the shape checks.
#
# A product C (M, N) (+)= A (M, K) @ W runs, on each thread's block of output columns:
#   - with AVX2 and M <= the direct-rows limit (32, decoding): the direct kernels, which read
#     each compressed weight once into registers for all M rows;
#   - otherwise (prefill, or the portable path on any CPU): panels of ~1 MiB of W widened to
#     float32 in a per-thread buffer (AVX2 or portable C loops), each handed to gemm_serial
#     (sgemm / sgemv / the few-row kernels).  No full-size float32 copy exists at any time.

from libc.stdint cimport uint16_t, int8_t

cdef extern from "_lowp.h":
    int GPT2S_Q8_BLOCK
    int GPT2S_LOWP_HAVE_AVX2
    int gpt2s_lowp_avx2_ok() noexcept nogil
    void gpt2s_bf16_from_f32_n(uint16_t *out, const float *x, int64_t n) noexcept nogil
    void gpt2s_bf16_to_f32_n(float *out, const uint16_t *x, int64_t n) noexcept nogil
    int gpt2s_q8_quantize(int8_t *q, uint16_t *scales, const float *w, int64_t N, int64_t K,
                          int64_t sn, int64_t sk) noexcept nogil
    void gpt2s_q8_to_f32_rows(float *out, int64_t ldo, const int8_t *q, const uint16_t *scales,
                              int rows, int K) noexcept nogil
    void gpt2s_bf16_to_f32_panel(float *out, int64_t ldo, const uint16_t *w, int64_t ldw,
                                 int rows, int cols) noexcept nogil
    void gpt2s_q8_to_f32_rows_arch_x86_64_v3(float *out, int64_t ldo, const int8_t *q,
                                             const uint16_t *scales, int rows, int K) noexcept nogil
    void gpt2s_bf16_to_f32_panel_arch_x86_64_v3(float *out, int64_t ldo, const uint16_t *w,
                                                int64_t ldw, int rows, int cols) noexcept nogil
    void gpt2s_bf16_nn_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
                                      const uint16_t *W, int ldw, int accumulate, float *C,
                                      int ldc) noexcept nogil
    void gpt2s_bf16_nt_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
                                      const uint16_t *W, int ldw, int accumulate, float *C,
                                      int ldc) noexcept nogil
    void gpt2s_q8_nt_arch_x86_64_v3(int M, int n, int K, const float *A, int lda,
                                    const int8_t *Q, const uint16_t *S, int accumulate, float *C,
                                    int ldc) noexcept nogil


cdef enum:
    LOWP_PORTABLE = 0   # portable C widening + the float32 gemm (any CPU)
    LOWP_AVX2 = 1       # AVX2 + FMA + F16C direct kernels and widening
    LOWP_AVX512 = 2     # reserved: AVX512_BF16 / VNNI kernels are not written yet (no CPU to test)

cdef enum:
    LOWP_BF16_NN = 0    # W bf16 (K, N): Conv1D
    LOWP_BF16_NT = 1    # W bf16 (N, K): lm_head
    LOWP_Q8_NT = 2      # W int8 (N, K) + fp16 scales (N, K / 32): every int8 weight

LOWP_PATH_NAMES = ("portable", "avx2", "avx512")

cdef int _lowp_path = LOWP_AVX2 if gpt2s_lowp_avx2_ok() else LOWP_PORTABLE
cdef int _lowp_direct_max = 32            # most rows the direct kernels take
cdef int64_t LOWP_PANEL_BYTES = 1 << 20   # float32 panel per thread on the panel route
cdef bint _lowp_split_k = True             # one-row bf16 NN products split K over the team


def have_lowp_avx2():
    """True when this CPU and build have the AVX2 + FMA + F16C low-precision kernels."""
    return bool(gpt2s_lowp_avx2_ok())


def get_lowp_kernels():
    """The low-precision kernel path in use: "avx2" or "portable"."""
    return LOWP_PATH_NAMES[_lowp_path]


def set_lowp_kernels(str path):
    """Force the low-precision kernel path ("avx2", "portable", or "auto": the best this CPU
    has); returns the previous path.  For tests and benchmarks."""
    global _lowp_path
    previous = LOWP_PATH_NAMES[_lowp_path]
    if path == "auto":
        _lowp_path = LOWP_AVX2 if gpt2s_lowp_avx2_ok() else LOWP_PORTABLE
    elif path == "portable":
        _lowp_path = LOWP_PORTABLE
    elif path == "avx2":
        if not gpt2s_lowp_avx2_ok():
            raise ValueError("low-precision kernels 'avx2': this CPU or build lacks AVX2 + FMA + F16C")
        _lowp_path = LOWP_AVX2
    elif path == "avx512":
        raise ValueError("low-precision kernels 'avx512': not built (no AVX-512 kernels yet)")
    else:
        raise ValueError(f"low-precision kernels must be 'auto', 'avx2' or 'portable', got {path!r}")
    return previous


def set_lowp_split_k(bint enabled):
    """Whether a one-row bfloat16 product x @ W (W [K, N]) splits K over the team (the
    default) or the output columns; returns the previous setting.  For tests and benchmarks."""
    global _lowp_split_k
    previous = bool(_lowp_split_k)
    _lowp_split_k = enabled
    return previous


def set_lowp_direct_max_rows(rows):
    """Set the most rows of A the direct (AVX2) kernels take (default 32); products with more
    rows widen panels of W for the float32 gemm.  Returns the previous value.  For tests."""
    global _lowp_direct_max
    cdef Py_ssize_t n = _int_arg("set_lowp_direct_max_rows", "rows", rows)
    if n < 0:
        raise ValueError(f"set_lowp_direct_max_rows: direct max rows must be >= 0, got {n}")
    previous = _lowp_direct_max
    _lowp_direct_max = <int>min(n, INT_MAX)   # no product has more rows than an int holds
    return previous


cdef int lowp_serial(int kind, int M, int n, int K, const float *A, int lda, const void *W,
                     int ldw, const uint16_t *S, bint accumulate, float *C,
                     int ldc) noexcept nogil:
    # C[:, 0:n] (+)= A (M, K) @ W for n output columns, on the calling thread; W (and S) point
    # at the first of them.  Returns -1 when the panel buffer cannot be allocated.
    cdef int P, j0, p, m, path = _lowp_path
    cdef float *buf
    cdef float beta = 1.0 if accumulate else 0.0
    if M <= 0 or n <= 0:
        return 0
    if K <= 0:   # an empty sum
        if not accumulate:
            for m in range(M):
                memset(C + <int64_t>m * ldc, 0, n * sizeof(float))
        return 0
    if path == LOWP_AVX2 and M <= _lowp_direct_max:
        if kind == LOWP_BF16_NN:
            gpt2s_bf16_nn_arch_x86_64_v3(M, n, K, A, lda, <const uint16_t *>W, ldw,
                                         accumulate, C, ldc)
        elif kind == LOWP_BF16_NT:
            gpt2s_bf16_nt_arch_x86_64_v3(M, n, K, A, lda, <const uint16_t *>W, ldw,
                                         accumulate, C, ldc)
        else:
            gpt2s_q8_nt_arch_x86_64_v3(M, n, K, A, lda, <const int8_t *>W, S, accumulate, C, ldc)
        return 0
    # panel route: P output columns of W at a time, widened into buf
    P = <int>(LOWP_PANEL_BYTES // (4 * <int64_t>K)) // 16 * 16
    P = min(max(P, 16), n)
    buf = <float *>malloc(sizeof(float) * <int64_t>P * K)
    if buf == NULL:
        return -1
    j0 = 0
    while j0 < n:
        p = min(P, n - j0)
        if kind == LOWP_BF16_NN:   # buf (K, p) = W[:, j0:j0 + p]
            if path == LOWP_AVX2:
                gpt2s_bf16_to_f32_panel_arch_x86_64_v3(buf, p, <const uint16_t *>W + j0, ldw, K, p)
            else:
                gpt2s_bf16_to_f32_panel(buf, p, <const uint16_t *>W + j0, ldw, K, p)
            gemm_serial(False, False, M, p, K, 1.0, A, lda, buf, p, beta, C + j0, ldc)
        else:                      # buf (p, K) = W[j0:j0 + p, :]
            if kind == LOWP_BF16_NT:
                if path == LOWP_AVX2:
                    gpt2s_bf16_to_f32_panel_arch_x86_64_v3(
                        buf, K, <const uint16_t *>W + <int64_t>j0 * ldw, ldw, p, K)
                else:
                    gpt2s_bf16_to_f32_panel(buf, K, <const uint16_t *>W + <int64_t>j0 * ldw,
                                            ldw, p, K)
            else:
                if path == LOWP_AVX2:
                    gpt2s_q8_to_f32_rows_arch_x86_64_v3(
                        buf, K, <const int8_t *>W + <int64_t>j0 * ldw,
                        S + <int64_t>j0 * (K // GPT2S_Q8_BLOCK), p, K)
                else:
                    gpt2s_q8_to_f32_rows(buf, K, <const int8_t *>W + <int64_t>j0 * ldw,
                                         S + <int64_t>j0 * (K // GPT2S_Q8_BLOCK), p, K)
            gemm_serial(False, True, M, p, K, 1.0, A, lda, buf, K, beta, C + j0, ldc)
        j0 = j0 + p
    free(buf)
    return 0


cdef int lowp_gemm(int kind, int M, int N, int K, const float *A, int lda, const void *W,
                   int ldw, const uint16_t *S, bint accumulate, float *C,
                   int ldc) noexcept nogil:
    # lowp_serial split over blocks of output columns, one per thread of our team (a block of
    # rows of W for the NT forms: each thread streams its own contiguous part of the weight)
    cdef int nt = threads_for(<double>M * N * K)
    cdef int failed = 0
    cdef int64_t blk, lo, hi, step, nblocks   # 64 bits: N + nt - 1 may pass INT_MAX
    if nt <= 1 or M <= 0 or N <= 0 or K <= 0:
        return lowp_serial(kind, M, N, K, A, lda, W, ldw, S, accumulate, C, ldc)
    if kind == LOWP_BF16_NN and M == 1 and _lowp_split_k and K >= 64 * nt:
        return lowp_nn1_split_k(nt, N, K, A, <const uint16_t *>W, ldw, accumulate, C)
    step = ((<int64_t>N + nt - 1) // nt + 15) // 16 * 16
    nblocks = (N + step - 1) // step
    for blk in prange(nblocks, num_threads=nt, schedule='static'):
        lo = blk * step
        hi = min(<int64_t>N, lo + step)
        if kind == LOWP_BF16_NN:
            failed += lowp_serial(kind, M, <int>(hi - lo), K, A, lda, <const uint16_t *>W + lo, ldw,
                                  S, accumulate, C + lo, ldc)
        elif kind == LOWP_BF16_NT:
            failed += lowp_serial(kind, M, <int>(hi - lo), K, A, lda,
                                  <const uint16_t *>W + <int64_t>lo * ldw, ldw, S, accumulate,
                                  C + lo, ldc)
        else:
            failed += lowp_serial(kind, M, <int>(hi - lo), K, A, lda,
                                  <const int8_t *>W + <int64_t>lo * ldw, ldw,
                                  S + <int64_t>lo * (K // GPT2S_Q8_BLOCK), accumulate, C + lo,
                                  ldc)
    return failed


cdef int lowp_nn1_split_k(int nt, int N, int K, const float *A, const uint16_t *W, int ldw,
                          bint accumulate, float *C) noexcept nogil:
    # C[0, 0:N] (+)= A (1, K) @ W (K, N) bf16 with the K rows split over the team: each
    # thread reads whole rows, one contiguous run of the weight, into a partial sum of its
    # own, and the partials are added in thread order (the same result on every run with the
    # same team size).  A column split gives each thread a piece of every row (for GPT-2's
    # mlp.c_proj, 3072 x 768, 768-byte pieces), more streams than the prefetchers follow:
    # measured on 2 threads, one process alternating the two (medians of 9), c_attn 768 x
    # 2304 read 14.0-14.9 GB/s split by columns and 15.2-16.7 split by K, c_fc 768 x 3072
    # 14.4-17.0 and 17.2-18.4, mlp.c_proj 8.3 and 10.8-12.1 (an earlier run).  Returns -1
    # when the partials cannot be allocated.
    cdef float *part = <float *>malloc(sizeof(float) * <int64_t>nt * N)
    cdef int t, j
    cdef int64_t lo, hi, step = ((<int64_t>K + nt - 1) // nt + 3) // 4 * 4
    cdef float s
    if part == NULL:
        return -1
    for t in prange(nt, num_threads=nt, schedule='static'):
        lo = t * step
        hi = min(K, lo + step)
        if lo < hi:
            lowp_serial(LOWP_BF16_NN, 1, N, <int>(hi - lo), A + lo, <int>(hi - lo), W + <int64_t>lo * ldw, ldw,
                        NULL, False, part + <int64_t>t * N, N)
        else:
            memset(part + <int64_t>t * N, 0, N * sizeof(float))
    for j in range(N):
        s = C[j] if accumulate else 0.0
        for t in range(nt):
            s = s + part[<int64_t>t * N + j]
        C[j] = s
    free(part)
    return 0


cdef void lowp_lay_bias(float[:, ::1] out, const float[::1] bias) noexcept nogil:
    cdef Py_ssize_t N = out.shape[0], OC = out.shape[1], n
    for n in prange(N, num_threads=threads_for(N * OC), schedule='static'):
        memcpy(&out[n, 0], &bias[0], OC * sizeof(float))


def _q8_check_k(Py_ssize_t K, str what):
    if K % GPT2S_Q8_BLOCK != 0:
        raise ValueError(f"{what}: int8 weights need a reduction dimension that is a multiple "
                         f"of {GPT2S_Q8_BLOCK} (blocks of {GPT2S_Q8_BLOCK}), got {K}")


# ---------------------------------------------------------------------- conversions

def bf16_from_float32(uint16_t[::1] out, const float[::1] x):
    # out (n,) = bfloat16(x), round to nearest even
    cdef int64_t n = x.shape[0], lo, blk, chunk = 1 << 16
    if out.shape[0] != n:
        raise ValueError(f"bf16_from_float32: out ({out.shape[0]},) for x ({n},)")
    if n == 0:
        return
    for blk in prange((n + chunk - 1) // chunk, nogil=True, num_threads=threads_for(n),
                      schedule='static'):
        lo = blk * chunk
        gpt2s_bf16_from_f32_n(&out[lo], &x[lo], min(chunk, n - lo))


def bf16_to_float32(float[::1] out, const uint16_t[::1] x):
    # out (n,) = float32(x), exact
    cdef int64_t n = x.shape[0], lo, blk, chunk = 1 << 16
    if out.shape[0] != n:
        raise ValueError(f"bf16_to_float32: out ({out.shape[0]},) for x ({n},)")
    if n == 0:
        return
    for blk in prange((n + chunk - 1) // chunk, nogil=True, num_threads=threads_for(n),
                      schedule='static'):
        lo = blk * chunk
        gpt2s_bf16_to_f32_n(&out[lo], &x[lo], min(chunk, n - lo))


def q8_quantize(int8_t[:, ::1] q, uint16_t[:, ::1] scales, const float[:, ::1] w,
                bint transpose):
    # q (N, K) int8, scales (N, K / 32) fp16 bits  <-  w (N, K), or w (K, N) when transpose
    # (a Conv1D weight [in, out]: stored output-major, see _lowp.h)
    cdef int64_t N = q.shape[0], K = q.shape[1], sn, sk, lo, blk, step = 64
    cdef int nt, bad = 0
    cdef const float *src
    _q8_check_k(K, "q8_quantize")
    if ((w.shape[1], w.shape[0]) if transpose else (w.shape[0], w.shape[1])) != (N, K) \
            or scales.shape[0] != N or scales.shape[1] != K // GPT2S_Q8_BLOCK:
        raise ValueError(f"q8_quantize: w ({w.shape[0]},{w.shape[1]}) transpose={bool(transpose)}"
                         f" -> q ({N},{K}), scales ({scales.shape[0]},{scales.shape[1]})")
    if N == 0 or K == 0:
        return
    if transpose:
        sn, sk = 1, N
    else:
        sn, sk = K, 1
    src = &w[0, 0]
    nt = threads_for(<double>N * K)
    with nogil:
        for blk in prange((N + step - 1) // step, num_threads=nt, schedule='static'):
            lo = blk * step
            bad += gpt2s_q8_quantize(&q[lo, 0], &scales[lo, 0], src + lo * sn, min(step, N - lo),
                                     K, sn, sk) != 0
    if bad:
        raise ValueError("q8_quantize: the weight holds a non-finite value or one too large for "
                         "int8 blocks with fp16 scales (|w| > 127 * 65504)")


def q8_dequantize(float[:, ::1] out, const int8_t[:, ::1] q, const uint16_t[:, ::1] scales):
    # out (N, K) = q (N, K) * scales (N, K / 32) (each scale over its block of 32)
    cdef int64_t N = q.shape[0], K = q.shape[1], lo, blk, step = 64
    _q8_check_k(K, "q8_dequantize")
    if (out.shape[0] != N or out.shape[1] != K or scales.shape[0] != N
            or scales.shape[1] != K // GPT2S_Q8_BLOCK or _over_int(K)):
        raise ValueError(f"q8_dequantize: q ({N},{K}), scales ({scales.shape[0]},"
                         f"{scales.shape[1]}) -> out ({out.shape[0]},{out.shape[1]}), K < 2^31")
    if N == 0 or K == 0:
        return
    for blk in prange((N + step - 1) // step, nogil=True, num_threads=threads_for(<double>N * K),
                      schedule='static'):
        lo = blk * step
        gpt2s_q8_to_f32_rows(&out[lo, 0], K, &q[lo, 0], &scales[lo, 0], <int>min(step, N - lo),
                             <int>K)


# ---------------------------------------------------------------------- products

def matmul_forward_bf16(float[:, ::1] out, const float[:, ::1] inp,
                        const uint16_t[:, ::1] weight, const float[::1] bias):
    # out (N, OC) = inp (N, C) @ weight (C, OC) bfloat16 + bias (OC,)
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], OC = weight.shape[1]
    cdef int failed
    if (weight.shape[0] != C or out.shape[0] != N or out.shape[1] != OC
            or (bias.shape[0] != 0 and bias.shape[0] != OC) or _blas_sizes_over(N, C, OC)):
        raise ValueError(f"matmul_forward_bf16: shapes ({N},{C}) @ ({weight.shape[0]},{OC}) "
                         f"+ bias ({bias.shape[0]},) -> ({out.shape[0]},{out.shape[1]}), "
                         f"each size < 2^31")
    if N == 0 or OC == 0:
        return
    with nogil:
        if bias.shape[0] > 0:
            lowp_lay_bias(out, bias)
        failed = lowp_gemm(LOWP_BF16_NN, <int>N, <int>OC, <int>C,
                           &inp[0, 0] if C > 0 else NULL, <int>C,
                           &weight[0, 0] if C > 0 else NULL, <int>OC, NULL, bias.shape[0] > 0,
                           &out[0, 0], <int>OC)
    if failed:
        raise MemoryError("matmul_forward_bf16: out of memory for a weight panel")


def lm_head_forward_bf16(float[:, ::1] logits, const float[:, ::1] inp,
                         const uint16_t[:, ::1] wte):
    # logits (N, V) = inp (N, C) @ wte (V, C)^T bfloat16
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], V = wte.shape[0]
    cdef int failed
    if (wte.shape[1] != C or logits.shape[0] != N or logits.shape[1] != V
            or _blas_sizes_over(N, C, V)):
        raise ValueError(f"lm_head_forward_bf16: shapes ({N},{C}) @ ({V},{wte.shape[1]})^T -> "
                         f"({logits.shape[0]},{logits.shape[1]}), each size < 2^31")
    if N == 0 or V == 0:
        return
    with nogil:
        failed = lowp_gemm(LOWP_BF16_NT, <int>N, <int>V, <int>C,
                           &inp[0, 0] if C > 0 else NULL, <int>C,
                           &wte[0, 0] if C > 0 else NULL, <int>C, NULL, False, &logits[0, 0],
                           <int>V)
    if failed:
        raise MemoryError("lm_head_forward_bf16: out of memory for a weight panel")


def matmul_forward_q8(float[:, ::1] out, const float[:, ::1] inp, const int8_t[:, ::1] q,
                      const uint16_t[:, ::1] scales, const float[::1] bias):
    # out (N, OC) = inp (N, C) @ W + bias (OC,), W (C, OC) stored as q (OC, C) int8 and
    # scales (OC, C / 32) fp16: out[n, o] = sum_c inp[n, c] q[o, c] scales[o, c / 32]
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], OC = q.shape[0]
    cdef int failed
    _q8_check_k(C, "matmul_forward_q8")
    if (q.shape[1] != C or scales.shape[0] != OC or scales.shape[1] != C // GPT2S_Q8_BLOCK
            or out.shape[0] != N or out.shape[1] != OC
            or (bias.shape[0] != 0 and bias.shape[0] != OC) or _blas_sizes_over(N, C, OC)):
        raise ValueError(f"matmul_forward_q8: shapes ({N},{C}) @ q ({OC},{q.shape[1]})^T, "
                         f"scales ({scales.shape[0]},{scales.shape[1]}) + bias ({bias.shape[0]},)"
                         f" -> ({out.shape[0]},{out.shape[1]}), each size < 2^31")
    if N == 0 or OC == 0:
        return
    with nogil:
        if bias.shape[0] > 0:
            lowp_lay_bias(out, bias)
        failed = lowp_gemm(LOWP_Q8_NT, <int>N, <int>OC, <int>C,
                           &inp[0, 0] if C > 0 else NULL, <int>C,
                           &q[0, 0] if C > 0 else NULL, <int>C,
                           &scales[0, 0] if C > 0 else NULL, bias.shape[0] > 0, &out[0, 0],
                           <int>OC)
    if failed:
        raise MemoryError("matmul_forward_q8: out of memory for a weight panel")


def lm_head_forward_q8(float[:, ::1] logits, const float[:, ::1] inp, const int8_t[:, ::1] q,
                       const uint16_t[:, ::1] scales):
    # logits (N, V) = inp (N, C) @ wte (V, C)^T, wte stored as q (V, C), scales (V, C / 32)
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], V = q.shape[0]
    cdef int failed
    _q8_check_k(C, "lm_head_forward_q8")
    if (q.shape[1] != C or scales.shape[0] != V or scales.shape[1] != C // GPT2S_Q8_BLOCK
            or logits.shape[0] != N or logits.shape[1] != V or _blas_sizes_over(N, C, V)):
        raise ValueError(f"lm_head_forward_q8: shapes ({N},{C}) @ q ({V},{q.shape[1]})^T, "
                         f"scales ({scales.shape[0]},{scales.shape[1]}) -> "
                         f"({logits.shape[0]},{logits.shape[1]}), each size < 2^31")
    if N == 0 or V == 0:
        return
    with nogil:
        failed = lowp_gemm(LOWP_Q8_NT, <int>N, <int>V, <int>C,
                           &inp[0, 0] if C > 0 else NULL, <int>C,
                           &q[0, 0] if C > 0 else NULL, <int>C,
                           &scales[0, 0] if C > 0 else NULL, False, &logits[0, 0], <int>V)
    if failed:
        raise MemoryError("lm_head_forward_q8: out of memory for a weight panel")


# ---------------------------------------------------------------------- embedding

def _check_tokens(const int64_t[::1] idx, int64_t V, str what):
    cdef Py_ssize_t n
    for n in range(idx.shape[0]):
        if idx[n] < 0 or idx[n] >= V:
            raise ValueError(f"{what}: token id {idx[n]} at position {n} is outside [0, {V})")


def embedding_forward_bf16(float[:, ::1] out, const int64_t[::1] idx,
                           const uint16_t[:, ::1] wte, const float[:, ::1] wpe, T, pos0):
    # out (N, C) = float(wte[idx]) + wpe[pos0 + t];  idx (N,), row n at time n % T
    cdef Py_ssize_t N = out.shape[0], C = out.shape[1], n, c
    cdef Py_ssize_t steps = _int_arg("embedding_forward_bf16", "T", T)
    cdef Py_ssize_t first = _int_arg("embedding_forward_bf16", "pos0", pos0)
    cdef float *o
    cdef const uint16_t *te
    cdef const float *pe
    if (idx.shape[0] != N or wte.shape[1] != C or wpe.shape[1] != C or steps <= 0
            or _span_outside(first, min(steps, N), wpe.shape[0])):
        raise ValueError(f"embedding_forward_bf16: out ({N},{C}), idx ({idx.shape[0]},), wte "
                         f"({wte.shape[0]},{wte.shape[1]}), wpe ({wpe.shape[0]},{wpe.shape[1]}),"
                         f" T={T}, pos0={pos0}")
    _check_tokens(idx, wte.shape[0], "embedding_forward_bf16")
    if N == 0 or C == 0:
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * C), schedule='static'):
        o = &out[n, 0]
        te = &wte[idx[n], 0]
        pe = &wpe[first + n % steps, 0]
        gpt2s_bf16_to_f32_n(o, te, C)
        for c in range(C):
            o[c] = o[c] + pe[c]


def embedding_forward_q8(float[:, ::1] out, const int64_t[::1] idx, const int8_t[:, ::1] q,
                         const uint16_t[:, ::1] scales, const float[:, ::1] wpe, T, pos0):
    # out (N, C) = dequantized wte[idx] + wpe[pos0 + t];  wte (V, C) as q (V, C), scales (V, C/32)
    cdef Py_ssize_t N = out.shape[0], C = out.shape[1], n, c
    cdef Py_ssize_t steps = _int_arg("embedding_forward_q8", "T", T)
    cdef Py_ssize_t first = _int_arg("embedding_forward_q8", "pos0", pos0)
    cdef float *o
    cdef const float *pe
    _q8_check_k(C, "embedding_forward_q8")
    if (idx.shape[0] != N or q.shape[1] != C or scales.shape[0] != q.shape[0]
            or scales.shape[1] != C // GPT2S_Q8_BLOCK or wpe.shape[1] != C or steps <= 0
            or _span_outside(first, min(steps, N), wpe.shape[0]) or _over_int(C)):
        raise ValueError(f"embedding_forward_q8: out ({N},{C}), idx ({idx.shape[0]},), q "
                         f"({q.shape[0]},{q.shape[1]}), scales ({scales.shape[0]},"
                         f"{scales.shape[1]}), wpe ({wpe.shape[0]},{wpe.shape[1]}), T={T}, "
                         f"pos0={pos0}")
    _check_tokens(idx, q.shape[0], "embedding_forward_q8")
    if N == 0 or C == 0:
        return
    for n in prange(N, nogil=True, num_threads=threads_for(N * C), schedule='static'):
        o = &out[n, 0]
        pe = &wpe[first + n % steps, 0]
        gpt2s_q8_to_f32_rows(o, C, &q[idx[n], 0], &scales[idx[n], 0], 1, <int>C)
        for c in range(C):
            o[c] = o[c] + pe[c]
