"""The adapter protocol: how bolaco sees a decoder-only model.

An adapter names the decoder blocks of a causal LM, its projection *types* (module paths inside a block)
and its *records*: the types that read the same input tensor, the unit of covariance collection. Every
linear is named by (block, type), e.g. "3.q"; rank maps, search variables and reports use those names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from torch import nn
from transformers import PreTrainedModel

from ..errors import BolacoError


def linear_id(block: int, type_: str) -> str:
    """The model-independent name of a decomposable linear ("3.q"), or of a unit of several ("3.mlp"): the keys of
    level maps, search variables and reports."""
    return f"{block}.{type_}"


def parse_linear_id(lid: str) -> tuple[int, str]:
    block, type_ = lid.split(".")
    return int(block), type_


def model_type_of(model) -> str | None:
    """The architecture's model_type; for a loaded bolaco export, the base architecture's."""
    config = getattr(model, "config", None)
    bolaco = getattr(config, "bolaco", None)
    if isinstance(bolaco, dict) and "base_model_type" in bolaco:
        return bolaco["base_model_type"]
    return getattr(config, "model_type", None)


@dataclass(frozen=True)
class Heads:
    """The attention geometry of a family: query heads, key/value heads (GQA groups) and the head dimension."""
    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.n_heads // self.n_kv


@dataclass(frozen=True)
class LinearInfo:
    id: str        # "3.q"
    block: int
    type: str
    path: str      # module path inside the model
    d_in: int
    d_out: int
    bias: bool


class Adapter:
    """One family group. Subclasses set the class attributes; the instance indexes one model's linears."""

    name: str = ""                               # the family group, as `bolaco families` lists it
    model_types: tuple[str, ...] = ()            # config.model_type values it accepts
    blocks_path: str = "model.layers"
    paths: dict[str, str] = {}                   # type -> module path inside a block
    records: dict[str, tuple[str, ...]] = {}     # record -> the types that read its input, in order
    # structured module -> the types it takes over (bolaco.decompose's mlp, qk and vo methods)
    modules: dict[str, tuple[str, ...]] = {}
    dense_note: str = ""                         # what stays dense in this family, and why

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.family = str(model_type_of(model))
        self.blocks = cast(nn.ModuleList, model.get_submodule(self.blocks_path))
        self.linears: dict[str, LinearInfo] = {}
        for b in range(len(self.blocks)):
            for t, rel in self.paths.items():
                path = f"{self.blocks_path}.{b}.{rel}"
                try:
                    mod = cast(nn.Linear, model.get_submodule(path))   # or a LowRankLinear: the same fields
                except AttributeError:
                    raise BolacoError(f"model_type '{self.family}': block {b} has no module {rel}; bolaco's "
                                      f"{self.name} adapter expects {', '.join(self.paths.values())}")
                # a layer bolaco made smaller records the dense layer's shape and bias (bolaco.layers)
                bias = getattr(mod, "dense_bias", None)
                if bias is None:
                    bias = mod.bias is not None
                self.linears[linear_id(b, t)] = LinearInfo(
                    linear_id(b, t), b, t, path, getattr(mod, "dense_in", mod.in_features),
                    getattr(mod, "dense_out", mod.out_features), bias)

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self.paths)

    @property
    def record_names(self) -> tuple[str, ...]:
        return tuple(self.records)

    def record_of(self, type_: str) -> str:
        return next(r for r, types in self.records.items() if type_ in types)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def max_seq_len(self) -> int:
        return int(self.model.config.get_text_config().max_position_embeddings)

    @property
    def heads(self) -> Heads:
        cfg = self.model.config.get_text_config()
        n = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n
        return Heads(n, int(getattr(cfg, "num_key_value_heads", None) or n), int(head_dim))

    def module(self, lid: str) -> nn.Module:
        return self.model.get_submodule(self.linears[lid].path)

    def replace(self, lid: str, new: nn.Module) -> nn.Module:
        """Put `new` where the linear `lid` is; returns the module it replaced."""
        parent_path, _, attr = self.linears[lid].path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        return old

    def block_records(self, block: int) -> dict[str, list[str]]:
        """Record name -> linear ids of `block` that read that input."""
        return {r: [linear_id(block, t) for t in types] for r, types in self.records.items()}

    def record_dim(self, record: str) -> int:
        return self.linears[linear_id(0, self.records[record][0])].d_in

    def check_types(self, types, what: str) -> None:
        unknown = [t for t in types if t not in self.paths]
        if unknown:
            raise BolacoError(f"{what}: unknown type(s) {', '.join(unknown)} for a {self.family} model "
                              f"(its types are {', '.join(self.paths)})")
