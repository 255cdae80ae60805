# Products with a stored weight for every weight type of the table (kernels/types.h), and
# the conversions between a type's stored form and float32; included into _core.pyx.
#
# A weight is a float32 ndarray (the trainable model's, in Hugging Face's Conv1D layout
# [in, out], or the embedding [V, C]) or a PackedWeight: the stored arrays of another type,
# its type's id in the table and the shape of the float32 tensor it stands for.  One entry
# per operation (matmul_forward, lm_head_forward, embedding_forward) takes either.
#
# float32 products go to gemm (BLAS, and the direct few-row kernels of f32.h inside it).  A
# product C (M, N) (+)= A (M, K) @ W of another type runs, on each thread's block of output
# columns (or, for one row of an input-major W, on each thread's block of K rows):
#   - the type's direct kernel, when its variant in use has one and M is at most the direct
#     rows limit (32: decoding), which reads each stored weight once into registers;
#   - else the panel route: ~1 MiB panels of W widened to float32 in a per-thread buffer,
#     each handed to gemm_serial (sgemm / sgemv / the float32 few-row kernels).  No full-size
#     float32 copy exists at any time.

cdef extern from "kernels/types.h":
    enum:
        GPT2S_NISA
        GPT2S_ISA_PORTABLE
        GPT2S_WTYPE_F32
        GPT2S_WTYPE_BF16
        GPT2S_WTYPE_Q8
        GPT2S_WTYPE_Q4
        GPT2S_NWTYPES
        GPT2S_STORE_FLOAT
        GPT2S_STORE_UINT16
        GPT2S_STORE_INT8
        GPT2S_STORE_UINT8
    ctypedef void (*gpt2s_direct_fn)(int M, int n, int K, const float *A, int lda,
                                     const void *W, int ldw, const uint16_t *S, int accumulate,
                                     float *C, int ldc) noexcept nogil
    ctypedef void (*gpt2s_widen_fn)(float *out, int64_t ldo, const void *W, int64_t ldw,
                                    const uint16_t *S, int rows, int cols) noexcept nogil
    ctypedef int (*gpt2s_quantize_fn)(void *W, uint16_t *S, const float *x, int64_t N,
                                      int64_t K, int64_t sn, int64_t sk) noexcept nogil
    ctypedef struct gpt2s_wtype_traits:
        const char *name
        int store
        int bits
        int block
        int output_major
        int direct_min_rows
        gpt2s_quantize_fn quantize
    const gpt2s_wtype_traits gpt2s_wtypes[]
    const char *gpt2s_isa_names[]
    int gpt2s_wtype_variant[]
    int gpt2s_cpu_has(int isa) noexcept nogil
    gpt2s_direct_fn gpt2s_wtype_direct(int t, int output_major, int isa) noexcept nogil
    gpt2s_widen_fn gpt2s_wtype_widen(int t, int isa) noexcept nogil
    int gpt2s_wtype_has_variant(int t, int isa) noexcept nogil
    int gpt2s_wtype_built_variant(int t, int isa) noexcept nogil
    int gpt2s_wtype_best_variant(int t) noexcept nogil
    int64_t gpt2s_wtype_bytes(int t, int64_t n) noexcept nogil
    int gpt2s_wtype_per_element(int t) noexcept nogil


WTYPE_FLOAT32 = GPT2S_WTYPE_F32
WTYPE_BFLOAT16 = GPT2S_WTYPE_BF16
WTYPE_INT8 = GPT2S_WTYPE_Q8
WTYPE_INT4 = GPT2S_WTYPE_Q4
_STORE_DTYPES = {GPT2S_STORE_FLOAT: "float32", GPT2S_STORE_UINT16: "uint16",
                 GPT2S_STORE_INT8: "int8", GPT2S_STORE_UINT8: "uint8"}

cdef int _direct_max_rows = 32            # most rows of A the direct kernels take
cdef int64_t PANEL_BYTES = 1 << 20        # float32 panel per thread on the panel route
cdef bint _split_k = True                  # one-row products of an input-major W split K


cdef int _init_variants() except -1:
    cdef int t
    for t in range(GPT2S_NWTYPES):
        gpt2s_wtype_variant[t] = gpt2s_wtype_best_variant(t)
    return 0


_init_variants()


