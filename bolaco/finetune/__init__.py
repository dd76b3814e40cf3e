"""Stage 4, post-training (docs/design.md, "Post-training"): LoRA (or diagonal scalings) trained inside the
compressed model's layers, optionally distilled from the dense model, checkpointed, and merged back exactly."""

from .subspace import SubspaceTuner

__all__ = ["SubspaceTuner"]
