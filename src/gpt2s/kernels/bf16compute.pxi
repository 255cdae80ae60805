# bfloat16 compute (compute_dtype="bfloat16"): the products of the matmul and head entries with
# both operands rounded to bfloat16 (nearest even) and float32 sums, forward and backward, as
# torch.autocast does; included into _core.pyx after matmul.pxi.  The weights come as the
# model's bfloat16 copies (uint16 bits, the float32 tensor's layout); the activations and
# gradients are float32 and are rounded here.
#
# Two routes, the same numbers up to the order of the float32 sums (a product of two bfloat16
# is exact in float32):
#   - "portable" (any CPU): the activations rounded into float32 buffers, the weight through
#     the bfloat16 weight type's products (matmul.pxi: its direct few-row kernels, or panels
#     widened for sgemm), activation x activation products by sgemm: float32 speed;
#   - "avx512-bf16": kernels/bf16gemm.h's vdpbf16ps GEMM, which rounds while it packs, on
#     blocks of C per thread.

cdef extern from "kernels/bf16gemm.h":
    enum:
        GPT2S_ISA_AVX512_BF16
    ctypedef int (*gpt2s_bf16gemm_fn)(int M, int N, int K, const float *A, int64_t ars,
                                      int64_t acs, const void *B, int b_bf16, int64_t brs,
                                      int64_t bcs, int accumulate, float *C,
                                      int64_t ldc) noexcept nogil
    gpt2s_bf16gemm_fn gpt2s_bf16gemm_variant(int isa) noexcept nogil
    void gpt2s_bf16_round_n(float *out, const float *x, int64_t n) noexcept nogil
    void gpt2s_bf16_from_f32_n(uint16_t *out, const float *x, int64_t n) noexcept nogil
    uint16_t gpt2s_f32_to_bf16(float f) noexcept nogil


cdef int _bf16_compute_isa = GPT2S_ISA_PORTABLE
# whether the products go to kernels/bf16gemm.h (the isa's GEMM) rather than the rounded
# buffers + float32 products: True for avx512-bf16, and for "reference" (the portable C GEMM
# through the same route, slow: for the tests of this file's strides and splits)
cdef bint _bf16_gemm_route = False


cdef bint _bf16_compute_runs(int isa) noexcept nogil:
    # the portable route always; the vdpbf16ps GEMM where built and this CPU has AVX512_BF16
    return isa == GPT2S_ISA_PORTABLE or (isa == GPT2S_ISA_AVX512_BF16
                                         and gpt2s_bf16gemm_variant(isa) != NULL
                                         and gpt2s_cpu_has(isa))


if _bf16_compute_runs(GPT2S_ISA_AVX512_BF16):
    _bf16_compute_isa = GPT2S_ISA_AVX512_BF16
    _bf16_gemm_route = True


def bf16_compute_variants():
    """The routes of bfloat16 compute this build has and this CPU runs, "portable" (operands
    rounded to bfloat16 values held in float32, then the float32 products: float32 speed)
    first; the last is the one used unless another is forced."""
    return tuple(gpt2s_isa_names[isa].decode() for isa in (GPT2S_ISA_PORTABLE,
                                                           GPT2S_ISA_AVX512_BF16)
                 if _bf16_compute_runs(isa))


def get_bf16_compute_variant():
    """The route the bfloat16-compute products take ("portable" or "avx512-bf16", or
    "reference" when forced)."""
    if _bf16_gemm_route and _bf16_compute_isa == GPT2S_ISA_PORTABLE:
        return "reference"
    return gpt2s_isa_names[_bf16_compute_isa].decode()


def set_bf16_compute_variant(variant):
    """Force the route of the bfloat16-compute products ("auto": the best this CPU runs);
    returns the previous one.  For tests and benchmarks: both compute the same products.
    "reference" runs kernels/bf16gemm.h's scalar reference through the GEMM route (slow; for
    tests of that route on a CPU without AVX512_BF16)."""
    global _bf16_compute_isa, _bf16_gemm_route
    previous = get_bf16_compute_variant()
    if variant == "auto":
        variant = bf16_compute_variants()[-1]
    if variant == "reference":
        _bf16_compute_isa, _bf16_gemm_route = GPT2S_ISA_PORTABLE, True
        return previous
    for isa in (GPT2S_ISA_PORTABLE, GPT2S_ISA_AVX512_BF16):
        if gpt2s_isa_names[isa].decode() == variant:
            if not _bf16_compute_runs(isa):
                raise ValueError(f"bfloat16 compute: variant {variant!r} is not available on "
                                 f"this CPU and build; available: {list(bf16_compute_variants())}")
            _bf16_compute_isa, _bf16_gemm_route = isa, isa != GPT2S_ISA_PORTABLE
            return previous
    raise ValueError(f"unknown bfloat16 compute variant {variant!r}; one of "
                     f"['portable', 'avx512-bf16', 'reference'] or 'auto'")


