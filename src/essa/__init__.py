"""ESSA: Evolutionary Strategies for Scalable Alignment.

Gradient-free alignment of language models: CMA-ES searches the singular values of an
SVD-decomposed LoRA adapter, scoring candidates only by running the model forward.
"""

__version__ = "0.1.0"
