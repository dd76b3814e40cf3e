"""Exports: the round trip for every family and method, sharding, atomic writes, the disk check, what the folder
carries (generation config, model card), dtype and device placement on load, and the Hugging Face habits
(save_pretrained of a loaded export, peft's usual target names)."""

import json

import pytest
import torch
import yaml

import bolaco
from bolaco.arch import adapter_for
from bolaco.errors import BolacoError
from bolaco.export import count_params, export
from bolaco.layers import ColumnsLinear, LowRankLinear, NarrowLinear, RowsLinear
from conftest import STRUCTURED, tiny_model, uniform_compressor


def _compressed(family, tmp_path, tokenizer, modules=(), remove=0.3, layers=3):
    model = tiny_model(family, vocab_size=len(tokenizer), layers=layers)
    calibration = torch.randint(0, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(0))
    _, comp = uniform_compressor(model, calibration, tmp_path / "cache", modules=modules)
    levels = comp.budget.uniform(remove)
    comp.apply(levels)
    return model, comp, levels, calibration


@pytest.mark.parametrize("modules", [(), STRUCTURED], ids=["factors", "structured"])
def test_export_load_round_trip_is_identical_and_smaller(family, modules, tmp_path, tokenizer):
    model, comp, levels, _ = _compressed(family, tmp_path, tokenizer, modules)
    dense_params = count_params(tiny_model(family, vocab_size=len(tokenizer)))
    out = export(model, tokenizer, levels, tmp_path / "out", {"remove": 0.3})
    loaded, tok = bolaco.load(out, fuse=False)   # stored bits; fused loading: test_plain_load
    text = "the quick brown fox jumps over the lazy dog"
    assert tok(text).input_ids == tokenizer(text).input_ids
    assert json.loads((out / "bolaco.json").read_text())["levels"] == levels
    kinds = {type(adapter_for(loaded).module(l)) for u in levels for l in comp.budget.units[u].linears}
    assert kinds <= {LowRankLinear, RowsLinear, ColumnsLinear, NarrowLinear} and kinds
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert count_params(loaded) == count_params(model) < dense_params
    assert count_params(model) == dense_params - comp.budget.decomposable + comp.budget.params(levels)
    saved = (out / "model.safetensors").stat().st_size
    # float32 weights: 4 bytes per parameter, the kept-index buffers of structured layers and a small header
    buffers = sum(b.numel() * b.element_size() for b in loaded.buffers() if not b.is_floating_point())
    assert 4 * count_params(loaded) <= saved < 4 * count_params(loaded) + buffers + 40_000
    generated = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    assert not list(tmp_path.glob(".out.*"))      # no temporary folder left beside it


