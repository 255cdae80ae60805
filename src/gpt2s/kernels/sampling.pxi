# Sampling kernels (per-token work over the vocabulary), included into _core.pyx.
#
# One row of logits (V,) per sequence; rows run in parallel under prange.  Within a row:
#
#   1. top-k: the k-th largest logit is found by a binary search over the 32-bit keys of the
#      floats (a key orders like the float), each step one counting pass over V: at most 32
#      vectorised passes, no sort.  Every logit >= that value is kept (ties at the boundary
#      are all kept, so more than k survive only when logits tie exactly).
#   2. temperature: w_j = exp((x_j - max) / temperature) for the kept tokens, 0 for the others
#      (unnormalised; the max is exactly 1).
#   3. top-p (nucleus): the largest threshold t with sum_{w_j >= t} w_j >= top_p * sum_j w_j,
#      again a binary search over the bits of t (w_j >= 0, so float bits order like values),
#      each step one masked-sum pass.  The nucleus is {w_j >= t}: the smallest set of most
#      probable tokens whose probability reaches top_p (HF's definition), ties at t included.
#   4. sampling by inverse CDF: the first j whose running sum (in index order, double) exceeds
#      u * sum_j w_j, with u uniform in [0, 1) drawn by the caller (NumPy's Generator), so a
#      seed fixes every token.
#
# Logits must be finite (the caller checks).  Temperature 0 is greedy decoding: argmax_rows.

from libc.stdint cimport uint32_t

# the float <-> 32-bit key conversions of the binary searches
cdef extern from "kernels/sampling.h":
    uint32_t gpt2s_float_key(float x) noexcept nogil
    float gpt2s_key_float(uint32_t k) noexcept nogil
    float gpt2s_bits_float(uint32_t u) noexcept nogil
    uint32_t gpt2s_float_bits(float x) noexcept nogil


cdef enum:
    SUM_LANES = 16


cdef inline int row_argmax(const float *x, int V) noexcept nogil:
    # the first index of the largest value (numpy.argmax's tie rule)
    cdef int j, best = 0
    cdef float m = x[0]
    for j in range(1, V):
        if x[j] > m:
            m = x[j]
            best = j
    return best


cdef inline float row_max(const float *x, int V) noexcept nogil:
    cdef int j
    cdef float m = x[0]
    for j in range(1, V):
        m = x[j] if x[j] > m else m
    return m


cdef inline float row_min(const float *x, int V) noexcept nogil:
    cdef int j
    cdef float m = x[0]
    for j in range(1, V):
        m = x[j] if x[j] < m else m
    return m


cdef inline int count_at_least(const float *x, int V, float t) noexcept nogil:
    cdef int j, n = 0
    for j in range(V):
        n = n + (x[j] >= t)
    return n


cdef inline double sum_at_least(const float *w, int V, float t) noexcept nogil:
    # sum of w_j >= t, in SUM_LANES double partial sums so that the loop vectorises
    cdef double acc[SUM_LANES]
    cdef double s = 0.0
    cdef int j, i, nv = V - V % SUM_LANES
    cdef float wj
    for i in range(SUM_LANES):
        acc[i] = 0.0
    j = 0
    while j < nv:
        for i in range(SUM_LANES):
            wj = w[j + i]
            acc[i] = acc[i] + (wj if wj >= t else <float>0.0)
        j = j + SUM_LANES
    for j in range(nv, V):
        s = s + (w[j] if w[j] >= t else <float>0.0)
    for i in range(SUM_LANES):
        s = s + acc[i]
    return s


cdef inline float kth_largest(const float *x, int V, int k) noexcept nogil:
    # The k-th largest value of x (1 <= k <= V): the largest t with #{x_j >= t} >= k,
    # by binary search over the keys between min(x) and max(x).
    cdef uint32_t lo = gpt2s_float_key(row_min(x, V)), hi = gpt2s_float_key(row_max(x, V))
    cdef uint32_t mid
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        if count_at_least(x, V, gpt2s_key_float(mid)) >= k:
            lo = mid
        else:
            hi = mid - 1
    return gpt2s_key_float(lo)


cdef inline double filtered_weights(float *w, const float *x, int V, float inv_temp, int top_k,
                                    float top_p) noexcept nogil:
    # w (V,) = the unnormalised sampling distribution of logits x (V,) after top-k,
    # temperature and top-p (0 outside the kept set); returns sum_j w_j.
    cdef int j
    cdef float m = row_max(x, V), xk, t
    cdef double total, target
    cdef uint32_t lo, hi, mid
    if top_k > 0 and top_k < V:
        xk = kth_largest(x, V, top_k) if top_k > 1 else m
        for j in range(V):
            w[j] = gpt2s_expf((x[j] - m) * inv_temp) if x[j] >= xk else <float>0.0
    else:
        for j in range(V):
            w[j] = gpt2s_expf((x[j] - m) * inv_temp)
    total = sum_at_least(w, V, <float>0.0)
    if top_p < <float>1.0:
        target = top_p * total
        # w_j >= 0: the bits of a non-negative float order like its value.  The predicate
        # "mass of w_j >= t reaches target" holds at t = 0 and fails above max w = 1.
        lo = 0
        hi = gpt2s_float_bits(<float>1.0)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            if sum_at_least(w, V, gpt2s_bits_float(mid)) >= target:
                lo = mid
            else:
                hi = mid - 1
        t = gpt2s_bits_float(lo)
        if lo > 0:
            for j in range(V):
                w[j] = w[j] if w[j] >= t else <float>0.0
            total = sum_at_least(w, V, <float>0.0)
    return total