def _wtype_id(name):
    cdef int t
    for t in range(GPT2S_NWTYPES):
        if gpt2s_wtypes[t].name.decode() == name:
            return t
    raise ValueError(f"unknown weight type {name!r}; one of {list(weight_types())}")


def weight_types():
    """The weight types of the table, in the order of their ids (WTYPE_FLOAT32, ...)."""
    return tuple(gpt2s_wtypes[t].name.decode() for t in range(GPT2S_NWTYPES))


def weight_type_info(name):
    """{"id", "block", "output_major", "store", "bits"} of a weight type: the id the kernels
    take, weights per scale block along K (0: no scales), whether a Conv1D weight is stored
    transposed ([out][in]), the NumPy dtype of the stored array's elements and the bits of
    storage per weight (a uint8 element of a 4-bit type holds two weights)."""
    cdef int t = _wtype_id(name)
    return {"id": t, "block": gpt2s_wtypes[t].block,
            "output_major": bool(gpt2s_wtypes[t].output_major),
            "store": _STORE_DTYPES[gpt2s_wtypes[t].store], "bits": gpt2s_wtypes[t].bits}


def kernel_variants(name, built=False):
    """The instruction-set variants of a weight type's kernels that this build has and this CPU
    runs, "portable" first; the last is the one used unless another is forced.  With
    ``built=True``: every variant this build has for the type, also those this CPU lacks."""
    cdef int t = _wtype_id(name), isa
    return tuple(gpt2s_isa_names[isa].decode() for isa in range(GPT2S_NISA)
                 if (gpt2s_wtype_built_variant(t, isa) if built
                     else gpt2s_wtype_has_variant(t, isa)))


def cpu_variants():
    """The instruction-set levels this build compiled and this CPU runs ("portable",
    "x86-64-v3", "avx-vnni", "avx512", "avx512-vnni", "avx512-bf16"; on aarch64 "neon",
    "neon-dotprod", "neon-bf16"), checked by CPUID / AT_HWCAP."""
    return tuple(gpt2s_isa_names[isa].decode() for isa in range(GPT2S_NISA)
                 if gpt2s_cpu_has(isa))


def get_kernel_variant(name):
    """The variant a weight type's products run ("portable", "x86-64-v3", ...)."""
    return gpt2s_isa_names[gpt2s_wtype_variant[_wtype_id(name)]].decode()


def set_kernel_variant(name, variant):
    """Force a weight type's kernels to one variant this CPU runs ("auto": the best); returns
    the previous one.  For tests and benchmarks: every variant computes the same products
    (within float32 rounding), the portable one through BLAS."""
    cdef int t = _wtype_id(name), isa
    previous = get_kernel_variant(name)
    if variant == "auto":
        gpt2s_wtype_variant[t] = gpt2s_wtype_best_variant(t)
        return previous
    for isa in range(GPT2S_NISA):
        if gpt2s_isa_names[isa].decode() == variant:
            if not gpt2s_wtype_has_variant(t, isa):
                raise ValueError(f"{name} kernels: variant {variant!r} is not available on "
                                 f"this CPU and build; available: {list(kernel_variants(name))}")
            gpt2s_wtype_variant[t] = isa
            return previous
    raise ValueError(f"unknown kernel variant {variant!r}; one of "
                     f"{[gpt2s_isa_names[i].decode() for i in range(GPT2S_NISA)]} or 'auto'")


def set_split_k(bint enabled):
    """Whether a one-row product x @ W with W [K, N] of a compressed type splits K over the
    team (the default) or its output columns; returns the previous setting.  For tests."""
    global _split_k
    previous = bool(_split_k)
    _split_k = enabled
    return previous


def set_direct_max_rows(rows):
    """Set the most rows of A the direct kernels take (default 32); products with more rows
    widen panels (compressed types) or call sgemm (float32).  Returns the previous value.  For
    tests."""
    global _direct_max_rows
    cdef Py_ssize_t n = _int_arg("set_direct_max_rows", "rows", rows)
    if n < 0:
        raise ValueError(f"set_direct_max_rows: direct max rows must be >= 0, got {n}")
    previous = _direct_max_rows
    _direct_max_rows = <int>min(n, INT_MAX)   # no product has more rows than an int holds
    return previous


cdef inline gpt2s_direct_fn direct_kernel(int wtype, bint out_major, int M) noexcept nogil:
    # the type's direct kernel for M rows, or NULL (then BLAS, or the panel route)
    if M < gpt2s_wtypes[wtype].direct_min_rows or M > _direct_max_rows:
        return NULL
    return gpt2s_wtype_direct(wtype, out_major, gpt2s_wtype_variant[wtype])


