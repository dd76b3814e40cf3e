"""Architecture adapters: the only place that knows module names.

An adapter finds the decoder blocks of a causal LM and names every decomposable linear by
(block, type), type one of q, k, v, o, gate, up, down. Linears that read the same input tensor
share a *record* (the unit of covariance collection): q/k/v, o, gate/up, down.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import BolacoError

TYPES = ("q", "k", "v", "o", "gate", "up", "down")
RECORD_OF_TYPE = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
                  "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}
RECORDS = ("attn_in", "o_in", "mlp_in", "down_in")

# These families share LLaMA's module names (Qwen2 adds q/k/v biases; Qwen3, OLMo-2 and Gemma-3 q/k norms;
# Gemma-2/3 alternate sliding-window and global layers; Granite scales residuals; all may use GQA).
_LLAMA_LIKE_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                     "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                     "down": "mlp.down_proj"}
FAMILIES = {t: _LLAMA_LIKE_PATHS for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2",
                                           "granite")}
SUPPORTED = ("LLaMA, Mistral, Qwen2, Qwen3, Gemma-2, Gemma-3 (text), OLMo-2 and Granite families (config model_type: "
             + ", ".join(FAMILIES) + ")")


def linear_id(block: int, type_: str) -> str:
    """The model-independent name of a decomposable linear, used as the key of rank maps."""
    return f"{block}.{type_}"


def parse_linear_id(lid: str) -> tuple[int, str]:
    block, type_ = lid.split(".")
    return int(block), type_


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
    """Finds blocks and decomposable linears of a supported decoder-only model."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise BolacoError(f"unsupported architecture '{model_type}': bolaco supports the {SUPPORTED}")
        self.model = model
        self.family = model_type
        self._paths = FAMILIES[model_type]
        self.blocks_path = "model.layers"
        self.blocks = model.get_submodule(self.blocks_path)
        self.linears: dict[str, LinearInfo] = {}
        for b in range(len(self.blocks)):
            for t in TYPES:
                path = f"{self.blocks_path}.{b}.{self._paths[t]}"
                try:
                    mod = model.get_submodule(path)
                except AttributeError:
                    raise BolacoError(f"unsupported architecture '{model_type}': no module {path} "
                                      f"(fused projections are not supported); bolaco supports the {SUPPORTED}")
                bias = getattr(mod, "dense_bias", None)   # set on layers bolaco made low-rank
                if bias is None:
                    bias = mod.bias is not None
                self.linears[linear_id(b, t)] = LinearInfo(
                    linear_id(b, t), b, t, path, mod.in_features, mod.out_features, bias)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def max_seq_len(self) -> int:
        return int(self.model.config.max_position_embeddings)

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
        """Record name -> linear ids of `block` that read that input, in TYPES order."""
        out: dict[str, list[str]] = {r: [] for r in RECORDS}
        for t in TYPES:
            out[RECORD_OF_TYPE[t]].append(linear_id(block, t))
        return out

    def record_dim(self, record: str) -> int:
        first = self.block_records(0)[record][0]
        return self.linears[first].d_in
