import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from bolaco import model as model_io
from bolaco.arch import adapter_for
from bolaco.cli import main
from bolaco.errors import BolacoError
from conftest import tiny_model


EXPECTED_TYPES = {"phi3": ("qkv", "o", "gate_up", "down"), "mixtral": ("q", "k", "v", "o"),
                  "qwen2_moe": ("q", "k", "v", "o"), "qwen3_moe": ("q", "k", "v", "o"), "olmoe": ("q", "k", "v", "o")}


def test_adapter_finds_every_projection(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    types = EXPECTED_TYPES.get(family, ("q", "k", "v", "o", "gate", "up", "down"))
    assert adapter.types == types
    assert adapter.n_blocks == 3 and len(adapter.linears) == 3 * len(types)
    for lid, info in adapter.linears.items():
        module = adapter.module(lid)
        assert isinstance(module, torch.nn.Linear)
        assert (module.in_features, module.out_features) == (info.d_in, info.d_out)
    records = adapter.block_records(1)
    assert sorted(l for lids in records.values() for l in lids) == sorted(f"1.{t}" for t in types)
    for lids in records.values():     # a record's linears read one input
        assert len({adapter.linears[l].d_in for l in lids}) == 1
    if family == "phi3":
        qkv = adapter.linears["1.qkv"]
        assert (qkv.d_in, qkv.d_out) == (48, 48 + 2 * 16)   # q plus GQA k and v (2 kv heads of 8) in one linear
    else:
        k = adapter.linears["1.k"]
        head_dim = 16 if family == "mistral" else 8
        assert (k.d_in, k.d_out) == (48, 2 * head_dim)   # GQA: 2 kv heads
        assert k.bias == (family in ("qwen2", "qwen2_moe"))
    blocks = model.model.language_model.layers if family == "gemma3" else model.model.layers
    assert adapter.module("2.o") is blocks[2].self_attn.o_proj


def test_unsupported_architecture_is_one_clear_line_and_families_lists_what_is_supported(capsys):
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(BolacoError, match=r"unsupported architecture 'gpt2': bolaco supports LLaMA-like .*phi3.*"
                                          r"`bolaco families` lists them"):
        adapter_for(model)
    assert main(["families"]) == 0
    listed = capsys.readouterr().out
    for model_type in ("llama", "qwen3", "gemma2", "gemma3_text", "gemma3", "olmo2", "granite", "phi3", "mixtral",
                       "qwen2_moe", "qwen3_moe", "olmoe"):
        assert model_type in listed
    assert "experts, router and shared expert stay dense" in listed


def test_missing_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(BolacoError, match="model path not found"):
        model_io.resolve(str(tmp_path / "nope"))
    with pytest.raises(BolacoError, match="GGUF file not found"):
        model_io.resolve(str(tmp_path / "m.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BolacoError, match="could not load model"):
        model_io.load(str(empty))


def test_saved_dense_model_loads_from_a_directory(tmp_path, tokenizer):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = model_io.load(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model_io.fingerprint(loaded) == model_io.fingerprint(model)
    assert model_io.fingerprint(tiny_model("qwen2", seed=1)) != model_io.fingerprint(model)


def test_cli_reports_user_errors_on_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbudget: {remove: 0.2, typo: 1}\n")
    assert main(["collect", "--study", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bolaco: error:") and "typo" in err and "\n" not in err
    assert main(["collect", "--study", str(tmp_path / "missing.yaml")]) == 2
    assert "study file not found" in capsys.readouterr().err
