"""Model dtypes and devices: every dtype runs collect -> bases -> search trial -> selection -> refit -> export ->
reload -> post-training; the statistics stay float64 whatever the model's dtype; bases built on a device equal the
CPU float64 reference."""

import pytest
import torch

import bolaco
from bolaco import search
from bolaco.arch import adapter_for
from bolaco.calibrate import collect
from bolaco.decompose import Decomposition, build_bases
from bolaco.decompose.methods.factors import input_root, output_basis
from bolaco.workspace import Workspace
from conftest import STRUCTURED, study_of, tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _activations(model, ids):
    adapter = adapter_for(model)
    acts = {}
    hooks = [adapter.module(lids[0]).register_forward_pre_hook(
        lambda _m, a, key=(b, r): acts.setdefault(key, []).append(a[0].detach().double()))
        for b in range(adapter.n_blocks) for r, lids in adapter.block_records(b).items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).reshape(-1, v[0].shape[-1]) for k, v in acts.items()}


@pytest.mark.parametrize("dtype, modules", [("float32", ()), ("bfloat16", ()), ("float16", ()),
                                           ("bfloat16", STRUCTURED)],
                         ids=["float32", "bfloat16", "float16", "bfloat16-structured"])
def test_every_dtype_runs_the_whole_pipeline(dtype, modules, tmp_path, tokenizer):
    model_dir = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(tokenizer), layers=3).to(getattr(torch, dtype)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    study = study_of("d", model={"path": str(model_dir), "dtype": dtype}, seq_len=16, collect={"partitions": 2},
                     budget={"remove": 0.3}, decompose={"refit": True, "rank_multiple": 2, "modules": list(modules)},
                     storage=f"sqlite:///{tmp_path}/s.db", cache_dir=str(tmp_path / "cache"),
                     search={"trials": 3, "space": "groups", "groups": 1, "startup": 1, "select_top": 2},
                     finetune={"steps": 2, "batch_size": 2, "warmup": 0})
    model, tok = bolaco.model.load(str(model_dir), dtype=dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    data = {"calibration": torch.randint(0, len(tokenizer), (16, 16), generator=g),
            "search": torch.randint(0, len(tokenizer), (4, 16), generator=g),
            "selection": torch.randint(0, len(tokenizer), (4, 16), generator=g)}
    ws = Workspace(study, model, tok, adapter_for(model), data)
    cov = ws.covariances(progress=False)
    m = cov.moments(1, "mlp_in")
    assert m.cov.dtype == torch.float64 and m.partition_means.dtype == torch.float64
    # the statistics of the model's own (half) activations, to float32 accumulation precision
    x = _activations(model, data["calibration"])[(1, "mlp_in")]
    assert torch.allclose(m.second, x.T @ x / len(x), rtol=1e-4, atol=1e-4 * float((x.T @ x / len(x)).abs().max()))
    comp = ws.compressor(progress=False)
    if not modules:
        factors = comp.bases.parts("1.up")
        assert factors["down"].dtype == (torch.float32 if dtype == "float32" else getattr(torch, dtype))
    opt = search.run(ws, comp, create=True, trials=3, artifacts=None)
    assert all(torch.isfinite(torch.tensor(t.value)) for t in opt.trials)
    ranks, refitted, _ = search.select(ws, comp, opt, 2)
    out = ws.export(comp, ranks, str(tmp_path / "out"), {}, refitted)
    assert all(p.dtype == getattr(torch, dtype) for p in ws.model.parameters())
    loaded, _ = bolaco.load(out, fuse=False)
    assert next(loaded.parameters()).dtype == getattr(torch, dtype)
    mine, theirs = ws.model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=data["search"]).logits, ws.model(input_ids=data["search"]).logits)
    from bolaco.finetune import SubspaceTuner      # post-training in the model's dtype (LoRA itself in float32)
    tuner = SubspaceTuner(loaded, study.finetune)
    losses = tuner.fit(data["calibration"], progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    merged = tuner.merge()
    assert all(p.dtype == getattr(torch, dtype) for p in merged.parameters())


def test_both_basis_routes_equal_the_float64_reference():
    """eigh of W C W^T (d_out <= d_in) and the SVD of W L with C = L L^T (wide outputs) give the same projectors
    and spectra as an explicit float64 eigendecomposition, for regular and singular moments."""
    g = torch.Generator().manual_seed(0)
    for d_in, d_out, rank_c in ((16, 40, 16), (16, 40, 9), (40, 16, 40)):
        f = torch.randn(d_in, rank_c, generator=g, dtype=torch.float64)
        c = f @ f.T / rank_c
        w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(w @ c @ w.T)
        ref_q, ref_s = evecs.flip(-1), evals.flip(-1)
        q, s = output_basis(w, c)
        assert torch.allclose(s[:min(d_in, d_out)], ref_s[:min(d_in, d_out)], rtol=1e-9, atol=1e-9 * float(ref_s[0]))
        root = input_root(c)
        assert torch.allclose(root @ root.T, c, atol=1e-10)
        for k in (1, 5, min(rank_c, d_out) - 1):
            p, ref = q[:, :k] @ q[:, :k].T, ref_q[:, :k] @ ref_q[:, :k].T
            assert torch.allclose(p, ref, atol=1e-8), (d_in, d_out, rank_c, k)


@pytest.mark.parametrize("device", DEVICES)
def test_bases_on_a_device_and_loaded_factors_equal_the_cpu_reference(device, tmp_path):
    model = tiny_model("qwen2", layers=2)
    calibration = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(1))
    adapter = adapter_for(model)
    cov = collect(model, calibration, tmp_path, partitions=2, progress=False, device=device)
    decomposition = Decomposition(adapter, "feature", ("mlp",), 2)
    bases = build_bases(decomposition, cov, progress=False, device=device)
    for lid in ("0.q", "1.v"):
        moment = cov.moments(int(lid[0]), adapter.record_of(lid.split(".")[1])).cov
        w = adapter.module(lid).weight.double()
        evals, evecs = torch.linalg.eigh(w @ moment @ w.T)
        k = 3
        ref = evecs.flip(-1)[:, :k]
        parts = bases.parts(lid)
        got = parts["up_t"][:k].double()
        assert torch.allclose(got.T @ got, ref @ ref.T, atol=1e-5)
        assert torch.allclose(parts["down"][:k].double(), got @ w, atol=1e-5)
    on_disk = {uid: bases.parts(uid) for uid in decomposition.units}
    assert bases.load(torch.device(device)).startswith("cpu" if device == "cpu" else "cuda")
    for uid, parts in on_disk.items():
        loaded = bases.parts(uid)
        assert all(torch.equal(parts[n], loaded[n].cpu()) for n in parts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streaming moves blocks between CPU memory and a GPU")
def test_streamed_collect_equals_unstreamed_collect(tmp_path):
    model = tiny_model("llama", layers=3)
    calibration = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(2))
    streamed = collect(model, calibration, tmp_path / "a", partitions=2, progress=False, device="cuda")
    assert next(model.parameters()).device.type == "cpu"         # the model stayed in CPU memory
    whole = collect(model.cuda(), calibration, tmp_path / "b", partitions=2, progress=False)
    for b in range(3):
        for r in ("attn_in", "o_in", "mlp_in", "down_in"):
            assert torch.equal(streamed.moments(b, r).cov, whole.moments(b, r).cov)