def bf16_round_into(uint16_t[::1] out, const float[::1] x):
    """out = the bfloat16 bits of x, rounded to nearest even (the model's bfloat16 weight
    copies; AdamW's step refreshes them itself)."""
    cdef int64_t n = x.shape[0], lo, blk, step = 16384
    if out.shape[0] != n:
        raise ValueError(f"bf16_round_into: out ({out.shape[0]},) for x ({n},)")
    if n == 0:
        return
    for blk in prange((n + step - 1) // step, nogil=True, num_threads=threads_for(n),
                      schedule='static'):
        lo = blk * step
        gpt2s_bf16_from_f32_n(&out[lo], &x[lo], min(step, n - lo))


cdef float *_rounded(const float *x, int64_t rows, int64_t cols) noexcept nogil:
    # a new (rows, cols) float32 buffer of bf16(x) (free() it), NULL when out of memory
    cdef float *out = <float *>malloc(sizeof(float) * max(rows * cols, 1))
    cdef int64_t r
    if out != NULL:
        for r in prange(rows, num_threads=threads_for(<double>rows * cols), schedule='static'):
            gpt2s_bf16_round_n(out + r * cols, x + r * cols, cols)
    return out


cdef int _bf16_gemm(int M, int N, int K, const float *A, int64_t ars, int64_t acs,
                    const void *B, bint b_bf16, int64_t brs, int64_t bcs, bint accumulate,
                    float *C, int64_t ldc) noexcept nogil:
    # C (M, N) (+)= bf16(A) @ bf16(B) by the vdpbf16ps GEMM, one block of C per thread (along
    # its longer side, columns in multiples of 32).  Returns -1 when out of memory.
    cdef gpt2s_bf16gemm_fn f = gpt2s_bf16gemm_variant(_bf16_compute_isa)
    cdef int nt = threads_for(MATMUL_WORK_PER_MAC * M * N * K), failed = 0
    cdef int64_t blk, lo, hi, step, nblocks, esize = 2 if b_bf16 else 4
    if M <= 0 or N <= 0:
        return 0
    if nt <= 1:
        return f(M, N, K, A, ars, acs, B, b_bf16, brs, bcs, accumulate, C, ldc)
    if N >= M:
        step = ((<int64_t>N + nt - 1) // nt + 31) // 32 * 32
        nblocks = (N + step - 1) // step
        for blk in prange(nblocks, num_threads=nt, schedule='static'):
            lo = blk * step
            hi = min(<int64_t>N, lo + step)
            failed += f(M, <int>(hi - lo), K, A, ars, acs,
                        <const char *>B + lo * bcs * esize, b_bf16, brs, bcs, accumulate,
                        C + lo, ldc) != 0
    else:
        step = ((<int64_t>M + nt - 1) // nt + 7) // 8 * 8
        nblocks = (M + step - 1) // step
        for blk in prange(nblocks, num_threads=nt, schedule='static'):
            lo = blk * step
            hi = min(<int64_t>M, lo + step)
            failed += f(<int>(hi - lo), N, K, A + lo * ars, ars, acs, B, b_bf16, brs, bcs,
                        accumulate, C + lo * ldc, ldc) != 0
    return -1 if failed else 0


def matmul_forward_bf16(float[:, ::1] out, const float[:, ::1] inp,
                        const uint16_t[:, ::1] weight, const float[::1] bias):
    # out (N, OC) = bf16(inp) (N, C) @ weight (C, OC) (bfloat16 bits) + bias (OC,) (empty:
    # none), float32 sums
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], OC = weight.shape[1], n
    cdef int failed = 0
    cdef float *xr = NULL
    if (weight.shape[0] != C or out.shape[0] != N or out.shape[1] != OC
            or (bias.shape[0] != 0 and bias.shape[0] != OC) or _blas_sizes_over(N, C, OC)):
        raise ValueError(f"matmul_forward_bf16: shapes ({N},{C}) @ ({weight.shape[0]},{OC}) "
                         f"+ bias ({bias.shape[0]},) -> ({out.shape[0]},{out.shape[1]}), "
                         f"each size < 2^31")
    if N == 0 or OC == 0:
        return
    with nogil:
        if bias.shape[0] > 0:
            for n in prange(N, num_threads=threads_for(N * OC), schedule='static'):
                memcpy(&out[n, 0], &bias[0], OC * sizeof(float))
        if C == 0:
            if bias.shape[0] == 0:
                for n in range(N):
                    memset(&out[n, 0], 0, OC * sizeof(float))
        elif _bf16_gemm_route:
            failed = _bf16_gemm(<int>N, <int>OC, <int>C, &inp[0, 0], C, 1, &weight[0, 0], True,
                                OC, 1, bias.shape[0] > 0, &out[0, 0], OC)
        else:
            xr = _rounded(&inp[0, 0], N, C)
            if xr == NULL:
                failed = -1
            else:
                failed = weight_gemm(GPT2S_WTYPE_BF16, False, <int>N, <int>OC, <int>C, xr,
                                     <int>C, &weight[0, 0], <int>OC, NULL, bias.shape[0] > 0,
                                     &out[0, 0], <int>OC)
                free(xr)
    if failed:
        raise MemoryError("matmul_forward_bf16: out of memory")


def matmul_backward_bf16(float[:, ::1] dinp, float[:, ::1] dweight, float[::1] dbias,
                         const float[:, ::1] dout, const float[:, ::1] inp,
                         const uint16_t[:, ::1] weight, bint accumulate_dinp):
    # dinp (N, C) (+)= bf16(dout) (N, OC) @ weight^T;  dweight (C, OC) += bf16(inp)^T @
    # bf16(dout);  dbias (OC,) += column sums of dout (float32, not a product)
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], OC = weight.shape[1]
    cdef Py_ssize_t n, o, lo, hi, blk, nblocks, step
    cdef int nt = threads_for(N * OC), failed = 0
    cdef float *db
    cdef const float *g
    cdef float *gr = NULL
    cdef float *xr = NULL
    if (weight.shape[0] != C or dout.shape[0] != N or dout.shape[1] != OC
            or dinp.shape[0] != N or dinp.shape[1] != C or dweight.shape[0] != C
            or dweight.shape[1] != OC or (dbias.shape[0] != 0 and dbias.shape[0] != OC)
            or _blas_sizes_over(N, C, OC)):
        raise ValueError(f"matmul_backward_bf16: inp ({N},{C}), weight ({weight.shape[0]},{OC}), "
                         f"dout ({dout.shape[0]},{dout.shape[1]}), dinp ({dinp.shape[0]},"
                         f"{dinp.shape[1]}), dweight ({dweight.shape[0]},{dweight.shape[1]}), "
                         f"dbias ({dbias.shape[0]},), each size < 2^31")
    if N == 0 or C == 0 or OC == 0:
        if N > 0 and C > 0 and not accumulate_dinp:
            dinp[...] = 0
        return
    with nogil:
        if _bf16_gemm_route:
            failed = _bf16_gemm(<int>N, <int>C, <int>OC, &dout[0, 0], OC, 1, &weight[0, 0],
                                True, 1, OC, accumulate_dinp, &dinp[0, 0], C)
            if failed == 0:
                failed = _bf16_gemm(<int>C, <int>OC, <int>N, &inp[0, 0], 1, C, &dout[0, 0],
                                    False, OC, 1, True, &dweight[0, 0], OC)
        else:
            gr = _rounded(&dout[0, 0], N, OC)
            xr = _rounded(&inp[0, 0], N, C)
            if gr == NULL or xr == NULL:
                failed = -1
            else:
                failed = weight_gemm(GPT2S_WTYPE_BF16, True, <int>N, <int>C, <int>OC, gr,
                                     <int>OC, &weight[0, 0], <int>OC, NULL, accumulate_dinp,
                                     &dinp[0, 0], <int>C)
                gemm(True, False, <int>C, <int>OC, <int>N, 1.0, xr, <int>C, gr, <int>OC, 1.0,
                     &dweight[0, 0], <int>OC)
            free(gr)
            free(xr)
        if dbias.shape[0] > 0 and failed == 0:
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
    if failed:
        raise MemoryError("matmul_backward_bf16: out of memory")


