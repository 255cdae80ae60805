"""gpt2s: GPT-2 forward, backward, AdamW and generation in Cython/OpenMP kernels."""

import os as _os

__version__ = "0.1.0"

# libgomp's idle workers spin for ~300k iterations by default before sleeping; between our
# kernels they would spin against other work (DESIGN.md, GEMM note).  A short spin still
# bridges back-to-back kernel calls.  Read once, when libgomp loads: a user's setting wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from ._threads import get_num_threads, init as _init_threads, set_num_threads, show_config  # noqa: E402
from .config import GPT2Config  # noqa: E402
from .model import GPT2  # noqa: E402
from .optim import AdamW, clip_grad_norm  # noqa: E402
from .tokenizer import get_tokenizer  # noqa: E402
from .weights import SafetensorsError  # noqa: E402

_init_threads()

__all__ = ["GPT2", "GPT2Config", "AdamW", "clip_grad_norm", "SafetensorsError",
           "set_num_threads", "get_num_threads", "show_config", "get_tokenizer", "__version__"]
