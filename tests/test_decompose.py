import pytest
import torch

from bolaco.calibrate import collect
from bolaco.decompose import build_bases
from bolaco.decompose.methods.factors import factor_parts, output_basis, truncate
from bolaco.export import count_params
from bolaco.layers import ColumnsLinear, LowRankLinear, NarrowLinear, RowsLinear
from conftest import STRUCTURED, tiny_model, uniform_compressor

METHODS = ("feature", "feature-uncentred", "weight")


def lowrank_factors(weight, bias, q, w_mean):
    """(down, up, bias) at the full width of q, through the same code the compressor uses."""
    return truncate(factor_parts(weight, q, w_mean), q.shape[1], bias, weight.dtype)


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
    assert comp.levels == ranks
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
    real_prepare = decompose._prepare
    monkeypatch.setattr(decompose, "_prepare", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = build_bases(comp.decomposition, cov, progress=False)
    store = again.stores["feature"]
    assert store.complete and store.root == comp.bases.stores["feature"].root
    lid = f"1.{adapter.types[-2]}"        # gate/up, gate_up, or an MoE model's o
    parts = {k: v[:5] for k, v in again.parts(lid).items() if k != "w_mean"}
    q_t, down = parts["up_t"], parts["down"]
    assert q_t.shape == (5, adapter.linears[lid].d_out) and down.shape == (5, adapter.linears[lid].d_in)
    assert torch.allclose(q_t @ q_t.T, torch.eye(5), atol=1e-5)
    assert torch.allclose(down, q_t @ adapter.module(lid).weight, atol=1e-5)   # cached Q^T W
    spectrum = again.parts(lid)["spectrum"]
    assert torch.all(spectrum[:-1] >= spectrum[1:])                                  # sorted descending

    # a damaged block is recomputed by the next build, bit for bit
    path = store.block_path(1)
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[-3] ^= 0xFF
    path.write_bytes(bytes(damaged))
    monkeypatch.setattr(decompose, "_prepare", real_prepare)
    build_bases(comp.decomposition, collect(model, calibration, tmp_path, partitions=2, progress=False),
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


def _materialised(model, adapter, calibration, lids):
    """The dense inputs of the given linears over the calibration set, float64 rows."""
    seen = {lid: [] for lid in lids}
    hooks = [adapter.module(lid).register_forward_pre_hook(
        lambda _m, a, lid=lid: seen[lid].append(a[0].reshape(-1, a[0].shape[-1]).double())) for lid in lids]
    with torch.no_grad():
        model(input_ids=calibration)
    for h in hooks:
        h.remove()
    return {lid: torch.cat(v) for lid, v in seen.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma3"])
def test_structured_modules_at_full_size_are_the_dense_modules(family, tmp_path):
    """Every structured unit built at its full level (all neurons, all head dimensions, full rank) reproduces
    the dense block, biases included; per-matrix units of the same model stay dense here."""
    model = tiny_model(family)
    calibration = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(4))
    adapter, comp = uniform_compressor(model, calibration, tmp_path, modules=STRUCTURED)
    with torch.no_grad():
        dense = model(input_ids=calibration).logits
    structured = [u for u in comp.budget.units.values() if u.type in STRUCTURED]
    assert structured
    for u in structured:
        for lid, m in comp.open_loop(u.id, u.full).items():
            comp.install(lid, m)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=calibration).logits, dense, atol=1e-4)
    kinds = {type(adapter.module(lid)) for u in structured for lid in u.linears}
    assert NarrowLinear in kinds and (RowsLinear in kinds) == (family != "phi3")
    comp.restore()


