"""Phi-3 and Phi-4: fused projections. `qkv` (q, k and v in one linear) and `gate_up` are each one type: the
PCA of the fused output feature space gives one low-rank pair, and the attention and MLP code split its
output as they split the dense one, so exports load back with the architecture's own classes. The structured MLP
keeps neurons in both halves of gate_up; the structured attention modules need q, k and v apart, so the fused qkv
stays with the per-matrix factors."""

from .base import Adapter


class Phi3(Adapter):
    name = "Phi-3 / Phi-4 (fused qkv and gate_up)"
    model_types = ("phi3",)
    paths = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
             "down": "mlp.down_proj"}
    records = {"attn_in": ("qkv",), "o_in": ("o",), "mlp_in": ("gate_up",), "down_in": ("down",)}
    # gate_up stacks the gate rows over the up rows: the MLP keeps the same neurons in both halves
    modules = {"mlp": ("gate_up", "down")}
