"""bolaco: feature-space low-rank compression of causal LMs with a Bayesian-optimised rank allocation."""

__version__ = "0.1.0"


def load(path, device=None):
    """Load an exported bolaco model: returns (model, tokenizer); the model is a transformers
    PreTrainedModel whose compressed projections are LowRankLinear layers."""
    from .export import load_compressed
    return load_compressed(path, device=device)
