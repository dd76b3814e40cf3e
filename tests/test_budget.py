import pytest

from bolaco.arch import adapter_for
from bolaco.decompose import Budget
from bolaco.errors import BolacoError
from conftest import tiny_model


def smol_like_linears():
    """SmolLM2's shapes (30 blocks, 576 hidden, 1536 MLP, GQA 192) without building the model."""
    from bolaco.arch import LinearInfo
    dims = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
            "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
    return {f"{b}.{t}": LinearInfo(f"{b}.{t}", b, t, "", *dims[t], False) for b in range(30) for t in dims}


def test_max_rank_is_the_last_rank_that_saves_parameters():
    budget = Budget(smol_like_linears(), adds_bias=True, multiple=1)
    for lid in ("0.q", "0.k", "0.gate", "0.down"):
        k = budget.max_rank(lid)
        assert budget.lowrank(lid, k) < budget.dense(lid) <= budget.lowrank(lid, k + 1)
    assert Budget(smol_like_linears(), multiple=8).max_rank("0.gate") == 416
    assert budget.decomposable == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)


@pytest.mark.parametrize("remove", [0.1, 0.2, 0.3, 0.5])
@pytest.mark.parametrize("adds_bias", [True, False])
def test_uniform_meets_the_budget_within_one_rounding_step(remove, adds_bias):
    budget = Budget(smol_like_linears(), adds_bias=adds_bias, multiple=8)
    ranks = budget.uniform(remove)
    target = budget.target(remove)
    used = budget.params(ranks)
    assert used <= target
    assert target - used < budget.min_step(ranks)
    keeps = [budget.keep(lid, ranks) for lid in ranks]
    assert max(keeps) - min(keeps) < 0.1    # uniform up to rounding to multiples of 8
    assert all(k % 8 == 0 for k in ranks.values())


def test_fit_follows_the_shape_of_the_keep_ratios():
    budget = Budget(smol_like_linears())
    keeps = {lid: (0.3 if lid.endswith((".q", ".k")) else 0.9) for lid in budget.linears}
    ranks = budget.fit(keeps, budget.target(0.2))
    assert budget.params(ranks) <= budget.target(0.2)
    assert budget.keep("5.q", ranks) < 0.5 < budget.keep("5.up", ranks)


def test_fit_never_touches_layers_without_a_keep_ratio():
    """The v layers are left out (a study's `dense: [v]`); a shape far above the budget must not pull them in."""
    budget = Budget(smol_like_linears())
    keeps = {lid: 0.9 for lid in budget.linears if not lid.endswith(".v")}
    ranks = budget.fit(keeps, budget.target(0.2))
    assert not [lid for lid in ranks if lid.endswith(".v")]
    assert budget.target(0.2) - budget.min_step(ranks) < budget.params(ranks) <= budget.target(0.2)
    with pytest.raises(BolacoError, match="unknown linears"):
        budget.fit({"99.q": 0.5}, budget.target(0.2))


def test_impossible_budgets_are_refused():
    budget = Budget(smol_like_linears())
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(BolacoError, match=r"in \[0, 1\)"):
            budget.target(bad)
    with pytest.raises(BolacoError, match="impossible: even rank 8"):
        budget.target(0.99)
    assert budget.uniform(0.0) == {}


def test_counts_equal_the_modules_of_a_real_model(family):
    adapter = adapter_for(tiny_model(family))
    budget = Budget(adapter.linears, adds_bias=False, multiple=1)
    dense_total = sum(p.numel() for name, p in adapter.model.named_parameters()
                      if any(name.startswith(li.path + ".") for li in adapter.linears.values()))
    assert budget.decomposable == dense_total


def test_uniform_with_dense_types_spends_the_budget_on_the_others():
    budget = Budget(smol_like_linears(), adds_bias=True, multiple=8)
    ranks = budget.uniform(0.2, dense=("k", "v"))
    assert {lid.split(".")[1] for lid in ranks} == {"q", "o", "gate", "up", "down"}
    used, target = budget.params(ranks), budget.target(0.2)
    assert used <= target and target - used < budget.min_step(ranks)
    keeps = [budget.keep(lid, ranks) for lid in ranks]
    assert max(keeps) - min(keeps) < 0.1
    # the others keep less than at the plain uniform allocation: they pay for k and v
    plain = budget.uniform(0.2)
    assert all(ranks[lid] <= plain[lid] for lid in ranks) and sum(ranks.values()) < sum(plain[l] for l in ranks)
