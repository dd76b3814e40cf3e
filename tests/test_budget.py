from types import SimpleNamespace

import pytest
import torch

from bolaco.arch import Heads, LinearInfo, adapter_for
from bolaco.decompose import METHODS, Budget, Decomposition
from bolaco.errors import BolacoError
from conftest import STRUCTURED, tiny_model

SMOL = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576), "gate": (576, 1536), "up": (576, 1536),
        "down": (1536, 576)}


def smol_like(method="feature", multiple=8, modules=()):
    """SmolLM2's shapes (30 blocks, 576 hidden, 1536 MLP, 9 heads in 3 GQA groups of 64) without building the
    model: the budget of a decomposition of them."""
    linears = {f"{b}.{t}": LinearInfo(f"{b}.{t}", b, t, "", *SMOL[t], False) for b in range(30) for t in SMOL}
    adapter = SimpleNamespace(linears=linears, n_blocks=30, types=tuple(SMOL), heads=Heads(9, 3, 64),
                              modules={"qk": ("q", "k"), "vo": ("v", "o"), "mlp": ("gate", "up", "down")},
                              family="llama")
    return Decomposition(adapter, method, modules, multiple).budget


def test_max_rank_is_the_last_rank_that_saves_parameters():
    budget = smol_like(multiple=1)
    for lid in ("0.q", "0.k", "0.gate", "0.down"):
        k = budget.max_level(lid)
        assert budget.at(lid, k) < budget.dense(lid) <= budget.at(lid, k + 1)
    assert smol_like(multiple=8).max_level("0.gate") == 416
    assert budget.decomposable == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)


def test_structured_units_count_exactly_and_save_at_every_level_below_full():
    budget = smol_like(modules=STRUCTURED)
    assert set(budget.units) == {f"{b}.{t}" for b in range(30) for t in ("qk", "vo", "mlp")}
    assert budget.decomposable == smol_like().decomposable
    mlp, qk, vo = budget.units["0.mlp"], budget.units["0.qk"], budget.units["0.vo"]
    assert mlp.params(1232) == 3 * 576 * 1232 + 576 and mlp.max_level() == 1528     # down's bias keeps the mean
    assert qk.params(48) == (9 + 3) * 48 * 576 and qk.max_level() == 62 and qk.step == 2
    assert vo.params(48) == 3 * 48 * 576 + 9 * 48 * 576 + 576 and vo.max_level() == 62
    for u in (mlp, qk, vo):
        assert u.params(u.max_level()) < u.dense <= u.params(u.max_level() + u.step)


@pytest.mark.parametrize("remove", [0.1, 0.2, 0.3, 0.5])
@pytest.mark.parametrize("method", ["feature", "feature-uncentred"])
def test_uniform_meets_the_budget_within_one_rounding_step(remove, method):
    budget = smol_like(method)
    ranks = budget.uniform(remove)
    target = budget.target(remove)
    used = budget.params(ranks)
    assert used <= target
    assert target - used < budget.min_step(ranks)
    keeps = [budget.keep(lid, ranks) for lid in ranks]
    assert max(keeps) - min(keeps) < 0.1    # uniform up to rounding to multiples of 8
    assert all(k % 8 == 0 for k in ranks.values()) and isinstance(budget, Budget)


def test_fit_follows_the_shape_of_the_keep_ratios():
    budget = smol_like()
    keeps = {lid: (0.3 if lid.endswith((".q", ".k")) else 0.9) for lid in budget.units}
    ranks = budget.fit(keeps, budget.target(0.2))
    assert budget.params(ranks) <= budget.target(0.2)
    assert budget.keep("5.q", ranks) < 0.5 < budget.keep("5.up", ranks)


def test_fit_never_touches_layers_without_a_keep_ratio():
    """The v layers are left out (a study's `dense: [v]`); a shape far above the budget must not pull them in."""
    budget = smol_like()
    keeps = {lid: 0.9 for lid in budget.units if not lid.endswith(".v")}
    ranks = budget.fit(keeps, budget.target(0.2))
    assert not [lid for lid in ranks if lid.endswith(".v")]
    assert budget.target(0.2) - budget.min_step(ranks) < budget.params(ranks) <= budget.target(0.2)
    with pytest.raises(BolacoError, match="unknown units"):
        budget.fit({"99.q": 0.5}, budget.target(0.2))


def test_impossible_budgets_are_refused():
    budget = smol_like()
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(BolacoError, match=r"in \[0, 1\)"):
            budget.target(bad)
    with pytest.raises(BolacoError, match="impossible: even the smallest level everywhere"):
        budget.target(0.99)
    assert budget.uniform(0.0) == {}


@pytest.mark.parametrize("modules", [(), STRUCTURED], ids=["factors", "structured"])
def test_counts_equal_the_modules_of_a_real_model(family, modules):
    """The budget's count of every unit at a level is the parameter count of the layers its method builds."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    decomposition = Decomposition(adapter, "feature", modules, 2)
    budget = decomposition.budget
    dense_total = sum(p.numel() for name, p in model.named_parameters()
                      if any(name.startswith(li.path + ".") for li in adapter.linears.values()))
    assert budget.decomposable == dense_total
    for u in list(budget.units.values())[:8]:
        method = decomposition.method_of(u.id)
        level = max(u.step, u.max_level() // 2 // u.step * u.step)
        built = method.build(u, level, _parts(method, u, model), lambda lid: adapter.module(lid))
        assert sum(p.numel() for m in built.values() for p in m.parameters()) == u.params(level), u.id


def _parts(method, unit, model):
    """Stand-in cached tensors of the right shapes (build only slices them)."""
    from bolaco.calibrate.covariance import Moments
    adapter = method.adapter

    class Stats:
        def moments(self, block, record):
            d = adapter.record_dim(record)
            return Moments(torch.eye(d, dtype=torch.float64), torch.zeros(2, d, dtype=torch.float64), 10)

    parts = method.prepare(Stats(), unit.block, torch.device("cpu"), torch.float32)
    return {k.split(".", 1)[1]: v for k, v in parts.items() if k.split(".", 1)[0] == unit.type}


def test_the_registry_names_every_method_and_refuses_a_misplaced_one():
    assert METHODS.names() == ("feature", "feature-uncentred", "weight", "qk", "vo", "mlp")
    adapter = adapter_for(tiny_model("llama"))
    with pytest.raises(BolacoError, match="decompose.method: 'mlp' is a structured module; list it under "
                                          "decompose.modules"):
        Decomposition(adapter, "mlp")
    with pytest.raises(BolacoError, match="decompose.modules: unknown decomposition method 'heads'; choose from"):
        Decomposition(adapter, "feature", ("heads",))


def test_uniform_with_dense_types_spends_the_budget_on_the_others():
    budget = smol_like()
    ranks = budget.uniform(0.2, dense=("k", "v"))
    assert {lid.split(".")[1] for lid in ranks} == {"q", "o", "gate", "up", "down"}
    used, target = budget.params(ranks), budget.target(0.2)
    assert used <= target and target - used < budget.min_step(ranks)
    keeps = [budget.keep(lid, ranks) for lid in ranks]
    assert max(keeps) - min(keeps) < 0.1
    # the others keep less than at the plain uniform allocation: they pay for k and v
    plain = budget.uniform(0.2)
    assert all(ranks[lid] <= plain[lid] for lid in ranks) and sum(ranks.values()) < sum(plain[l] for l in ranks)