def lm_head_forward_bf16(float[:, ::1] logits, const float[:, ::1] inp,
                         const uint16_t[:, ::1] wte):
    # logits (N, V) = bf16(inp) (N, C) @ wte (V, C)^T (bfloat16 bits), float32 sums
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], V = wte.shape[0], n
    cdef int failed = 0
    cdef float *xr = NULL
    if (wte.shape[1] != C or logits.shape[0] != N or logits.shape[1] != V
            or _blas_sizes_over(N, C, V)):
        raise ValueError(f"lm_head_forward_bf16: shapes ({N},{C}) @ ({V},{wte.shape[1]})^T -> "
                         f"({logits.shape[0]},{logits.shape[1]}), each size < 2^31")
    if N == 0 or V == 0:
        return
    with nogil:
        if C == 0:
            for n in range(N):
                memset(&logits[n, 0], 0, V * sizeof(float))
        elif _bf16_gemm_route:
            failed = _bf16_gemm(<int>N, <int>V, <int>C, &inp[0, 0], C, 1, &wte[0, 0], True, 1,
                                C, False, &logits[0, 0], V)
        else:
            xr = _rounded(&inp[0, 0], N, C)
            if xr == NULL:
                failed = -1
            else:
                failed = weight_gemm(GPT2S_WTYPE_BF16, True, <int>N, <int>V, <int>C, xr,
                                     <int>C, &wte[0, 0], <int>C, NULL, False, &logits[0, 0],
                                     <int>V)
                free(xr)
    if failed:
        raise MemoryError("lm_head_forward_bf16: out of memory")


