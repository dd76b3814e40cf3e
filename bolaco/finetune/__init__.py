"""Stage 4, post-training (DESIGN 2.8): LoRA or diagonal scalings trained inside the low-rank subspace of a
compressed model, optionally distilled from the dense model, checkpointed, and merged back exactly."""

from .subspace import SubspaceTuner

__all__ = ["SubspaceTuner"]
