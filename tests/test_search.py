
import pytest
import torch
from optuna.trial import TrialState

from bolaco import search
from bolaco.arch import Adapter
from bolaco.errors import BolacoError
from bolaco.study import SearchConfig, Study
from bolaco.workspace import Workspace
from conftest import tiny_model


def tiny_workspace(tmp_path, sampler="botorch", **search_kw):
    model = tiny_model("llama", layers=4)
    g = torch.Generator().manual_seed(0)
    data = {"calibration": torch.randint(0, 300, (8, 16), generator=g),
            "search": torch.randint(0, 300, (4, 16), generator=g)}
    cfg = SearchConfig(**{"sampler": sampler, "trials": 8, "groups": 2, "r_min": 0.2, "startup": 3, **search_kw})
    study = Study(name="tiny", seq_len=16, partitions=2, remove=0.3, rank_multiple=2,
                  storage=f"sqlite:///{tmp_path}/studies.db", cache_dir=str(tmp_path / "cache"), search=cfg)
    ws = Workspace(study, model, None, Adapter(model), data)
    return ws, ws.compressor(progress=False)


def test_every_trial_meets_the_budget_trial_0_is_uniform_and_rerun_resumes(tmp_path):
    ws, comp = tiny_workspace(tmp_path)
    opt = search.run(ws, comp, create=True, trials=5, artifacts=str(tmp_path / "artifacts"))
    budget = comp.budget
    target = budget.target(0.3)
    trials = opt.get_trials(states=(TrialState.COMPLETE,))
    space = search.SearchSpace.from_study(ws.study, ws.adapter, budget)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    for t in trials:
        ranks = t.user_attrs["ranks"]
        assert t.user_attrs["params"] == budget.params(ranks) <= target
        assert target - budget.params(ranks) < budget.min_step(ranks)
        assert t.user_attrs["search_ppl"] == t.value
    assert trials[0].user_attrs["allocation"] == "uniform"
    assert len(set(trials[0].params.values())) == 1
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 5   # BoTorch proposes new points
    for t in trials:   # and every proposal lies on the budget hyperplane before rounding
        x = torch.tensor([t.params[n] for n in space.names], dtype=torch.float64)
        assert float(space.coefficients() @ x) == pytest.approx(space.rhs, rel=1e-4)
    # a heat map per completed trial in the artifact store
    assert len(list((tmp_path / "artifacts").iterdir())) == 5

    again = search.run(ws, comp, create=True, trials=5, artifacts=str(tmp_path / "artifacts"))
    assert len(again.trials) == 5                        # nothing redone
    more = search.run(ws, comp, create=False, trials=8, artifacts=str(tmp_path / "artifacts"))  # a joining worker
    assert [t.number for t in more.get_trials(states=(TrialState.COMPLETE,))] == list(range(8))
    ranks, best = search.best_ranks(ws.study)
    assert best.value == min(t.value for t in more.trials) and ranks == best.user_attrs["ranks"]


@pytest.mark.parametrize("sampler", ["gp", "tpe", "random"])
def test_other_samplers_are_projected_onto_the_same_budget(tmp_path, sampler):
    ws, comp = tiny_workspace(tmp_path, sampler=sampler)
    opt = search.run(ws, comp, create=True, trials=3, artifacts=None)
    target = comp.budget.target(0.3)
    for t in opt.trials:
        assert t.state == TrialState.COMPLETE
        assert target - comp.budget.min_step(t.user_attrs["ranks"]) < t.user_attrs["params"] <= target


def test_search_space_layout_ties_and_dense_types(tmp_path):
    ws, comp = tiny_workspace(tmp_path, tie=(("q", "k"),), dense=("v",))
    space = search.SearchSpace.from_study(ws.study, ws.adapter, comp.budget)
    assert len(space.names) == 2 * 5 and "q+k.b0-1" in space.names
    assert space.variables["q+k.b2-3"] == ["2.q", "2.k", "3.q", "3.k"]
    ranks = space.ranks(space.uniform_point())
    assert not any(lid.endswith(".v") for lid in ranks)
    assert comp.budget.params(ranks) <= comp.budget.target(0.3)


def test_bad_search_input_is_refused(tmp_path):
    ws, comp = tiny_workspace(tmp_path, r_min=0.9)
    with pytest.raises(BolacoError, match="cannot meet remove"):
        search.SearchSpace.from_study(ws.study, ws.adapter, comp.budget)
    ws, comp = tiny_workspace(tmp_path, tie=(("q", "qq"),))
    with pytest.raises(BolacoError, match="unknown type 'qq'"):
        search.SearchSpace.from_study(ws.study, ws.adapter, comp.budget)
    with pytest.raises(BolacoError, match="cannot open the study storage"):
        search.open_storage("postgresql+psycopg://nobody@127.0.0.1:9/none")
    ws, comp = tiny_workspace(tmp_path)
    with pytest.raises(BolacoError, match="start it with `make study`"):
        search.run(ws, comp, create=False)


def test_malformed_study_files_are_refused(tmp_path):
    from bolaco.study import load_study
    cases = {"sampler: cmaes": "unknown sampler", "trials: 0": "trials >= 1", "colour: red": "unknown key",
             "tie: [[q, k]]\n  nonsense: 1": "unknown key"}
    for body, message in cases.items():
        f = tmp_path / "s.yaml"
        f.write_text("name: s\nsearch:\n  " + body + "\n")
        with pytest.raises(BolacoError, match=message):
            load_study(f)
    f.write_text("name: [unclosed\n")
    with pytest.raises(BolacoError, match="not valid YAML"):
        load_study(f)


def test_kl_term_enters_the_objective(tmp_path):
    ws, comp = tiny_workspace(tmp_path, sampler="random", kl_weight=10.0)
    opt = search.run(ws, comp, create=True, trials=2, artifacts=None)
    for t in opt.trials:
        assert t.user_attrs["search_kl"] > 0
        assert t.value == pytest.approx(t.user_attrs["search_ppl"] + 10.0 * t.user_attrs["search_kl"])


def test_a_failed_acquisition_optimisation_falls_back_to_the_polytope(tmp_path, monkeypatch):
    import botorch.optim
    from botorch.exceptions.errors import CandidateGenerationError

    def fail(*args, **kwargs):
        raise CandidateGenerationError("Optimization failed: Iteration limit reached")

    monkeypatch.setattr(botorch.optim, "optimize_acqf", fail)
    ws, comp = tiny_workspace(tmp_path, startup=1)
    with pytest.warns(UserWarning, match="could not optimise the acquisition"):
        opt = search.run(ws, comp, create=True, trials=3, artifacts=None)
    assert [t.state for t in opt.trials] == [TrialState.COMPLETE] * 3
    space = search.SearchSpace.from_study(ws.study, ws.adapter, comp.budget)
    for t in opt.trials[1:]:   # fallback points lie on the budget hyperplane
        x = torch.tensor([t.params[n] for n in space.names], dtype=torch.float64)
        assert float(space.coefficients() @ x) == pytest.approx(space.rhs, rel=1e-6)
