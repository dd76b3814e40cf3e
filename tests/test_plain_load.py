"""An export loads with plain transformers (trust_remote_code=True, bolaco never imported) to the same logits as
bolaco.load, generates, and refuses to load without trust_remote_code instead of loading wrong; an edited
bolaco.json gets a one-line error from bolaco.load."""

import json
import os
import subprocess
import sys

import pytest
import torch

import bolaco
from bolaco.errors import BolacoError
from bolaco.export import export
from bolaco.layers import LowRankLinear, SharedDown
from conftest import FAMILIES, tiny_model, uniform_compressor

PLAIN = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
for folder in sys.argv[1:]:
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        print("LOADED WITHOUT trust_remote_code", folder)
    except ValueError as exc:
        assert "trust_remote_code" in str(exc), exc
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    # the down factors of the layers that read one input are stacked, as bolaco.load does
    assert all(model.get_submodule(p).shared is not None for g in model.config.bolaco["shared_inputs"] for p in g)
    if folder.endswith("llama"):      # exported with a tokenizer
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        assert tok("the quick fox").input_ids, folder
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, f"{folder}/plain_logits.pt")
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12), out.shape
assert not [m for m in sys.modules if m.startswith("bolaco")], "bolaco was imported"
print("PLAIN OK")
"""


def _export(family, root, remove=0.3, tokenizer=None):
    model = tiny_model(family, vocab_size=len(tokenizer) if tokenizer else 300)
    calibration = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    _, comp = uniform_compressor(model, calibration, root / "cache")
    ranks = comp.budget.uniform(remove)
    comp.apply(ranks)
    return export(model, tokenizer, ranks, root / f"export-{family}", {"method": "feature"}), ranks


def test_every_family_loads_with_plain_transformers_to_the_same_logits(tmp_path, tokenizer):
    folders = [_export(f, tmp_path, tokenizer=tokenizer if f == "llama" else None)[0] for f in FAMILIES]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    run = subprocess.run([sys.executable, "-c", PLAIN, *map(str, folders)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert "PLAIN OK" in run.stdout, run.stdout + run.stderr[-3000:]
    assert "LOADED WITHOUT" not in run.stdout
    ids = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
    for folder in folders:
        model, tok = bolaco.load(folder)
        assert (tok is not None) == folder.name.endswith("llama")
        with torch.no_grad():
            logits, plain = model(input_ids=ids).logits, torch.load(folder / "plain_logits.pt")
        if getattr(model.config, "_experts_implementation", None):   # MoE: from_pretrained picks the eager
            assert torch.allclose(logits, plain, atol=1e-5, rtol=0), folder.name   # experts kernel on a CPU
        else:
            assert torch.equal(logits, plain), folder.name


def _tamper(folder, edit):
    path = folder / "bolaco.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["ranks"].update({"0.q": m["ranks"]["0.q"] + 8}), "the rank of '0.q' is"),
    (lambda m: m["ranks"].update({"7.q": 8}), "'7.q' is not a projection"),
    (lambda m: m["ranks"].update({"0.q": "64"}), "integer ranks"),
    (lambda m: m.update(ranks=list(m["ranks"].items())), "integer ranks"),
    (lambda m: m.update(lowrank_bias="0.q"), "'lowrank_bias' must be a list"),
    (lambda m: m["lowrank_bias"].remove("0.q"), "the bias of '0.q'"),
    (lambda m: m.update(format=1), "export format 1"),
])
def test_an_edited_bolaco_json_gets_a_one_line_error(tmp_path, edit, message):
    folder, _ = _export("qwen2", tmp_path)
    _tamper(folder, edit)
    with pytest.raises(BolacoError, match=message) as err:
        bolaco.load(folder)
    assert "\n" not in str(err.value)


def test_a_damaged_weights_file_or_config_gets_a_one_line_error(tmp_path):
    folder, _ = _export("llama", tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(BolacoError, match="not a readable safetensors file"):
        bolaco.load(folder)
    folder, _ = _export("llama", tmp_path / "b")
    (folder / "config.json").write_text("{}")
    with pytest.raises(BolacoError, match="not a bolaco export's configuration"):
        bolaco.load(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_and_unfused_down_factors_give_the_same_logits(family, tmp_path):
    """bolaco.load stacks the down factors of the layers that read one input (q, k, v; gate, up): one product per
    group and block instead of one per layer, and the logits of the unfused model to float32 rounding."""
    folder, ranks = _export(family, tmp_path)
    fused, _ = bolaco.load(folder)
    plain, _ = bolaco.load(folder, fuse=False)
    groups = json.loads((folder / "config.json").read_text())["bolaco"]["shared_inputs"]
    lowrank = {n for n, m in fused.named_modules() if isinstance(m, LowRankLinear)}
    assert {p for g in groups for p in g} == {n for n in lowrank if fused.get_submodule(n).shared is not None}
    products = []
    real = torch.nn.functional.linear

    def counting(*args, **kwargs):
        products.append(1)
        return real(*args, **kwargs)

    ids = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [3, 3, 8, 1, 0, 2, 6, 9]])
    logits = {}
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear", counting)
        for name, model in (("fused", fused), ("unfused", plain)):
            products.clear()
            logits[name] = model(input_ids=ids).logits
            logits[name + " products"] = len(products)
    # every stacked product was read by all its members and dropped: nothing is held after the forward
    assert all(m._last is None for m in fused.modules() if isinstance(m, SharedDown))
    saved = sum(len(g) - 1 for g in groups)
    assert logits["unfused products"] - logits["fused products"] == saved
    # q, k, v and gate, up read one input each (phi3's are fused projections already; MoE MLPs stay dense)
    expected = sum(max(0, sum(f"{b}.{t}" in ranks for t in types) - 1)
                   for b in range(3) for types in (("q", "k", "v"), ("gate", "up")))
    assert saved == expected and (saved > 0) == (family != "phi3")
    # one GEMM over the stacked factors may round the last bit of a product otherwise (measured: at most 2.4e-7)
    assert torch.allclose(logits["fused"], logits["unfused"], atol=1e-6, rtol=1e-6), family
    assert torch.equal(fused.generate(ids, max_new_tokens=4, do_sample=False),
                       plain.generate(ids, max_new_tokens=4, do_sample=False))
    # the state dict is the export's: each layer's own down factor, no stacked copy
    assert set(fused.state_dict()) == set(plain.state_dict())
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in plain.state_dict().items())
