"""Families with LLaMA's module names: separate q/k/v/o and gate/up/down projections in every block.

LLaMA / Llama-3 (rope scaling), Mistral and Mistral-NeMo (explicit head_dim), Qwen2 (q/k/v biases), Qwen3,
OLMo-2 and Gemma-3 (q/k norms), Gemma-2/3 (alternating sliding-window and global layers, soft-capping,
scaled embeddings: all inside the blocks, which bolaco runs as they are), Granite (scaled residuals).
"""

from .base import Adapter

LLAMA_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
LLAMA_RECORDS = {"attn_in": ("q", "k", "v"), "o_in": ("o",), "mlp_in": ("gate", "up"), "down_in": ("down",)}
LLAMA_MODULES = {"qk": ("q", "k"), "vo": ("v", "o"), "mlp": ("gate", "up", "down")}


class LlamaLike(Adapter):
    model_types: tuple[str, ...]
    name = "LLaMA-like (LLaMA, Mistral, Qwen2, Qwen3, Gemma-2, Gemma-3 text, OLMo-2, Granite)"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "granite")
    paths = LLAMA_PATHS
    records = LLAMA_RECORDS
    modules = LLAMA_MODULES


class Gemma3Multimodal(LlamaLike):
    """A Gemma-3 checkpoint with its vision tower: the text decoder is compressed, the vision tower and its
    projector stay dense (they see no text calibration data)."""
    name = "Gemma-3 multimodal (text decoder)"
    model_types = ("gemma3",)
    blocks_path = "model.language_model.layers"
    dense_note = "the vision tower and the multimodal projector stay dense"
