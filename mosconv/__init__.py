"""mosconv: convert trained LoRA adapters into Mixture-of-Shards adapters (arXiv 2410.00938).

The pipeline reads left to right::

    readers -> factorize -> (truncation baseline) -> fit pools and routes -> MoS format + report

Library code never prints and never imports click; optional extras (transformers,
peft) are imported only inside the modules that need them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import (
    ConfigError,
    FormatError,
    MosconvError,
    NumericalError,
    UnsupportedAdapterError,
)

# The rest imports torch: loaded on first use, so that `mosconv --help` and the batch
# bookkeeping (what is done, what to skip) start without paying for torch.
_LAZY = {
    "LoraAdapter": "lora.types", "LoraModule": "lora.types",
    "Factorization": "fit.factorize", "factorize": "fit.factorize",
    "factorize_adapter": "fit.factorize",
    "read_adapter": "lora.read",
    "Truncation": "fit.truncation", "truncate": "fit.truncation",
    "apply": "model.runtime", "remove": "model.runtime", "merge": "model.runtime",
    "set_active": "model.runtime", "adapter_names": "model.runtime",
    "active_adapter": "model.runtime", "trainable_parameters": "model.runtime",
    "AdapterLayer": "model.runtime", "memory_report": "model.runtime",
    "set_factor_cache": "model.runtime",
    "load_base_model": "model.hf",
    "ConvertConfig": "fit.convert", "ConvertResult": "fit.convert", "convert": "fit.convert",
    "MosAdapter": "mos.types", "save_mos": "mos.format", "load_mos": "mos.format",
    "fit_group": "fit.zoo", "fit_new_members": "fit.zoo", "GroupResult": "fit.zoo",
    "GroupTotals": "fit.zoo",
    "run_batch": "batch.run", "BatchConfig": "batch.run", "Summary": "batch.run",
    "Outcome": "batch.run", "ZooTotals": "batch.run",
    # torch-free: the typed report and reading it from a MoS folder
    "Report": "fit.report", "load_report": "mos.manifest",
}


def __getattr__(name: str) -> Any:
    """A name of ``_LAZY``, imported from its module on first use (PEP 562): a class or a
    function, which differ per name, hence ``Any``."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mosconv' has no attribute {name!r}")

__all__ = [
    "AdapterLayer",
    "BatchConfig",
    "ConfigError",
    "ConvertConfig",
    "ConvertResult",
    "Factorization",
    "FormatError",
    "GroupResult",
    "GroupTotals",
    "LoraAdapter",
    "LoraModule",
    "MosAdapter",
    "MosconvError",
    "NumericalError",
    "Outcome",
    "Report",
    "Summary",
    "Truncation",
    "UnsupportedAdapterError",
    "ZooTotals",
    "__version__",
    "active_adapter",
    "adapter_names",
    "apply",
    "convert",
    "factorize",
    "factorize_adapter",
    "fit_group",
    "fit_new_members",
    "load_base_model",
    "load_mos",
    "load_report",
    "memory_report",
    "merge",
    "read_adapter",
    "remove",
    "run_batch",
    "save_mos",
    "set_active",
    "set_factor_cache",
    "trainable_parameters",
    "truncate",
]
