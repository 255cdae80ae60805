"""Data-parallel training over MPI: N processes compute what one process with the whole
global batch computes.

    mpiexec -n 2 python my_loop.py          # each rank runs the same script

    from gpt2s import GPT2, GPT2Config, AdamW
    from gpt2s.distributed import DataParallel
    model = GPT2.from_config(GPT2Config.preset("mini"), seed=0)
    dp = DataParallel(model)                 # MPI.COMM_WORLD
    dp.broadcast_parameters()                # rank 0's weights everywhere
    dp.check_consistent(data=fingerprint, lr=3e-4)
    opt = AdamW(model, lr=3e-4)
    for step in range(steps):
        x, y = dp.shard(*global_batch(step))     # this rank's rows of the global batch
        model.zero_grad()
        loss = dp.forward(x, y)              # the global mean loss, same on every rank
        dp.backward()                        # gradients averaged over all ranks
        dp.clip_grad_norm(1.0)
        opt.step()

The math is the single process's: each rank's backward divides its summed loss by the
*global* number of valid (non -1) targets, so summing the ranks' gradients gives the gradient
of the global mean loss, however the ignored targets fall over the ranks.  The sum runs on the
one contiguous gradient buffer in buckets: a bucket's non-blocking ``Iallreduce`` starts as
soon as the backward has finished the blocks it holds (the buffer is laid out wte, wpe,
h.0 .. h.L-1, ln_f and the backward runs ln_f, h.L-1 .. h.0, then the embeddings), so the
reduction of the last blocks overlaps the backward of the first ones.

Every wait on the other ranks has a deadline (``timeout``): a rank that died or hung makes the
others print what they were waiting for and abort the whole job (``MPI.COMM_WORLD.Abort``)
instead of hanging forever.

mpi4py is imported by this module only; ``import gpt2s`` never imports it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib

import numpy as np

from . import _core

__all__ = ["DataParallel", "world_size_from_env", "ranks_on_this_node", "default_threads",
           "EXIT_TIMEOUT"]

# the exit status a rank aborts the job with when a peer did not answer in time
EXIT_TIMEOUT = 14

# Environment variables launchers set in every process they start: MPICH/Hydra and Intel MPI
# (PMI_SIZE), Open MPI (OMPI_COMM_WORLD_SIZE), MVAPICH (MV2_COMM_WORLD_SIZE), PMIx-based
# launchers (PMIX_SIZE); Slurm's srun (SLURM_NTASKS, inside a job step) starts MPI ranks
# directly with --mpi=pmi2/pmix.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")


def world_size_from_env(environ=None) -> int:
    """The MPI world size a launcher announced in the environment (1 when none did).

    Reads PMI_SIZE (MPICH, Intel MPI), OMPI_COMM_WORLD_SIZE (Open MPI), MV2_COMM_WORLD_SIZE
    (MVAPICH), PMIX_SIZE, and SLURM_NTASKS when SLURM_PROCID is set (a task started by srun).
    Lets a script decide whether to import mpi4py at all without importing it."""
    env = os.environ if environ is None else environ
    names = list(_SIZE_VARS)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        names.append("SLURM_NTASKS")
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                continue
            if n >= 1:
                return n
    return 1


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("gpt2s.distributed needs mpi4py and an MPI library: "
                          "pip install 'gpt2s[mpi]' (or build mpi4py against your cluster's "
                          f"MPI) ({e})") from None
    return MPI


def ranks_on_this_node(comm=None) -> int:
    """How many ranks of comm share this node (its shared-memory split)."""
    MPI = _mpi()
    comm = MPI.COMM_WORLD if comm is None else comm
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_size()
    finally:
        local.Free()


def default_threads(comm=None) -> int:
    """Kernel threads per rank so the ranks on a node share its cores without
    oversubscribing: the cores this process may use divided by the ranks on the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // ranks_on_this_node(comm))


