"""ESSA: Evolutionary Strategies for Scalable Alignment.

Gradient-free alignment of language models: CMA-ES searches the singular values of an
SVD-decomposed LoRA adapter, scoring candidates only by running the model forward.

`essa.ESSATrainer` and `essa.ESSAConfig` (TRL GRPOTrainer-shaped) load on first use, so
`import essa` stays light.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["ESSAConfig", "ESSATrainer", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("ESSAConfig", "ESSATrainer"):
        from essa import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module 'essa' has no attribute {name!r}")
