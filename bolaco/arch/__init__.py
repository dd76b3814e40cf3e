"""Architecture adapters: the only place that knows module names (one file per family group).

`adapter_for(model)` picks the adapter of the model's config.model_type from the registry below."""

from __future__ import annotations

from ..errors import BolacoError
from .base import Adapter, Heads, LinearInfo, linear_id, model_type_of, parse_linear_id
from .llama import Gemma3Multimodal, LlamaLike
from .moe import MixtureOfExperts
from .phi3 import Phi3

ADAPTERS: tuple[type[Adapter], ...] = (LlamaLike, Gemma3Multimodal, Phi3, MixtureOfExperts)
REGISTRY: dict[str, type[Adapter]] = {t: a for a in ADAPTERS for t in a.model_types}


def supported() -> str:
    return "; ".join(f"{a.name} [{', '.join(a.model_types)}]" for a in ADAPTERS)


def adapter_for(model) -> Adapter:
    model_type = model_type_of(model)
    if model_type not in REGISTRY:
        raise BolacoError(f"unsupported architecture '{model_type}': bolaco supports {supported()} "
                          "(`bolaco families` lists them)")
    return REGISTRY[model_type](model)


__all__ = ["ADAPTERS", "Adapter", "Heads", "LinearInfo", "adapter_for", "linear_id", "parse_linear_id", "supported"]
