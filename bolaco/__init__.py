"""bolaco: makes causal LMs smaller with feature-space decompositions (per-matrix factors and structured
modules), an allocation found by Bayesian optimisation under an exact parameter budget, and post-training."""

from ._version import __version__

__all__ = ["__version__", "load"]


def load(path=None, device=None, dtype=None, device_map=None, fuse=True):
    """Load a model as bolaco sees it: returns (model, tokenizer). An exported bolaco folder (it holds bolaco.json)
    loads as the compressed model, verified first; anything else (a Hugging Face id, a model directory, a .gguf
    file, None or 'default') loads as a dense model. dtype: a torch dtype or its name ("bfloat16"; default: the
    stored one for an export, float32 otherwise); device_map: as for transformers ("auto": over the GPUs of a
    node). `fuse`: see bolaco.export.load_compressed."""
    from .export import is_export
    if is_export(path):
        from .export import load_compressed
        return load_compressed(path, device=device, dtype=dtype, device_map=device_map, fuse=fuse)
    from .model import load as load_dense
    return load_dense(path, device=device, device_map=device_map, **({"dtype": dtype} if dtype is not None else {}))