def lm_head_backward_bf16(float[:, ::1] dinp, float[:, ::1] dwte, float[:, ::1] dlogits,
                          const float[:, ::1] inp, const uint16_t[:, ::1] wte):
    # dinp (N, C) = bf16(dlogits) (N, V) @ wte (V, C);  dwte (V, C) += bf16(dlogits)^T @
    # bf16(inp).  dlogits may be rounded to bfloat16 in place (it is consumed here).
    cdef Py_ssize_t N = inp.shape[0], C = inp.shape[1], V = wte.shape[0], n
    cdef int failed = 0
    cdef float *xr = NULL
    if (wte.shape[1] != C or dwte.shape[0] != V or dwte.shape[1] != C or dinp.shape[0] != N
            or dinp.shape[1] != C or dlogits.shape[0] != N or dlogits.shape[1] != V
            or _blas_sizes_over(N, C, V)):
        raise ValueError(f"lm_head_backward_bf16: inp ({N},{C}), wte ({V},{wte.shape[1]}), "
                         f"dlogits ({dlogits.shape[0]},{dlogits.shape[1]}), dinp "
                         f"({dinp.shape[0]},{dinp.shape[1]}), dwte ({dwte.shape[0]},"
                         f"{dwte.shape[1]}), each size < 2^31")
    if N == 0 or C == 0:
        return
    if V == 0:
        dinp[...] = 0
        return
    with nogil:
        if _bf16_gemm_route:
            failed = _bf16_gemm(<int>N, <int>C, <int>V, &dlogits[0, 0], V, 1, &wte[0, 0], True,
                                C, 1, False, &dinp[0, 0], C)
            if failed == 0:
                failed = _bf16_gemm(<int>V, <int>C, <int>N, &dlogits[0, 0], 1, V, &inp[0, 0],
                                    False, C, 1, True, &dwte[0, 0], C)
        else:
            for n in prange(N, num_threads=threads_for(<double>N * V), schedule='static'):
                gpt2s_bf16_round_n(&dlogits[n, 0], &dlogits[n, 0], V)
            xr = _rounded(&inp[0, 0], N, C)
            if xr == NULL:
                failed = -1
            else:
                failed = weight_gemm(GPT2S_WTYPE_BF16, False, <int>N, <int>C, <int>V,
                                     &dlogits[0, 0], <int>V, &wte[0, 0], <int>C, NULL, False,
                                     &dinp[0, 0], <int>C)
                gemm(True, False, <int>V, <int>C, <int>N, 1.0, &dlogits[0, 0], <int>V, xr,
                     <int>C, 1.0, &dwte[0, 0], <int>C)
                free(xr)
    if failed:
        raise MemoryError("lm_head_backward_bf16: out of memory")


cdef void adamw_segment_bf16(float *pp, const float *pg, float *pm, float *pv, uint16_t *po,
                             Py_ssize_t lo, Py_ssize_t hi, float shrink, float beta1,
                             float beta2, float eps, float step_size, float inv_sqrt_bc2,
                             float grad_scale, int nt) noexcept nogil:
    # _core's adamw_segment, the same float32 arithmetic, plus po[i] = bf16(new p[i]): the
    # bfloat16 weight copies refreshed in the optimizer's one pass over memory
    cdef Py_ssize_t i
    cdef float g, mi, vi, p
    for i in prange(lo, hi, num_threads=nt, schedule='static'):
        g = pg[i] * grad_scale
        mi = beta1 * pm[i] + (<float>1.0 - beta1) * g
        vi = beta2 * pv[i] + (<float>1.0 - beta2) * g * g
        pm[i] = mi
        pv[i] = vi
        p = pp[i] * shrink - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps)
        pp[i] = p
        po[i] = gpt2s_f32_to_bf16(p)
