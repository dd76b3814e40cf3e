"""Mixture-of-experts families: the attention projections are compressed; the experts stay dense.

The experts are 3-D parameters (one batched tensor per layer, not nn.Linear), and each expert sees only the
tokens routed to it, so its statistics would have to be collected per expert under routing. Until that
exists they stay dense, as do the router and Qwen2-MoE's shared expert; the budget counts the attention
projections only."""

from .base import Adapter
from .llama import LLAMA_MODULES, LLAMA_PATHS, LLAMA_RECORDS


class MixtureOfExperts(Adapter):
    name = "MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): attention only"
    model_types = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
    paths = {t: LLAMA_PATHS[t] for t in ("q", "k", "v", "o")}
    records = {r: LLAMA_RECORDS[r] for r in ("attn_in", "o_in")}
    modules = {m: LLAMA_MODULES[m] for m in ("qk", "vo")}
    dense_note = "experts, router and shared expert stay dense (3-D expert tensors; routing-aware statistics needed)"