def test_a_large_export_is_sharded_and_loads_back_with_refitted_layers(tmp_path, tokenizer):
    from bolaco.decompose import refit
    model, comp, _, calibration = _compressed("llama", tmp_path, tokenizer, STRUCTURED)
    levels = {u: k for u, k in comp.budget.uniform(0.3).items() if not u.endswith(".vo")}   # v and o stay dense
    layers = refit(comp, levels, calibration, progress=False, holdout=0)
    assert set(layers) == {f"{b}.down" for b in range(3)}
    comp.apply(levels, layers)
    out = export(model, tokenizer, levels, tmp_path / "out", {}, shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert sorted(json.loads((out / "bolaco.json").read_text())["shards"]) == [s.name for s in shards]
    loaded, _ = bolaco.load(out, fuse=False)
    ids = calibration[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    export(model, tokenizer, levels, out, {})           # re-export unsharded replaces the shards
    assert (out / "model.safetensors").is_file() and not list(out.glob("model-*.safetensors"))
    assert torch.equal(bolaco.load(out, fuse=False)[0](input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_a_crash_while_exporting_leaves_the_previous_export_and_no_half_written_folder(tmp_path, tokenizer,
                                                                                       monkeypatch):
    model, comp, levels, calibration = _compressed("llama", tmp_path, tokenizer)
    out = export(model, tokenizer, levels, tmp_path / "out", {"round": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import bolaco.export.writer as writer

    def dies(*args, **kwargs):
        raise KeyboardInterrupt   # Ctrl-C (or a kill) while the tokenizer is written, after the weights
    monkeypatch.setattr(tokenizer, "save_pretrained", dies)
    with pytest.raises(KeyboardInterrupt):
        export(model, tokenizer, levels, tmp_path / "out", {"round": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    monkeypatch.undo()
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(BolacoError, match=r"the export needs 0.\d GB in .* but only 0.0 GB are free: free some "
                                          "space") as err:
        export(model, tokenizer, levels, tmp_path / "new", {})
    assert "\n" not in str(err.value) and not (tmp_path / "new").exists()


def test_the_export_carries_the_generation_config_and_a_model_card_with_metadata(tmp_path, tokenizer):
    from transformers import GenerationConfig
    model, comp, levels, _ = _compressed("qwen2", tmp_path, tokenizer, STRUCTURED)
    model.generation_config = GenerationConfig(eos_token_id=[2, 7], temperature=0.6, top_p=0.9, do_sample=True)
    info = {"removed_fraction": 0.3, "methods": "qk, vo, mlp", "perplexity": {"seq_len": 16, "test": 12.5},
            "provenance": {"model": "default", "data": {"test": {"corpus": "wikitext2-test[0:4]", "sequences": 4,
                                                                 "sha256": "ab"},
                                                        "calibration": {"corpus": "wikitext2-valid[0:8] + "
                                                                                  "c4-valid[-80:-16]"}}},
            "selection": {"trial": 3, "refit": True,
                          "candidates": [{"trial": 3, "refit": True, "search_ppl": 11.0, "selection_ppl": 10.5,
                                          "selection_value": 2.35}]}}
    out = export(model, tokenizer, levels, tmp_path / "out", info, unit_types=comp.decomposition.unit_types,
                 budget=comp.budget)
    loaded, _ = bolaco.load(out)
    assert loaded.generation_config.eos_token_id == [2, 7] and loaded.generation_config.temperature == 0.6
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["Salesforce/wikitext", "allenai/c4"] and "bolaco" in meta["tags"]
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["type"] == "perplexity" and result["metrics"][0]["value"] == 12.5
    assert "trial 3 (refitted) won" in card and "| 3 | refitted | 11.00 | 10.50 |" in card
    assert "(allocation.png)" in card and (out / "allocation.png").is_file()
    assert "wikitext2-valid[0:8] + c4-valid[-80:-16]" in card


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16])
def test_load_honours_a_dtype_or_its_name(dtype, tmp_path, tokenizer):
    model, comp, levels, calibration = _compressed("llama", tmp_path, tokenizer, STRUCTURED)
    out = export(model, tokenizer, levels, tmp_path / "out", {})
    loaded, _ = bolaco.load(out, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.long for n, b in loaded.named_buffers() if n.endswith(".index"))
    mine = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    assert all(torch.equal(mine[k], v) for k, v in loaded.state_dict().items())   # the stored weights, cast
    with torch.no_grad():    # bfloat16 arithmetic: close to the float32 model, not equal
        ref = model(input_ids=calibration[:1]).logits
        assert torch.allclose(loaded(input_ids=calibration[:1]).logits.float(), ref, atol=0.05)
    with pytest.raises(BolacoError, match="unknown dtype 'bf17'"):
        bolaco.load(out, dtype="bf17")


@pytest.mark.parametrize("modules", [(), STRUCTURED], ids=["factors", "structured"])
def test_save_pretrained_of_a_loaded_export_is_an_export_again(modules, tmp_path, tokenizer):
    """The Hugging Face habit: load, save_pretrained (or push_to_hub, which saves the same folder), load again with
    bolaco, evaluate it and post-train it."""
    from bolaco.cli import main
    model, comp, levels, calibration = _compressed("llama", tmp_path, tokenizer, modules)
    out = export(model, tokenizer, levels, tmp_path / "out", {})
    loaded, tok = bolaco.load(out)
    loaded.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    again, tok2 = bolaco.load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(input_ids=calibration[:2]).logits, loaded(input_ids=calibration[:2]).logits)
    meta = json.loads((tmp_path / "saved" / "bolaco.json").read_text())
    assert meta["levels"] == levels and meta["params"] == count_params(loaded)
    assert (tmp_path / "saved" / "modeling_bolaco.py").read_text() == (out / "modeling_bolaco.py").read_text().split(
        "\n", 1)[1]
    assert main(["eval", "--model", str(tmp_path / "saved"), "--ppl", "--corpus", "wikitext2-test", "--seq-len",
                 "16", "--sequences", "2"]) == 0


def test_peft_takes_the_usual_names_of_plain_layers_and_names_the_targets_of_the_others(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model
    model, comp, levels, calibration = _compressed("llama", tmp_path, tokenizer, ("mlp",))
    out = export(model, tokenizer, levels, tmp_path / "out", {})
    loaded, _ = bolaco.load(out, fuse=False)
    peft_model = get_peft_model(loaded, LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"], r=2))
    assert peft_model.get_nb_trainable_parameters()[0] > 0      # the structured MLP is plain nn.Linear layers
    loaded, _ = bolaco.load(out, fuse=False)
    with pytest.raises(ValueError, match=r"peft: target its children '<name>.down' and '<name>.up', or 'all-linear'"):
        get_peft_model(loaded, LoraConfig(target_modules=["q_proj"], r=2))
    peft_model = get_peft_model(loaded, LoraConfig(target_modules="all-linear", r=2))
    assert peft_model.get_nb_trainable_parameters()[0] > 0
