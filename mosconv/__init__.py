"""mosconv: convert trained LoRA adapters into Mixture-of-Shards adapters (arXiv 2410.00938).

The pipeline reads left to right::

    readers -> factorize -> (truncation baseline) -> fit pools and routes -> MoS format + report

Library code never prints and never imports click; optional extras (transformers,
peft) are imported only inside the modules that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import LoraAdapter, LoraModule
from .errors import ConfigError, FormatError, MosconvError, UnsupportedAdapterError
from .factorize import Factorization, factorize, factorize_adapter
from .readers import read_adapter
from .truncation import Truncation, truncate

__all__ = [
    "ConfigError",
    "Factorization",
    "FormatError",
    "LoraAdapter",
    "LoraModule",
    "MosconvError",
    "Truncation",
    "UnsupportedAdapterError",
    "__version__",
    "factorize",
    "factorize_adapter",
    "read_adapter",
    "truncate",
]
