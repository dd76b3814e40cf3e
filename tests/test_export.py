import json

import torch

import bolaco
from bolaco.arch import adapter_for
from bolaco.layers import LowRankLinear
from bolaco.export import count_params, export
from conftest import tiny_model, uniform_compressor


def test_export_load_round_trip_is_identical_and_smaller(family, tmp_path, tokenizer):
    model = tiny_model(family, vocab_size=len(tokenizer))
    dense_params = count_params(model)
    dense_dir = tmp_path / "dense"
    model.save_pretrained(dense_dir)
    calibration = torch.randint(0, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(0))
    _, comp = uniform_compressor(model, calibration, tmp_path / "cache")
    ranks = comp.budget.uniform(0.3)
    comp.apply(ranks)
    out = export(model, tokenizer, ranks, tmp_path / "out", {"method": "feature", "remove": 0.3})

    loaded, tok = bolaco.load(out, fuse=False)   # stored bits; fused loading: test_plain_load
    text = "the quick brown fox jumps over the lazy dog"
    assert tok(text).input_ids == tokenizer(text).input_ids
    assert json.loads((out / "bolaco.json").read_text())["ranks"] == ranks
    assert all(isinstance(adapter_for(loaded).module(l), LowRankLinear) for l in ranks)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert count_params(loaded) == count_params(model) < dense_params
    assert count_params(model) == dense_params - comp.budget.decomposable + comp.budget.params(ranks)
    saved = (out / "model.safetensors").stat().st_size
    dense_file = (dense_dir / "model.safetensors").stat().st_size
    # float32 weights: the file holds 4 bytes per parameter plus a small header
    assert 4 * count_params(loaded) <= saved < 4 * count_params(loaded) + 40_000
    assert saved < dense_file
    generated = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)


def test_a_large_export_is_sharded_and_loads_back_with_refitted_layers(tmp_path, tokenizer):
    from bolaco.decompose import refit
    model = tiny_model("llama", vocab_size=len(tokenizer), layers=3)
    calibration = torch.randint(0, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(0))
    adapter, comp = uniform_compressor(model, calibration, tmp_path / "cache")
    ranks = {lid: k for lid, k in comp.budget.uniform(0.3).items() if not lid.endswith(".o")}   # o stays dense
    layers = refit(comp, ranks, calibration, centred=True, progress=False)
    assert set(layers) == set(ranks)             # the layers kept dense (o) are not refitted
    dense_o = {lid: adapter.module(lid).weight.clone() for lid in adapter.linears if lid.endswith(".o")}
    comp.apply(ranks, layers)
    assert all(torch.equal(adapter.module(lid).weight, w) for lid, w in dense_o.items())
    out = export(model, tokenizer, ranks, tmp_path / "out", {"method": "feature"}, shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert all(s.stat().st_size < 60_000 for s in shards)
    loaded, _ = bolaco.load(out, fuse=False)
    ids = calibration[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert count_params(loaded) == count_params(model)
    export(model, tokenizer, ranks, out, {"method": "feature"})           # re-export unsharded replaces the shards
    assert (out / "model.safetensors").is_file() and not list(out.glob("model-*.safetensors"))
    assert torch.equal(bolaco.load(out, fuse=False)[0](input_ids=ids).logits, loaded(input_ids=ids).logits)
