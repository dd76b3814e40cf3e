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
from conftest import FAMILIES, STRUCTURED, tiny_model, uniform_compressor

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


def _export(family, root, remove=0.3, tokenizer=None, modules=()):
    model = tiny_model(family, vocab_size=len(tokenizer) if tokenizer else 300)
    calibration = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    _, comp = uniform_compressor(model, calibration, root / "cache", modules=modules)
    ranks = comp.budget.uniform(remove)
    comp.apply(ranks)
    name = f"export-{family}" + ("-structured" if modules else "")
    return export(model, tokenizer, ranks, root / name, {"method": "feature"}), ranks


def test_every_family_loads_with_plain_transformers_to_the_same_logits(tmp_path, tokenizer):
    folders = [_export(f, tmp_path, tokenizer=tokenizer if f == "llama" else None)[0] for f in FAMILIES]
    folders += [_export(f, tmp_path, modules=STRUCTURED)[0] for f in ("qwen2", "gemma2", "phi3", "mixtral")]
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
    (lambda m: m["levels"].update({"0.q": m["levels"]["0.q"] + 8}), "the level map differs from config.json's"),
    (lambda m: m["levels"].update({"0.q": "64"}), "integer levels"),
    (lambda m: m.update(levels=list(m["levels"].items())), "integer levels"),
    (lambda m: m.update(params="7"), "'params' must be an integer"),
    (lambda m: m["shards"]["model.safetensors"].update(sha256="0" * 64), "is damaged: its size or sha256 differs"),
    (lambda m: m.update(shards={"other.safetensors": {"size": 1, "sha256": "0"}}), "are not the ones bolaco.json"),
    (lambda m: m.update(format=1), "export format 1"),
])
def test_an_edited_bolaco_json_gets_a_one_line_error(tmp_path, edit, message):
    folder, _ = _export("qwen2", tmp_path)
    _tamper(folder, edit)
    with pytest.raises(BolacoError, match=message) as err:
        bolaco.load(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flip", ["one bit", "400 bytes"])
def test_damaged_weights_are_refused_in_one_line(tmp_path, flip, monkeypatch):
    """One flipped bit inside one float (the old header check let it through: logits off by 1.25)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    import importlib
    import bolaco.export.writer as writer
    importlib.reload(writer)
    folder, _ = _export("llama", tmp_path)
    bolaco.load(folder)                       # verified once, remembered by size and mtime
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if flip == "one bit":
        data[len(data) // 2] ^= 0x01
    else:
        data[-500:-100] = bytes(400)
    weights.write_bytes(bytes(data))
    with pytest.raises(BolacoError, match=r"model.safetensors is damaged: .* \(export the model again") as err:
        writer.load_compressed(folder)
    assert "\n" not in str(err.value)
    importlib.reload(writer)


def test_a_weight_file_named_outside_the_export_is_never_read(tmp_path):
    folder, _ = _export("llama", tmp_path, remove=0.3)
    other, _ = _export("llama", tmp_path / "t", remove=0.4)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../t/export-llama/model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    meta = json.loads((folder / "bolaco.json").read_text())
    meta["shards"] = {"../t/export-llama/model.safetensors": meta["shards"]["model.safetensors"]}
    (folder / "bolaco.json").write_text(json.dumps(meta))
    for target in ("../t/export-llama/model.safetensors", "/etc/passwd", "../../../../etc/shadow"):
        index["weight_map"] = {"model.embed_tokens.weight": target}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        meta["shards"] = {target: {"size": 1, "sha256": "0"}}
        (folder / "bolaco.json").write_text(json.dumps(meta))
        with pytest.raises(BolacoError, match=r"points outside the export: refused") as err:
            bolaco.load(folder)
        assert "\n" not in str(err.value)
    assert other.is_dir()


def test_a_damaged_weights_file_or_config_gets_a_one_line_error(tmp_path):
    folder, _ = _export("llama", tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(BolacoError, match="is damaged"):
        bolaco.load(folder)
    folder, _ = _export("llama", tmp_path / "b")
    (folder / "config.json").write_text("{}")
    with pytest.raises(BolacoError, match="is not the configuration of a bolaco export"):
        bolaco.load(folder)
    folder, _ = _export("llama", tmp_path / "c")
    (folder / "bolaco.json").unlink()
    with pytest.raises(BolacoError, match=r"not a complete bolaco export: bolaco.json is missing \(export the model"):
        bolaco.load(folder)


@pytest.mark.parametrize("how", ["to float64, then train", "peft safe merge", "to bfloat16", "load other weights"])
def test_the_stacked_down_factors_follow_the_weights_wherever_they_go(tmp_path, how):
    """The plain-transformers model stacks q/k/v (gate/up) down factors for inference; anything that replaces the
    weights (casting, moving, a peft safe merge, loading) must never leave the stack stale."""
    from transformers import AutoModelForCausalLM
    folder, _ = _export("qwen2", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
    if how == "to float64, then train":
        model.to(torch.float64)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    elif how == "peft safe merge":
        from peft import LoraConfig, get_peft_model
        net = get_peft_model(model, LoraConfig(target_modules=["down"], r=2, init_lora_weights=False))
        model = net.merge_and_unload(safe_merge=True)
    elif how == "to bfloat16":
        model.to(torch.bfloat16)
    else:
        other = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(other, assign=True)
    with torch.no_grad():
        inference = model(input_ids=ids).logits
    with torch.enable_grad():
        training_path = model(input_ids=ids).logits.detach()     # grad mode never uses the stack
    assert torch.allclose(inference, training_path, atol=1e-5 if how != "to bfloat16" else 2e-2, rtol=1e-3), how


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
