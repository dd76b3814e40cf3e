import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Phi3Config

from bolaco import model as model_io
from bolaco.arch import TYPES, Adapter
from bolaco.cli import main
from bolaco.errors import BolacoError
from conftest import tiny_model


def test_adapter_finds_every_projection(family):
    model = tiny_model(family)
    adapter = Adapter(model)
    assert adapter.n_blocks == 3 and len(adapter.linears) == 3 * len(TYPES)
    k = adapter.linears["1.k"]
    assert (k.d_in, k.d_out) == (48, 16)             # GQA: 2 kv heads of 8
    assert k.bias == (family == "qwen2")
    assert adapter.module("2.down") is model.model.layers[2].mlp.down_proj
    assert adapter.block_records(0) == {"attn_in": ["0.q", "0.k", "0.v"], "o_in": ["0.o"],
                                        "mlp_in": ["0.gate", "0.up"], "down_in": ["0.down"]}


@pytest.mark.parametrize("config", [GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50),
                                    Phi3Config(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                               num_attention_heads=2, vocab_size=50, pad_token_id=0)])
def test_unsupported_architecture_is_one_clear_line(config):
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(BolacoError, match=r"unsupported architecture '\w+': bolaco supports the LLaMA, Mistral, Qwen2, Qwen3"):
        Adapter(model)


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
