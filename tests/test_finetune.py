import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import bolaco
from bolaco.arch import adapter_for
from bolaco.data import role_sequences
from bolaco.errors import BolacoError
from bolaco.evaluate.perplexity import perplexity
from bolaco.export import count_params, export
from bolaco.finetune.subspace import SubspaceTuner, _Checkpoint
from bolaco.study import FinetuneConfig, load_study
from conftest import STRUCTURED, tiny_model, uniform_compressor

SEQS = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(7))


def compressed_model(tmp_path, family="qwen2", modules=()):
    model = tiny_model(family)
    _, comp = uniform_compressor(model, SEQS, tmp_path / "cache", modules=modules)
    ranks = comp.budget.uniform(0.3)
    comp.apply(ranks)
    for p in model.parameters():   # the factors as exported models carry them: ordinary parameters
        p.requires_grad_(True)
    return model, ranks


@pytest.mark.parametrize("variant", ["lora", "scaling"])
def test_loss_falls_merge_is_exact_and_size_unchanged(tmp_path, tokenizer, variant):
    model, ranks = compressed_model(tmp_path)
    before = count_params(model)
    ref = export(model, None, ranks, tmp_path / "before", {})
    tuner = SubspaceTuner(model, FinetuneConfig(variant=variant, steps=12, batch_size=2, lr=5e-2, warmup=0,
                                                schedule="constant", checkpoint_every=100))
    fixed = SEQS[:2]                         # one fixed batch: the loss must go down
    losses = tuner.fit(fixed, progress=False)
    assert losses[-1] < losses[0] - 0.1
    with torch.no_grad():
        adapted = tuner.net(input_ids=SEQS).logits
        merged = tuner.merge()
        assert torch.allclose(merged(input_ids=SEQS).logits, adapted, atol=1e-4, rtol=1e-4)
    adapter = adapter_for(merged)
    assert {lid: adapter.module(lid).rank for lid in ranks} == ranks
    assert count_params(merged) == before
    out = export(merged, None, ranks, tmp_path / "after", {})
    assert (out / "model.safetensors").stat().st_size == (ref / "model.safetensors").stat().st_size


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lora_on_structured_layers_merges_into_their_reduced_matrices(tmp_path, gradient_checkpointing):
    """The structured layers' plain matrices (kept rows of q/k/v, kept columns of o, the narrower MLP) take LoRA
    at their reduced shapes and merge back exactly: same layer kinds, shapes and parameter count."""
    model, levels = compressed_model(tmp_path, "llama", STRUCTURED)
    before = count_params(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    cfg = FinetuneConfig(steps=6, batch_size=2, lr=5e-2, warmup=0, schedule="constant", checkpoint_every=100,
                         gradient_checkpointing=gradient_checkpointing)
    tuner = SubspaceTuner(model, cfg)
    trained = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in tuner.trainable}
    assert "model.layers.0.self_attn.q_proj.linear" in trained and "model.layers.0.mlp.down_proj" in trained
    losses = tuner.fit(SEQS[:2], progress=False)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        adapted = tuner.net(input_ids=SEQS).logits
        merged = tuner.merge()
        assert torch.allclose(merged(input_ids=SEQS).logits, adapted, atol=1e-4, rtol=1e-4)
    assert count_params(merged) == before and {n: tuple(p.shape) for n, p in merged.named_parameters()} == shapes
    with pytest.raises(BolacoError, match="variant scaling trains the scalings of per-matrix factors"):
        SubspaceTuner(compressed_model(tmp_path / "b", "llama", STRUCTURED)[0], FinetuneConfig(variant="scaling"))


