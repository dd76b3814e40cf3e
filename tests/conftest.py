"""Tiny randomly initialised models of every supported family and a byte-level tokenizer, built in code."""

import os
import signal

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3Config, Gemma3TextConfig, GraniteConfig,
                          LlamaConfig, MistralConfig, MixtralConfig, OlmoeConfig, Olmo2Config, Phi3Config,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig,
                          SiglipVisionConfig)

from bolaco.data import read_text

# nothing is ever fetched from a hub (lm-eval and datasets would try without these)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A shell starts a background job (`pytest ... &`) with Ctrl-C ignored, and a child inherits an ignored signal: the
# tests that press Ctrl-C on a bolaco process would see it go on working. Caught here, it is default in children.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "olmo2", "granite", "phi3",
            "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_config(family: str, vocab_size: int = 300, layers: int = 3):
    common = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    if family == "llama":   # Llama-3's rope scaling
        return LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "mistral":  # Mistral-NeMo's explicit head_dim (not hidden / heads)
        return MistralConfig(**common, sliding_window=None, head_dim=16)
    if family == "qwen2":
        return Qwen2Config(**common)  # q/k/v carry biases
    tokens = dict(head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "qwen3":
        return Qwen3Config(**common, **tokens)
    if family == "olmo2":
        return Olmo2Config(**common, **tokens)
    if family == "granite":
        return GraniteConfig(**common, **tokens, embedding_multiplier=2.0, residual_multiplier=0.5,
                             attention_multiplier=0.2, logits_scaling=2.0)
    if family == "phi3":   # fused qkv_proj and gate_up_proj
        return Phi3Config(**common, **{k: v for k, v in tokens.items() if k != "head_dim"})
    experts = dict(num_experts_per_tok=2, **tokens)
    if family == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, **experts)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                              **experts)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, num_experts=4, moe_intermediate_size=32, **experts)
    if family == "olmoe":
        return OlmoeConfig(**common, num_experts=4, **{k: v for k, v in experts.items() if k != "head_dim"})
    # layers that differ: a 4-token sliding window on layers 0 and 2, global attention on layer 1
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"] * layers
    if family == "gemma2":
        return Gemma2Config(**common, **tokens, sliding_window=4, layer_types=layer_types[:layers])
    text = Gemma3TextConfig(**common, **tokens, sliding_window=4, layer_types=layer_types[:layers])
    if family == "gemma3_text":
        return text
    # the multimodal checkpoint: a tiny vision tower beside the text decoder (image tokens above the vocabulary
    # that the tests sample from)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                        image_token_index=vocab_size - 1, boi_token_index=vocab_size - 3,
                        eoi_token_index=vocab_size - 2)


def tiny_model(family: str, seed: int = 0, vocab_size: int = 300, layers: int = 3):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, layers), dtype=torch.float32)
    with torch.no_grad():  # non-zero biases so that bias handling is really exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([read_text("wikitext2-valid")[:200_000]], vocab_size=300, min_frequency=2,
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token=None)


@pytest.fixture(scope="session")
def eos_tokenizer():
    """A byte-level tokenizer with an end-of-text token, as lm-eval's HFLM needs (prefix and padding)."""
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([read_text("wikitext2-valid")[:100_000]], vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def uniform_compressor(model, calibration, cache_dir, method="feature", multiple=4, partitions=1, modules=()):
    """Collect, build bases and return (adapter, compressor) for `model` (the real pipeline, tiny sizes)."""
    from bolaco.arch import adapter_for
    from bolaco.calibrate import collect
    from bolaco.decompose import Compressor, Decomposition, build_bases
    adapter = adapter_for(model)
    cov = collect(model, calibration, cache_dir, partitions=partitions, progress=False)
    decomposition = Decomposition(adapter, method, modules, multiple)
    return adapter, Compressor(decomposition, build_bases(decomposition, cov, progress=False))


STRUCTURED = ("mlp", "qk", "vo")


def study_of(name="tiny", **sections):
    """A Study from keyword sections, e.g. study_of(seq_len=16, budget={"remove": 0.3})."""
    from bolaco.study import Study
    return Study.model_validate({"name": name, **sections})
