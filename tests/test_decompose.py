import pytest
import torch

from bolaco.calibrate import collect
from bolaco.layers import LowRankLinear
from bolaco.decompose.bases import METHODS, build_bases, factor_parts, output_basis, truncate
from bolaco.export import count_params
from conftest import tiny_model, uniform_compressor


def lowrank_factors(weight, bias, q, w_mean):
    """(down, up, bias) at the full width of q, through the same code the compressor uses."""
    return truncate(factor_parts(weight, q, w_mean), bias, weight.dtype)


def _data(d_in=12, d_out=10, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    x = mix @ torch.randn(d_in, n, generator=g, dtype=torch.float64) + 3 * torch.randn(d_in, 1, generator=g,
                                                                                         dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    return x, w, b


def test_uncentred_feature_basis_is_the_closed_form_minimiser():
    x, w, _ = _data()
    k = 4
    second = x @ x.T / x.shape[1]
    q, _ = output_basis(w, second)
    approx = q[:, :k] @ q[:, :k].T @ w
    # closed form: W' = [W L]_k L^-1 with X X^T / n = L L^T (whitened truncated SVD, SVD-LLM)
    chol = torch.linalg.cholesky(second)
    u, s, vt = torch.linalg.svd(w @ chol)
    closed = u[:, :k] @ torch.diag(s[:k]) @ vt[:k] @ torch.linalg.inv(chol)
    assert torch.allclose(approx, closed, atol=1e-9)
    best = torch.linalg.norm((w - approx) @ x)
    g = torch.Generator().manual_seed(1)
    for trial in range(200):
        if trial % 2:
            cand = torch.randn(10, k, generator=g, dtype=torch.float64) @ torch.randn(k, 12, generator=g,
                                                                                         dtype=torch.float64)
        else:  # small rank-k perturbations of the optimum
            du = q[:, :k] + 0.05 * torch.randn(10, k, generator=g, dtype=torch.float64)
            cand = du @ torch.linalg.pinv(du) @ w
        assert torch.linalg.norm((w - cand) @ x) >= best - 1e-9


def test_centred_feature_with_bias_beats_uncentred_on_affine_error():
    x, w, b = _data(seed=3)
    y = w @ x + b[:, None]
    mu = x.mean(1)
    cov = (x - mu[:, None]) @ (x - mu[:, None]).T / x.shape[1]
    second = x @ x.T / x.shape[1]
    for k in (1, 3, 5, 8):
        qc, _ = output_basis(w, cov)
        down, up, bk = lowrank_factors(w, b, qc[:, :k], w @ mu)
        err_c = torch.linalg.norm(up @ down @ x + bk[:, None] - y)
        qu, _ = output_basis(w, second)
        down, up, bu = lowrank_factors(w, b, qu[:, :k], None)
        err_u = torch.linalg.norm(up @ down @ x + bu[:, None] - y)
        assert err_c <= err_u + 1e-9
        # the bias is the mean of the discarded directions of the materialised outputs, plus Q Q^T b
        qk = qc[:, :k]
        expected = (torch.eye(10, dtype=torch.float64) - qk @ qk.T) @ y.mean(1) + qk @ qk.T @ b
        assert torch.allclose(bk, expected, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reproduces_the_dense_layer(method):
    x, w, b = _data(seed=5)
    w32, b32 = w.float(), b.float()
    mu = x.mean(1)
    cov = (x - mu[:, None]) @ (x - mu[:, None]).T / x.shape[1]
    moment = {"feature": cov, "feature-uncentred": x @ x.T / x.shape[1], "weight": None}[method]
    q, _ = output_basis(w, moment)
    layer = LowRankLinear.from_factors(*lowrank_factors(w32, b32, q, (w @ mu) if method == "feature" else None))
    dense = torch.nn.Linear(12, 10)
    with torch.no_grad():
        dense.weight.copy_(w32)
        dense.bias.copy_(b32)
        xs = x.T.float()
        assert torch.allclose(layer(xs), dense(xs), atol=1e-4, rtol=1e-5)


@pytest.fixture
def compressed(family, tmp_path):
    model = tiny_model(family)
    calibration = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(4))
    adapter, comp = uniform_compressor(model, calibration, tmp_path, partitions=2)
    return model, adapter, comp, calibration


def test_parameter_counts_and_bias_match_the_modified_model(compressed):
    model, adapter, comp, calibration = compressed
    other = count_params(model) - comp.budget.decomposable
    ranks = comp.budget.uniform(0.3)
    assert ranks
    comp.apply(ranks)
    assert comp.ranks == ranks
    assert count_params(model) == other + comp.budget.params(ranks)
    # the bias of one factorised layer equals the formula evaluated on materialised activations
    lid = next(iter(ranks))
    layer = adapter.module(lid)
    dense = comp.dense(lid)
    seen = []
    h = dense.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    comp.restore()
    with torch.no_grad():
        model(input_ids=calibration)
    h.remove()
    y_mean = torch.cat(seen) @ dense.weight.double().T
    b = dense.bias.double() if dense.bias is not None else torch.zeros(dense.out_features, dtype=torch.float64)
    # pooled mean over 2 equal partitions = plain mean
    q = layer.up.weight.double()
    expected = (torch.eye(len(b), dtype=torch.float64) - q @ q.T) @ (y_mean.mean(0) + b) + q @ q.T @ b
    assert torch.allclose(layer.up.bias.double(), expected, atol=1e-4)


def test_apply_then_restore_is_bit_identical(compressed):
    model, adapter, comp, calibration = compressed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = calibration[:2]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        comp.apply(comp.budget.uniform(0.2))
        assert any(isinstance(adapter.module(l), LowRankLinear) for l in adapter.linears)
        assert not torch.equal(model(input_ids=ids).logits, ref)
        comp.apply(comp.budget.uniform(0.4))
        comp.restore()
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_bases_cache_is_reused_and_verified(compressed, tmp_path, monkeypatch):
    model, adapter, comp, calibration = compressed
    cov = collect(model, calibration, tmp_path, partitions=2, progress=False)   # the cached run
    import bolaco.decompose.bases as decompose
    real_block_bases = decompose._block_bases
    monkeypatch.setattr(decompose, "_block_bases", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = build_bases(adapter, cov, "feature", progress=False)
    assert again.store.complete and again.store.root == comp.bases.store.root
    lid = f"1.{adapter.types[-2]}"        # gate/up, gate_up, or an MoE model's o
    parts = again.parts(lid, 5)
    q_t, down = parts["up_t"], parts["down"]
    assert q_t.shape == (5, adapter.linears[lid].d_out) and down.shape == (5, adapter.linears[lid].d_in)
    assert torch.allclose(q_t @ q_t.T, torch.eye(5), atol=1e-5)
    assert torch.allclose(down, q_t @ adapter.module(lid).weight, atol=1e-5)   # cached Q^T W
    spectrum = again.spectrum(lid)
    assert torch.all(spectrum[:-1] >= spectrum[1:])                                  # sorted descending

    # a damaged block is recomputed by the next build, bit for bit
    path = again.store.block_path(1)
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[-3] ^= 0xFF
    path.write_bytes(bytes(damaged))
    monkeypatch.setattr(decompose, "_block_bases", real_block_bases)
    build_bases(adapter, collect(model, calibration, tmp_path, partitions=2, progress=False), "feature",
                progress=False)
    assert path.read_bytes() == original


def test_the_direct_forward_equals_the_module_calls_and_yields_to_hooks():
    torch.manual_seed(0)
    layer = LowRankLinear(12, 10, 4, bias=True)
    x = torch.randn(3, 5, 12)
    direct = layer(x)
    seen = []
    handle = layer.down.register_forward_hook(lambda _m, _a, out: seen.append(out))   # forces the module calls
    assert torch.equal(layer(x), direct) and len(seen) == 1
    handle.remove()
    layer.down.forward = lambda _x: torch.zeros(3, 5, 4)     # a replaced forward (accelerate's offload) is called
    assert torch.equal(layer(x), layer.up.bias.expand(3, 5, 10))
