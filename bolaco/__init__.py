"""bolaco: feature-space low-rank compression of causal LMs with a Bayesian-optimised rank allocation."""

from ._version import __version__

__all__ = ["__version__", "load"]


def load(path=None, device=None, dtype=None, fuse=True):
    """Load a model as bolaco sees it: returns (model, tokenizer). An exported bolaco folder (it holds
    bolaco.json) loads as the compressed model, whose projections are LowRankLinear layers; anything else (a
    Hugging Face id, a model directory, a .gguf file, None or 'default') loads as a dense model. `fuse`: see
    bolaco.export.load_compressed."""
    from pathlib import Path
    if path is not None and (Path(str(path)).expanduser() / "bolaco.json").is_file():
        from .export import load_compressed
        return load_compressed(path, device=device, dtype=dtype, fuse=fuse)
    from .model import load as load_dense
    return load_dense(path, device=device, **({"dtype": dtype} if dtype is not None else {}))
