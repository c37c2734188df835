"""gsa_compile: Gated Slot Attention kernels generated from a tile IR, for torch.compile."""
from .api import abc_gate, chunk_gsa
from .reference import parallel_gsa, recurrent_gsa
from .spec import GateLayout

__all__ = ["GateLayout", "abc_gate", "chunk_gsa", "parallel_gsa", "recurrent_gsa"]
__version__ = "0.1.0"