@pytest.mark.parametrize("lora_dense", [True, False])
def test_lora_on_the_layers_kept_dense_merges_into_their_weights(tmp_path, lora_dense):
    model = tiny_model("llama")
    _, comp = uniform_compressor(model, SEQS, tmp_path / "cache")
    ranks = {lid: k for lid, k in comp.budget.uniform(0.3).items() if not lid.endswith(".v")}   # v kept dense
    comp.apply(ranks)
    adapter = adapter_for(model)
    before = count_params(model)
    v_weights = {lid: adapter.module(lid).weight.detach().clone() for lid in adapter.linears if lid.endswith(".v")}
    tuner = SubspaceTuner(model, FinetuneConfig(steps=8, batch_size=2, lr=5e-2, warmup=0, schedule="constant",
                                                checkpoint_every=100, lora_dense=lora_dense))
    trained = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in tuner.trainable}
    expected = {adapter.linears[lid].path + ".down" for lid in ranks}
    if lora_dense:
        expected |= {info.path for lid, info in adapter.linears.items() if lid not in ranks}   # v among them
    assert trained == expected
    tuner.fit(SEQS[:2], progress=False)
    with torch.no_grad():
        adapted = tuner.net(input_ids=SEQS).logits
        merged = tuner.merge()
        assert torch.allclose(merged(input_ids=SEQS).logits, adapted, atol=1e-4, rtol=1e-4)
    adapter = adapter_for(merged)
    assert count_params(merged) == before
    assert {lid: adapter.module(lid).rank for lid in ranks} == ranks
    for lid, w in v_weights.items():
        assert type(adapter.module(lid)) is torch.nn.Linear
        assert torch.equal(adapter.module(lid).weight, w) != lora_dense


def test_resumed_run_continues_the_same_loss_sequence(tmp_path, monkeypatch):
    cfg = FinetuneConfig(steps=6, batch_size=2, lr=1e-2, warmup=1, checkpoint_every=2, lora_r=2)
    model, _ = compressed_model(tmp_path / "a")
    full = SubspaceTuner(model, cfg).fit(SEQS, progress=False)

    real_save = _Checkpoint.save

    def save_then_die(self, step, *args):
        real_save(self, step, *args)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(_Checkpoint, "save", save_then_die)
    model, _ = compressed_model(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        SubspaceTuner(model, cfg).fit(SEQS, checkpoint=tmp_path / "ckpt", progress=False)
    monkeypatch.setattr(_Checkpoint, "save", real_save)
    model, _ = compressed_model(tmp_path / "c")
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = SubspaceTuner(model, cfg).fit(SEQS, checkpoint=tmp_path / "ckpt", progress=False)
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]   # the fast-forward is not reported as misuse
    assert len(forwards) == 2                  # only steps 5 and 6 ran: the first four came from the checkpoint
    assert len(resumed) == 6
    assert resumed == pytest.approx(full, rel=1e-6)


def test_a_damaged_checkpoint_is_reported_and_training_starts_over(tmp_path, caplog):
    cfg = FinetuneConfig(steps=4, batch_size=2, lr=1e-2, warmup=1, checkpoint_every=2, lora_r=2)
    model, _ = compressed_model(tmp_path / "a")
    full = SubspaceTuner(model, cfg).fit(SEQS, checkpoint=tmp_path / "ckpt", progress=False)
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert [p.name for p in (tmp_path / "ckpt").glob("state-*")] == [state["file"]]   # older ones are removed
    path = tmp_path / "ckpt" / state["file"]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    model, _ = compressed_model(tmp_path / "b")
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    with caplog.at_level("WARNING", logger="bolaco"):
        again = SubspaceTuner(model, cfg).fit(SEQS, checkpoint=tmp_path / "ckpt", progress=False)
    assert "checkpoint" in caplog.text and "starting over from step 0" in caplog.text
    assert len(forwards) == 4 and again == full


def test_refuses_models_without_compressed_layers():
    with pytest.raises(BolacoError, match="no compressed layers"):
        SubspaceTuner(tiny_model("llama"), FinetuneConfig())


def test_finetune_command_refuses_test_data_and_missing_models(tmp_path, capsys):
    from bolaco.cli import main
    study = tmp_path / "s.yaml"
    study.write_text("name: s\ndata:\n  train: {corpus: wikitext2-test, sequences: 4}\n"
                     "  test: {corpus: wikitext2-test, start: 10, sequences: 4}\n")
    assert main(["finetune", "--study", str(study), "--from", str(tmp_path / "none")]) == 2
    assert "no exported bolaco model" in capsys.readouterr().err
    from bolaco.data import RoleSpec, check_roles
    with pytest.raises(BolacoError, match="train data may not come from the test split"):
        check_roles({"train": RoleSpec("wikitext2-test", 0, 4), "test": RoleSpec("wikitext2-test", 10, 4)},
                    {"wikitext2-test": 100})
    check_roles({"train": RoleSpec("wikitext2-valid", 0, 8), "calibration": RoleSpec("wikitext2-valid", 0, 8)},
                {"wikitext2-valid": 100})    # post-training may reuse the calibration text