cdef inline int inverse_cdf(const float *w, int V, double total, double u) noexcept nogil:
    # the first j with w_0 + ... + w_j > u * total and w_j > 0; the last token with w_j > 0
    # when rounding leaves the running sum just short of the target
    cdef double target = u * total, c = 0.0
    cdef int j, last = 0
    for j in range(V):
        if w[j] > <float>0.0:
            c = c + w[j]
            last = j
            if c > target:
                return j
    return last


cdef inline int _rows_team(Py_ssize_t B, Py_ssize_t V) noexcept nogil:
    # one row per thread at most
    return <int>min(B, <Py_ssize_t>threads_for(<double>B * V))


def argmax_rows(int64_t[::1] out, const float[:, ::1] logits):
    """out (B,) = the index of the largest logit of each row of logits (B, V); the first one
    on ties (greedy decoding)."""
    cdef Py_ssize_t B = logits.shape[0], V = logits.shape[1], b
    if out.shape[0] != B:
        raise ValueError(f"argmax_rows: out has {out.shape[0]} rows, logits {B}")
    if V < 1 or _over_int(V):
        raise ValueError(f"argmax_rows: logits {_sh(logits)}: need a vocabulary of 1 to "
                         f"2^31 - 1 tokens")
    if B == 0:
        return
    for b in prange(B, nogil=True, num_threads=_rows_team(B, V), schedule='static'):
        out[b] = row_argmax(&logits[b, 0], <int>V)


cdef inline float _check_filters(str kernel, const float[:, ::1] logits, float[:, ::1] weights,
                                 float temperature, float top_p) except -1.0:
    if weights.shape[0] != logits.shape[0] or weights.shape[1] != logits.shape[1]:
        raise ValueError(f"{kernel}: weights has shape ({weights.shape[0]}, "
                         f"{weights.shape[1]}), logits ({logits.shape[0]}, {logits.shape[1]})")
    if logits.shape[1] < 1 or _over_int(logits.shape[1]):
        raise ValueError(f"{kernel}: logits {_sh(logits)}: need a vocabulary of 1 to "
                         f"2^31 - 1 tokens")
    if not (temperature > 0.0 and isfinite(temperature)):
        raise ValueError(f"{kernel}: temperature must be a finite number > 0, got "
                         f"{temperature}")
    if not (top_p > 0.0 and top_p <= 1.0):
        raise ValueError(f"{kernel}: top_p must be in (0, 1], got {top_p}")
    return <float>(1.0 / temperature)


cdef inline int _top_k(str kernel, object top_k, Py_ssize_t V) except -1:
    # top_k <= 0 or >= V keeps every token (0 here)
    cdef Py_ssize_t k = _int_arg(kernel, "top_k", top_k)
    return <int>k if 0 < k < V else 0


def sample_rows(int64_t[::1] out, const float[:, ::1] logits, const double[::1] uniforms,
                float temperature, top_k, float top_p, float[:, ::1] weights):
    """out (B,) = one token per row of logits (B, V), sampled from softmax(logits / temperature)
    restricted to the top_k largest logits (top_k <= 0: all) and then to the top_p nucleus
    (top_p = 1: all), by inverse CDF with uniforms (B,) in [0, 1).  weights (B, V) is scratch;
    on return it holds each row's unnormalised filtered distribution."""
    cdef Py_ssize_t B = logits.shape[0], b
    cdef float inv_temp = _check_filters("sample_rows", logits, weights, temperature, top_p)
    cdef int V = <int>logits.shape[1]
    cdef int k = _top_k("sample_rows", top_k, V)
    cdef double total
    if out.shape[0] != B or uniforms.shape[0] != B:
        raise ValueError(f"sample_rows: out has {out.shape[0]} rows, uniforms "
                         f"{uniforms.shape[0]}, logits {B}")
    if B == 0:
        return
    for b in prange(B, nogil=True, num_threads=_rows_team(B, V), schedule='static'):
        total = filtered_weights(&weights[b, 0], &logits[b, 0], V, inv_temp, k, top_p)
        out[b] = inverse_cdf(&weights[b, 0], V, total, uniforms[b])


def sampling_distribution(float[:, ::1] probs, const float[:, ::1] logits, float temperature,
                          top_k, float top_p):
    """probs (B, V) = the distribution sample_rows draws from for each row of logits (B, V):
    softmax(logits / temperature) after top-k and top-p filtering, normalised."""
    cdef Py_ssize_t B = logits.shape[0], b
    cdef float inv_temp = _check_filters("sampling_distribution", logits, probs, temperature,
                                         top_p)
    cdef int V = <int>logits.shape[1], j
    cdef int k = _top_k("sampling_distribution", top_k, V)
    cdef double total
    cdef float scale
    cdef float *p
    if B == 0:
        return
    for b in prange(B, nogil=True, num_threads=_rows_team(B, V), schedule='static'):
        p = &probs[b, 0]
        total = filtered_weights(p, &logits[b, 0], V, inv_temp, k, top_p)
        scale = <float>(1.0 / total)
        for j in range(V):
            p[j] = p[j] * scale
