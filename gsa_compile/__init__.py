"""gsa_compile: Gated Slot Attention kernels generated from a tile IR, for torch.compile."""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():  # no GPU: the generated kernels run in Triton's interpreter (CPU tensors)
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .api import abc_gate, chunk_gsa, recurrent_step
from .context_parallel import chunk_gsa_cp
from .layer import GatedSlotAttention, GSACache
from .mods import GSAMods
from .reference import parallel_gsa, recurrent_gsa
from .spec import GateLayout

__all__ = ["GSACache", "GSAMods", "GateLayout", "GatedSlotAttention", "abc_gate", "chunk_gsa", "chunk_gsa_cp",
           "parallel_gsa", "recurrent_gsa", "recurrent_step"]
__version__ = "0.1.0"