def test_finetune_command_end_to_end(tmp_path, tokenizer):
    from bolaco.cli import main
    model = tiny_model("mistral", vocab_size=len(tokenizer))
    calibration = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    # the default's mix: the structured MLP and per-matrix factors for attention
    _, comp = uniform_compressor(model, calibration, tmp_path / "cache", modules=("mlp",))
    ranks = comp.budget.uniform(0.3)
    comp.apply(ranks)
    src = export(model, tokenizer, ranks, tmp_path / "exported", {"method": "feature"})
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nseq_len: 16\ncache_dir: {tmp_path}/cache\ndata:\n"
                     "  calibration: {corpus: wikitext2-valid, start: 0, sequences: 8}\n"
                     "  search: {corpus: wikitext2-valid, start: -4, sequences: 4}\n"
                     "  test: {corpus: wikitext2-test, start: 0, sequences: 4}\n"
                     "finetune: {steps: 3, batch_size: 2, lr: 0.01, warmup: 0, checkpoint_every: 2}\n")
    out = tmp_path / "tuned"
    assert main(["finetune", "--study", str(study), "--from", str(src), "--out", str(out)]) == 0
    meta = json.loads((out / "bolaco.json").read_text())
    assert meta["levels"] == ranks and meta["params"] == count_params(model)
    assert set(meta["finetune"]["perplexity_before"]) == {"search", "test"}
    assert meta["finetune"]["tokens"] == 3 * 2 * 16
    assert (out / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    # the post-trained export loads again, through bolaco and plain transformers, and is the model that was measured
    reloaded, _ = bolaco.load(out)
    s = load_study(str(study), [])
    test = role_sequences({"test": s.data.roles()["test"]}, tokenizer, s.seq_len, s.data.dir, s.cache_dir)["test"]
    measured = meta["finetune"]["perplexity_after"]["test"]
    assert perplexity(reloaded, test, 2, progress=False).ppl == pytest.approx(measured, rel=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.allclose(plain(test[:2]).logits, reloaded(test[:2]).logits, atol=1e-5)


def test_dense_baseline_and_distillation(tmp_path):
    """The fair baseline trains LoRA on every dense projection and merges back to the dense size; with a teacher
    the loss is cross-entropy plus distill x KL(teacher || model), computed here independently."""
    dense = tiny_model("llama")
    size = count_params(dense)
    cfg = FinetuneConfig(steps=6, batch_size=2, lr=5e-2, warmup=0, schedule="constant", checkpoint_every=100)
    tuner = SubspaceTuner(dense, cfg, dense=True)
    assert len(tuner.ids) == len(adapter_for(dense).linears)
    losses = tuner.fit(SEQS[:2], progress=False)
    assert losses[-1] < losses[0] - 0.1
    merged = tuner.merge()
    assert count_params(merged) == size
    with pytest.raises(BolacoError, match="variant lora"):
        SubspaceTuner(tiny_model("llama"), FinetuneConfig(variant="scaling"), dense=True)

    teacher = tiny_model("llama")
    model, _ = compressed_model(tmp_path, family="llama")
    batch = SEQS[:2]
    with torch.no_grad():
        out = model(input_ids=batch, labels=batch)
        ref = torch.log_softmax(teacher(input_ids=batch).logits.double(), -1)
        logp = torch.log_softmax(out.logits.double(), -1)
        kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
    cfg = FinetuneConfig(steps=1, batch_size=2, lr=1e-9, warmup=0, schedule="constant", distill=0.5)
    first = SubspaceTuner(model, cfg, teacher=teacher).fit(batch, progress=False)[0]
    assert first == pytest.approx(float(out.loss) + 0.5 * kl, rel=1e-4)
    with pytest.raises(BolacoError, match="teacher"):
        SubspaceTuner(model, cfg)
    pure = cfg.model_copy(update={"ce": 0.0})   # pure distillation: the KL term alone
    fresh, _ = compressed_model(tmp_path, family="llama")
    first = SubspaceTuner(fresh, pure, teacher=teacher).fit(batch, progress=False)[0]
    assert first == pytest.approx(0.5 * kl, abs=1e-6)
    # the dense model distilled from itself starts at its optimum (loss 0): its fair baseline is the dense model
    assert SubspaceTuner(tiny_model("llama"), pure, teacher=teacher, dense=True).fit(batch, progress=False) == [0.0]