cdef inline const void *weight_at(int wtype, const void *W, int64_t weights) noexcept nogil:
    # the stored weight `weights` weights into a row-major array (a block boundary for the
    # blocked types)
    return <const char *>W + gpt2s_wtype_bytes(wtype, weights)


cdef int weight_serial(int wtype, bint out_major, int M, int n, int K, const float *A,
                       int lda, const void *W, int ldw, const uint16_t *S, bint accumulate,
                       float *C, int ldc) noexcept nogil:
    # C[:, 0:n] (+)= A (M, K) @ W for n output columns, on the calling thread, W of a
    # compressed type (W and S point at the first of the columns).  Returns -1 when the panel
    # buffer cannot be allocated.
    cdef int P, j0, p, m, nb = K // gpt2s_wtypes[wtype].block if gpt2s_wtypes[wtype].block else 0
    cdef float *buf
    cdef float beta = 1.0 if accumulate else 0.0
    cdef gpt2s_direct_fn direct
    cdef gpt2s_widen_fn widen
    if M <= 0 or n <= 0:
        return 0
    if K <= 0:   # an empty sum
        if not accumulate:
            for m in range(M):
                memset(C + <int64_t>m * ldc, 0, n * sizeof(float))
        return 0
    direct = direct_kernel(wtype, out_major, M)
    if direct != NULL:
        direct(M, n, K, A, lda, W, ldw, S, accumulate, C, ldc)
        return 0
    # panel route: P output columns of W at a time, widened into buf
    widen = gpt2s_wtype_widen(wtype, gpt2s_wtype_variant[wtype])
    P = <int>(PANEL_BYTES // (4 * <int64_t>K)) // 16 * 16
    P = min(max(P, 16), n)
    buf = <float *>malloc(sizeof(float) * <int64_t>P * K)
    if buf == NULL:
        return -1
    j0 = 0
    while j0 < n:
        p = min(P, n - j0)
        if out_major:   # buf (p, K) = W[j0:j0 + p, :]
            widen(buf, K, weight_at(wtype, W, <int64_t>j0 * ldw), ldw,
                  S + <int64_t>j0 * nb if S != NULL else NULL, p, K)
            gemm_serial(False, True, M, p, K, 1.0, A, lda, buf, K, beta, C + j0, ldc)
        else:           # buf (K, p) = W[:, j0:j0 + p]
            widen(buf, p, weight_at(wtype, W, j0), ldw, NULL, K, p)
            gemm_serial(False, False, M, p, K, 1.0, A, lda, buf, p, beta, C + j0, ldc)
        j0 = j0 + p
    free(buf)
    return 0


cdef struct weight_rows_ctx:
    int wtype
    const float *a
    const void *W
    int ldw


cdef void weight_rows_partial(const void *ctx, int lo, int hi, float *part, int N) noexcept nogil:
    # part (N,) = a[lo:hi] @ W[lo:hi, :] (the rows of an input-major W)
    cdef const weight_rows_ctx *c = <const weight_rows_ctx *>ctx
    weight_serial(c.wtype, False, 1, N, hi - lo, c.a + lo, hi - lo,
                  weight_at(c.wtype, c.W, <int64_t>lo * c.ldw), c.ldw, NULL, False, part, N)


cdef int weight_gemm(int wtype, bint out_major, int M, int N, int K, const float *A, int lda,
                     const void *W, int ldw, const uint16_t *S, bint accumulate, float *C,
                     int ldc) noexcept nogil:
    # C (M, N) (+)= A (M, K) @ W on the team: float32 by gemm; the other types by
    # weight_serial on blocks of output columns (blocks of rows of an output-major W: each
    # thread streams its own contiguous part of the weight), or, for one row of an
    # input-major W, on blocks of K (split_k).  Returns -1 when out of memory.
    cdef int nt, failed = 0
    cdef int64_t blk, lo, hi, step, nblocks   # 64 bits: N + nt - 1 may pass INT_MAX
    cdef int nb = K // gpt2s_wtypes[wtype].block if gpt2s_wtypes[wtype].block else 0
    cdef weight_rows_ctx ctx
    if wtype == GPT2S_WTYPE_F32:
        gemm(False, out_major, M, N, K, 1.0, A, lda, <const float *>W, ldw,
             1.0 if accumulate else 0.0, C, ldc)
        return 0
    nt = threads_for(<double>M * N * K)
    if nt <= 1 or M <= 0 or N <= 0 or K <= 0:
        return weight_serial(wtype, out_major, M, N, K, A, lda, W, ldw, S, accumulate, C, ldc)
    if not out_major and M == 1 and _split_k and K >= 64 * nt:
        ctx.wtype, ctx.a, ctx.W, ctx.ldw = wtype, A, W, ldw
        return split_k(nt, N, K, 4, weight_rows_partial, &ctx, C, 1.0 if accumulate else 0.0,
                       True)
    step = ((<int64_t>N + nt - 1) // nt + 15) // 16 * 16
    nblocks = (N + step - 1) // step
    for blk in prange(nblocks, num_threads=nt, schedule='static'):
        lo = blk * step
        hi = min(<int64_t>N, lo + step)
        if out_major:
            failed += weight_serial(wtype, True, M, <int>(hi - lo), K, A, lda,
                                    weight_at(wtype, W, <int64_t>lo * ldw), ldw,
                                    S + <int64_t>lo * nb if S != NULL else NULL, accumulate,
                                    C + lo, ldc)
        else:
            failed += weight_serial(wtype, False, M, <int>(hi - lo), K, A, lda,
                                    weight_at(wtype, W, lo), ldw, NULL, accumulate, C + lo,
                                    ldc)
    return -1 if failed else 0


# ---------------------------------------------------------------------- stored weights

cdef class PackedWeight:
    """A weight stored in a type of the table other than float32: ``data``, its stored
    elements (uint16 bfloat16 bits, int8 blocks, two 4-bit weights a byte, ...) in the type's
    layout, ``scales`` (fp16 bits, [rows of data][weights per row / block]) for a blocked
    type, and the shape of the float32 tensor it stands for.  ``transposed``: data holds the
    tensor transposed (an output-major type's Conv1D weight [in, out] is stored [out][in]).
    np.asarray(w) widens it to that float32 tensor."""

    cdef readonly int wtype
    cdef readonly object data
    cdef readonly object scales
    cdef readonly tuple shape
    cdef readonly bint transposed
    cdef const void *ptr
    cdef const uint16_t *sptr
    cdef int rows, cols              # of the stored layout, in weights

    def __init__(self, int wtype, data, scales, shape, bint transposed):
        cdef int block, per
        cdef const uint16_t[:, ::1] s
        if not 0 < wtype < GPT2S_NWTYPES:
            raise ValueError(f"PackedWeight: weight type id {wtype} is not a packed type")
        name = gpt2s_wtypes[wtype].name.decode()
        store = _STORE_DTYPES[gpt2s_wtypes[wtype].store]
        if not (isinstance(data, np.ndarray) and data.dtype == store and data.ndim == 2
                and data.flags.c_contiguous):
            raise ValueError(f"PackedWeight: {name} data must be a C-contiguous 2-D {store} "
                             f"array")
        per = gpt2s_wtype_per_element(wtype)
        rows, cols = int(data.shape[0]), int(data.shape[1]) * per
        shape = tuple(int(d) for d in shape)
        if shape != ((cols, rows) if transposed else (rows, cols)):
            raise ValueError(f"PackedWeight: {name} data {tuple(data.shape)} does not hold a "
                             f"tensor {shape} (transposed={bool(transposed)})")
        block = gpt2s_wtypes[wtype].block
        if block:
            if cols % block:
                raise ValueError(f"PackedWeight: {name} needs rows of a multiple of {block} "
                                 f"weights, got {cols}")
            if scales is None or scales.shape != (rows, cols // block):
                raise ValueError(f"PackedWeight: scales must have shape {(rows, cols // block)}")
            s = scales
            self.sptr = &s[0, 0] if s.shape[0] * s.shape[1] > 0 else NULL
        elif scales is not None:
            raise ValueError(f"PackedWeight: {name} has no scales")
        if rows > INT_MAX or cols > INT_MAX:
            raise ValueError(f"PackedWeight: {rows} x {cols} exceeds 2**31 - 1 rows or columns")
        self.wtype, self.data, self.scales, self.shape = wtype, data, scales, shape
        self.transposed = transposed
        self.rows, self.cols = rows, cols
        self.ptr = <const void *><size_t>data.ctypes.data

    @property
    def dtype(self):
        """float32: the dtype of np.asarray(w)."""
        return np.dtype(np.float32)

    @property
    def size(self):
        return self.rows * self.cols

    @property
    def ndim(self):
        return 2

    @property
    def nbytes(self):
        return self.data.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    @property
    def type_name(self):
        return gpt2s_wtypes[self.wtype].name.decode()

    def __array__(self, dtype=None, copy=None):
        out = np.empty((self.rows, self.cols), np.float32)
        widen_into(out, self)
        if self.transposed:
            out = np.ascontiguousarray(out.T)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self):
        return (f"PackedWeight({self.type_name}, shape={self.shape}, "
                f"transposed={bool(self.transposed)})")


def quantize_into(PackedWeight w, const float[:, ::1] x, row0=0):
    """Store float32 x into w: x is the whole float32 tensor (x.shape == w.shape), or, for a
    weight stored untransposed, rows row0 .. row0 + len(x) of it (a big embedding converted a
    few rows at a time).  Raises ValueError when a value cannot be stored (non-finite, or too
    large for the type's scales)."""
    cdef int t = w.wtype, bad = 0, nt
    cdef int64_t N, K, sn, sk, lo, blk, step = 64, nb
    cdef Py_ssize_t first = _int_arg("quantize_into", "row0", row0)
    cdef const float *src
    cdef char *dst
    cdef int64_t row_bytes = gpt2s_wtype_bytes(t, w.cols)
    cdef int block = gpt2s_wtypes[t].block
    cdef gpt2s_quantize_fn quantize = gpt2s_wtypes[t].quantize
    if w.transposed:
        if first != 0 or (x.shape[1], x.shape[0]) != (w.rows, w.cols):
            raise ValueError(f"quantize_into: x ({x.shape[0]},{x.shape[1]}), row0={first} for a "
                             f"weight {w.shape} stored transposed (whole tensors only)")
        N, K, sn, sk = w.rows, w.cols, 1, w.rows
    else:
        if x.shape[1] != w.cols or _span_outside(first, x.shape[0], w.rows):
            raise ValueError(f"quantize_into: rows {first}..{first}+{x.shape[0]} of width "
                             f"{x.shape[1]} into a weight of {w.rows} rows of {w.cols}")
        N, K, sn, sk = x.shape[0], w.cols, w.cols, 1
    if N == 0 or K == 0:
        return
    nb = K // block if block else 0
    src = &x[0, 0]
    dst = <char *>w.ptr + first * row_bytes
    nt = threads_for(<double>N * K)
    with nogil:
        for blk in prange((N + step - 1) // step, num_threads=nt, schedule='static'):
            lo = blk * step
            bad += quantize(dst + lo * row_bytes,
                            <uint16_t *>w.sptr + (first + lo) * nb if block else NULL,
                            src + lo * sn, min(step, N - lo), K, sn, sk) != 0
    if bad:
        raise ValueError(f"quantize_into: the tensor holds a non-finite value or one too large "
                         f"for {gpt2s_wtypes[t].name.decode()} weights")


def widen_into(float[:, ::1] out, PackedWeight w):
    """out (rows, cols) float32 = the stored elements of w as they are laid out (transposed
    for a transposed weight), exact for bfloat16, scale x integer for the blocked types."""
    cdef int t = w.wtype, nt
    cdef int64_t lo, blk, step = 64, nb = w.cols // gpt2s_wtypes[t].block if gpt2s_wtypes[t].block else 0
    cdef gpt2s_widen_fn widen = gpt2s_wtype_widen(t, GPT2S_ISA_PORTABLE)
    if out.shape[0] != w.rows or out.shape[1] != w.cols:
        raise ValueError(f"widen_into: out ({out.shape[0]},{out.shape[1]}) for stored "
                         f"({w.rows},{w.cols})")
    if w.rows == 0 or w.cols == 0:
        return
    nt = threads_for(<double>w.rows * w.cols)
    with nogil:
        for blk in prange((w.rows + step - 1) // step, num_threads=nt, schedule='static'):
            lo = blk * step
            widen(&out[lo, 0], w.cols, weight_at(t, w.ptr, lo * w.cols), w.cols,
                  w.sptr + lo * nb if w.sptr != NULL else NULL, min(step, w.rows - lo), w.cols)
