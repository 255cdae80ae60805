"""gpt2s: GPT-2 forward, backward, AdamW and generation in Cython/OpenMP kernels."""

__version__ = "0.1.0"

from ._threads import get_num_threads, init as _init_threads, set_num_threads, show_config
from .config import GPT2Config
from .model import GPT2
from .llama_config import LlamaConfig
from .llama import LlamaForCausalLM
from .neox_config import GPTNeoXConfig
from .neox import GPTNeoXForCausalLM
from .auto import AutoModelForCausalLM
from .optim import AdamW, clip_grad_norm
from .tokenizer import get_tokenizer
from .weights import SafetensorsError

_init_threads()

__all__ = ["GPT2", "GPT2Config", "LlamaForCausalLM", "LlamaConfig",
           "GPTNeoXForCausalLM", "GPTNeoXConfig", "AutoModelForCausalLM", "AdamW", "clip_grad_norm", "SafetensorsError",
           "set_num_threads", "get_num_threads", "show_config", "get_tokenizer", "__version__"]