def test_the_structured_mlp_keeps_neurons_by_greedy_elimination_and_refits_down_by_least_squares(tmp_path):
    """down' = W_D C[:, S] C[S, S]^-1 with its bias keeping the mean: the least-squares map from the kept neurons'
    materialised features to the dense outputs (float64 reference); gate and up keep exactly those rows. The order
    is greedy backward elimination: each step drops the neuron whose removal (with the refit) raises the
    least-squares error least, recomputed by brute force here."""
    model = tiny_model("qwen2")
    calibration = torch.randint(0, 300, (16, 16), generator=torch.Generator().manual_seed(7))
    adapter, comp = uniform_compressor(model, calibration, tmp_path, modules=("mlp",))
    h = _materialised(model, adapter, calibration, ["1.down"])["1.down"]
    dense_down = adapter.module("1.down")
    with torch.no_grad():
        y = h @ dense_down.weight.double().T + (dense_down.bias.double() if dense_down.bias is not None else 0)
    unit = comp.budget.units["1.mlp"]
    order = comp.bases.parts("1.mlp")["order"]
    for k in (24, 64):
        layers = comp.open_loop("1.mlp", k)
        gate, down = layers["1.gate"], layers["1.down"]
        kept = order[:k]
        assert torch.equal(gate.weight, adapter.module("1.gate").weight[kept])
        design = torch.cat([h[:, kept], torch.ones(len(h), 1, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(design, y).solution
        assert torch.allclose(down.weight.double(), coef[:k].T, atol=2e-3, rtol=1e-3)
        assert torch.allclose(down.bias.double(), coef[k], atol=2e-3)
        assert sum(p.numel() for m in layers.values() for p in m.parameters()) == unit.params(k)

    def error(keep):
        design = torch.cat([h[:, keep], torch.ones(len(h), 1, dtype=torch.float64)], 1)
        return float((y - design @ torch.linalg.lstsq(design, y).solution).square().sum())

    alive, dropped = list(range(h.shape[1])), []
    for _ in range(32):
        cost = [error([j for j in alive if j != i]) for i in alive]
        dropped.append(alive.pop(min(range(len(alive)), key=cost.__getitem__)))
    assert order.flip(0)[:32].tolist() == dropped
    assert error(order[:48].tolist()) < error(order.flip(0)[:48].tolist())


def test_structured_attention_drops_whole_rotary_pairs_and_keeps_the_output_mean(tmp_path):
    model = tiny_model("llama", layers=2)
    calibration = torch.randint(0, 300, (16, 16), generator=torch.Generator().manual_seed(8))
    adapter, comp = uniform_compressor(model, calibration, tmp_path, modules=("qk", "vo"))
    heads = adapter.heads
    half = heads.head_dim // 2
    qk = comp.open_loop("0.qk", 4)
    q, k = qk["0.q"], qk["0.k"]
    assert q.index.numel() == heads.n_heads * 4 and k.index.numel() == heads.n_kv * 4
    for rows, n in ((q.index, heads.n_heads), (k.index, heads.n_kv)):
        dims = (rows % heads.head_dim).view(n, 4)
        assert torch.equal(dims[:, 2:], dims[:, :2] + half)            # pairs i and i + head_dim / 2
    per_group = (q.index % heads.head_dim).view(heads.n_kv, heads.per_group, 4)
    assert torch.equal(per_group, per_group[:, :1].expand_as(per_group))   # one choice per key/value group
    assert torch.equal((k.index % heads.head_dim).view(heads.n_kv, 4), per_group[:, 0])
    # V/O: the attention output's mean survives any rank (softmax weights sum to one)
    o_in = _materialised(model, adapter, calibration, ["0.o"])["0.o"]
    dense_o = adapter.module("0.o")
    vo = comp.open_loop("0.vo", 2)
    comp.install("0.v", vo["0.v"])
    comp.install("0.o", vo["0.o"])
    out = []
    h = adapter.module("0.o").register_forward_hook(lambda _m, _a, y: out.append(y.reshape(-1, y.shape[-1])))
    with torch.no_grad():
        model(input_ids=calibration)
    h.remove()
    comp.restore()
    dense_mean = (o_in @ dense_o.weight.double().T).mean(0)
    assert torch.allclose(torch.cat(out).double().mean(0), dense_mean, atol=1e-4)
    assert isinstance(vo["0.o"], ColumnsLinear) and vo["0.o"].index.numel() == heads.n_heads * 2