class DataParallel:
    """Data parallel over an MPI communicator for one model (see the module doc): a ``GPT2``,
    or another family's (``LlamaForCausalLM``) with the same training methods
    (``forward(..., return_logits=False)``, ``pending_backward``, ``backward(normalizer=,
    on_layer_done=)``, ``store``).

    comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).  overlap: start each bucket's
    reduction during the backward (False: reduce the same buckets after it, for comparison).
    bucket_mb: the smallest bucket, in MB of float32 gradients (buckets end at block
    boundaries).  timeout: seconds any wait on the other ranks may take before this rank aborts
    the job.

    After ``backward()``: ``last_backward_s`` is the time the model's backward took,
    ``last_wait_s`` the time spent afterwards waiting for reductions still running (the
    communication overlap did not hide).
    """

    def __init__(self, model, comm=None, *, overlap: bool = True, bucket_mb: float = 25.0,
                 timeout: float = 300.0):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        if not (timeout > 0):
            raise ValueError(f"DataParallel: timeout must be > 0 seconds, got {timeout!r}")
        if not (bucket_mb > 0):
            raise ValueError(f"DataParallel: bucket_mb must be > 0, got {bucket_mb!r}")
        self.model = model
        self.overlap = bool(overlap)
        self.timeout = float(timeout)
        model.grads  # the gradient buffer exists from here on
        self._plan_buckets(int(bucket_mb * 1e6) // 4)
        self._counted = None        # the model's pending_backward whose global count is known
        self._global_valid = 0
        self.last_backward_s = 0.0
        self.last_wait_s = 0.0

    # ------------------------------------------------------------------ buckets

    def _plan_buckets(self, min_floats: int):
        """Buckets are contiguous ranges of the gradient buffer ending at block boundaries.
        After block l's backward, [start of h.l, end) is final; a bucket is cut there once
        the not-yet-sent final region holds min_floats.  The rest (embeddings and the blocks
        not yet sent) is one last bucket after the backward."""
        layout = self.model.store.layout
        total = self.model.store.grad_buffer.size
        L = self.model.config.n_layer
        block_start = [None] * L
        # the block of a tensor: a family's config says (layer_of), GPT-2's are "h.N."
        layer_of = getattr(self.model.config, "layer_of", None)
        for name, _shape, off in layout:
            if layer_of is not None:
                block = layer_of(name)
                l = None if block is None else block[0]
            else:
                l = int(name.split(".")[1]) if name.startswith("h.") else None
            if l is not None:
                block_start[l] = off if block_start[l] is None else min(block_start[l], off)
        self._after_layer = {}
        pending_end = total
        for l in reversed(range(L)):
            if pending_end - block_start[l] >= min_floats:
                self._after_layer[l] = (block_start[l], pending_end)
                pending_end = block_start[l]
        self._last_bucket = (0, pending_end)
        self.buckets = sorted([*self._after_layer.values(), self._last_bucket], reverse=True)

    def _start(self, bucket):
        lo, hi = bucket
        buf = self.model.store.grad_buffer[lo:hi]
        return self.comm.Iallreduce(self.MPI.IN_PLACE, [buf, self.MPI.FLOAT], op=self.MPI.SUM)

    # ------------------------------------------------------------------ waiting with a deadline

    def _wait(self, requests, what: str):
        """Wait for every request; past the deadline, say what was pending and abort the job
        (a blocking Wait would hang forever if a peer died without the launcher noticing)."""
        MPI = self.MPI
        deadline = time.monotonic() + self.timeout
        spins = 0
        while not MPI.Request.Testall(requests):
            spins += 1
            if spins > 2000:
                # after a short spin, give the core to whoever needs it (other ranks may share
                # it); each Testall call still drives MPI's progress
                if hasattr(os, "sched_yield"):
                    os.sched_yield()
                if time.monotonic() > deadline:
                    self._abort(f"{what} did not complete within {self.timeout:g} s; another "
                                f"rank has probably died or hung")

    def _abort(self, message: str):
        self.abort(f"{message}; aborting the job (exit status {EXIT_TIMEOUT})", EXIT_TIMEOUT)

    def _allreduce(self, values: np.ndarray, what: str) -> np.ndarray:
        values = np.ascontiguousarray(values)
        out = np.empty_like(values)
        self._wait([self.comm.Iallreduce(values, out, op=self.MPI.SUM)], what)
        return out

    def _allgather_bytes(self, data: bytes, what: str) -> list[bytes]:
        lengths = np.zeros(self.size, np.int64)
        self._wait([self.comm.Iallgather(np.array([len(data)], np.int64), lengths)], what)
        recv = np.empty(int(lengths.sum()), np.uint8)
        counts = [int(n) for n in lengths]
        displs = [int(d) for d in np.concatenate([[0], np.cumsum(lengths)[:-1]])]
        send = np.frombuffer(data, np.uint8) if data else np.empty(0, np.uint8)
        self._wait([self.comm.Iallgatherv(send, [recv, counts, displs, self.MPI.BYTE])], what)
        return [recv[d:d + n].tobytes() for d, n in zip(displs, counts)]

    def max_int(self, value: int) -> int:
        """The largest of the ranks' integers, on every rank (e.g. to agree on stopping:
        a signal may reach some ranks a step earlier than others)."""
        out = np.zeros(1, np.int64)
        self._wait([self.comm.Iallreduce(np.array([int(value)], np.int64), out,
                                         op=self.MPI.MAX)], "an agreement between the ranks")
        return int(out[0])

    def abort(self, message: str, status: int = 1):
        """Print message (naming this rank) and end every rank of the job with status."""
        print(f"gpt2s.distributed: rank {self.rank} of {self.size}: {message}", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        # the launcher forwards each rank's output through its proxies and tears the job down
        # on Abort: give it a moment to pass this message on first (on a loaded machine the
        # message was lost)
        time.sleep(0.5)
        self.MPI.COMM_WORLD.Abort(status)
        os._exit(status)  # pragma: no cover - Abort does not return

    def barrier(self):
        """Wait (with the deadline) until every rank gets here."""
        self._wait([self.comm.Ibarrier()], "a barrier")

    # ------------------------------------------------------------------ setup

    def broadcast(self, array: np.ndarray, root: int = 0):
        """Overwrite a contiguous array with root's copy on every rank (one Ibcast)."""
        if not (isinstance(array, np.ndarray) and array.flags.c_contiguous):
            raise TypeError("broadcast: needs a C-contiguous NumPy array")
        self._wait([self.comm.Ibcast(array, root=root)], f"broadcast from rank {root}")

    def broadcast_parameters(self, root: int = 0):
        """Give every rank root's parameters: one broadcast of the contiguous buffer."""
        self.broadcast(self.model.store.buffer, root)
        self.model.store.refresh_compute_weights()   # compute_dtype "bfloat16": its copy

    def check_consistent(self, **fields):
        """Refuse (ValueError on every rank) unless every rank holds the same model config
        and the same ``fields`` (options, data fingerprints: anything JSON-serialisable; other
        values are compared by ``str``).  The error names the first differing rank and field."""
        from dataclasses import asdict
        mine = {"config": asdict(self.model.config), "world_size": self.size, **fields}
        blob = json.dumps(mine, sort_keys=True, default=str).encode()
        everyone = [json.loads(b) for b in self._allgather_bytes(blob, "the consistency check")]
        ref = everyone[0]
        for r, theirs in enumerate(everyone[1:], start=1):
            for key in sorted(set(ref) | set(theirs)):
                mine0, mine_r = ref.get(key, "<missing>"), theirs.get(key, "<missing>")
                if mine0 != mine_r:
                    raise ValueError(
                        f"data parallel: rank {r} differs from rank 0 in {key!r}: rank {r} has "
                        f"{mine_r!r}, rank 0 has {mine0!r}; every rank must run with the same "
                        f"model, data and options")

    def parameters_in_sync(self) -> bool:
        """Whether every rank holds bit-identical parameters (a CRC-32 per rank, gathered)."""
        crc = zlib.crc32(memoryview(self.model.store.buffer).cast("B"))
        crcs = self._allgather_bytes(crc.to_bytes(4, "little"), "the parameter check")
        return len(set(crcs)) == 1

    # ------------------------------------------------------------------ the step

    def shard(self, *arrays):
        """This rank's rows of each global-batch array (leading dimension B): rank r takes
        rows [r B/N, (r+1) B/N).  B must be a multiple of the world size N."""
        out = []
        for i, a in enumerate(arrays):
            a = np.asarray(a)
            if a.ndim == 0 or a.shape[0] % self.size:
                raise ValueError(f"shard: array {i} has shape {a.shape}; its batch dimension "
                                 f"must be a multiple of the {self.size} ranks")
            per = a.shape[0] // self.size
            out.append(a[self.rank * per:(self.rank + 1) * per])
        return out[0] if len(out) == 1 else tuple(out)

    def forward(self, idx, targets) -> float:
        """model.forward on this rank's shard, then the global mean loss (the same value on
        every rank: the summed losses and valid-target counts of all ranks, reduced)."""
        model = self.model
        _, loss = model.forward(idx, targets, return_logits=False)
        record = model.pending_backward
        n_local = record.n_valid
        local_sum = loss * n_local if n_local else 0.0
        total = self._allreduce(np.array([local_sum, n_local], np.float64), "the loss reduction")
        self._counted, self._global_valid = record, int(total[1])
        return float(total[0] / total[1]) if total[1] else float("nan")

    def _global_count(self) -> int:
        record = self.model.pending_backward
        if record is None:
            raise RuntimeError("DataParallel.backward() needs a preceding forward with targets "
                               "on this rank")
        if self._counted is not record:
            n = self._allreduce(np.array([record.n_valid], np.int64), "the valid-target count")
            self._counted, self._global_valid = record, int(n[0])
        if self._global_valid == 0:
            raise RuntimeError("backward(): every target of the global batch was -1 (ignored) "
                               "on every rank; the loss is undefined")
        return self._global_valid

    def backward(self, sync: bool = True):
        """Backward of this rank's shard with the loss divided by the global valid-target
        count, then (sync=True) the sum over ranks of the gradient buffer, which is then the
        gradient of the global mean loss on every rank.  With gradient accumulation pass
        sync=False for all micro-batches but the last: their gradients accumulate locally and
        the last one's reduction carries them all."""
        model, MPI = self.model, self.MPI
        n = self._global_count()
        self._counted = None
        t0 = time.perf_counter()
        if not sync or self.size == 1:
            model.backward(normalizer=n)
            self.last_backward_s, self.last_wait_s = time.perf_counter() - t0, 0.0
            return
        requests = []
        if self.overlap:
            after = self._after_layer

            def layer_done(l):
                if l in after:
                    requests.append(self._start(after[l]))
                if requests:
                    MPI.Request.Testall(requests)   # MPI progresses only inside MPI calls

            model.backward(normalizer=n, on_layer_done=layer_done)
            requests.append(self._start(self._last_bucket))
        else:
            model.backward(normalizer=n)
            requests = [self._start(b) for b in self.buckets]
        t1 = time.perf_counter()
        self._wait(requests, "the gradient reduction")
        self.last_backward_s, self.last_wait_s = t1 - t0, time.perf_counter() - t1

    def grad_norm(self) -> float:
        """The global L2 norm of the (reduced) gradients, bit-identical on every rank: each
        rank sums the squares of its 1/N of the buffer and the N partial sums are added in rank
        order everywhere (a local norm could round differently on ranks with different thread
        counts, and the ranks' parameters would drift apart)."""
        buf = self.model.store.grad_buffer
        per = -(-buf.size // self.size)
        lo, hi = min(buf.size, self.rank * per), min(buf.size, (self.rank + 1) * per)
        part = _core.sum_squares(buf[lo:hi]) if hi > lo else 0.0
        parts = np.zeros(self.size, np.float64)
        self._wait([self.comm.Iallgather(np.array([part], np.float64), parts)],
                   "the gradient-norm reduction")
        return float(np.sqrt(sum(float(p) for p in parts)))

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global-norm clipping of the reduced gradients (as ``gpt2s.clip_grad_norm``, with
        the norm of ``grad_norm()``); returns the norm before clipping."""
        if not (max_norm > 0):
            raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
        norm = self.grad_norm()
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            _core.scale_inplace(self.model.store.grad_buffer, coef)
        return norm
