import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from bolaco.evaluate import perplexity
from bolaco import search
from bolaco.arch import adapter_for
from bolaco.errors import BolacoError
from bolaco.export import count_params
from bolaco.workspace import Workspace
from conftest import STRUCTURED, study_of, tiny_model

HELPER = Path(__file__).parent / "helpers" / "tiny_worker.py"


def tiny_workspace(tmp_path, sampler="botorch", layers=4, family="llama", modules=(), name="tiny", **search_kw):
    model = tiny_model(family, layers=layers)
    g = torch.Generator().manual_seed(0)
    data = {"calibration": torch.randint(0, 300, (8, 16), generator=g),
            "search": torch.randint(0, 300, (4, 16), generator=g),
            "selection": torch.randint(0, 300, (4, 16), generator=g)}
    study = study_of(name, seq_len=16, collect={"partitions": 2}, budget={"remove": 0.3},
                     decompose={"rank_multiple": 2, "modules": list(modules)},
                     storage=f"sqlite:///{tmp_path}/studies.db", cache_dir=str(tmp_path / "cache"),
                     search={"sampler": sampler, "trials": 8, "space": "groups", "groups": 2, "r_min": 0.2,
                             # the search's mechanics are checked on the log-perplexity (the default objective
                             # adds the recall tokens' NLL: test_recall_objective_...)
                             "startup": 3, "objective": "ppl", **search_kw})
    ws = Workspace(study, model, None, adapter_for(model), data)
    return ws, ws.compressor(progress=False)


def space_of(ws, comp):
    return search.SearchSpace.from_study(ws.study, comp.decomposition)


def finished_allocations(opt):
    done = opt.get_trials(states=(TrialState.COMPLETE,))
    return [tuple(sorted(t.user_attrs["levels"].items())) for t in done]


def test_every_trial_meets_the_budget_trial_0_is_uniform_and_rerun_resumes(tmp_path):
    ws, comp = tiny_workspace(tmp_path)
    opt = search.run(ws, comp, create=True, trials=5, artifacts=str(tmp_path / "artifacts"))
    budget = comp.budget
    target = budget.target(0.3)
    trials = opt.get_trials(states=(TrialState.COMPLETE,))
    space = space_of(ws, comp)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    for t in trials:
        ranks = t.user_attrs["levels"]
        assert t.user_attrs["params"] == budget.params(ranks) <= target
        assert target - budget.params(ranks) < budget.min_step(ranks)
        assert space.levels(t.params) == ranks                       # the stored point is the evaluated one
        assert t.value == pytest.approx(math.log(t.user_attrs["search_ppl"]))   # the GP models log-perplexity
        x = space.vector(t.params)                                   # every point lies on the budget hyperplane
        assert float(space.coefficients @ x) == pytest.approx(space.rhs, rel=1e-9)
    assert trials[0].user_attrs["proposal"] == "uniform" and len(set(trials[0].params.values())) == 1
    assert [t.user_attrs["proposal"] for t in trials[1:]] == ["startup", "startup", "model", "model"]
    assert len(set(finished_allocations(opt))) == 5
    assert len([p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]) == 5   # a heat map per trial

    again = search.run(ws, comp, create=True, trials=5, artifacts=str(tmp_path / "artifacts"))
    assert len(again.trials) == 5                        # nothing redone
    more = search.run(ws, comp, create=False, trials=8, artifacts=None)   # a joining worker
    assert [t.number for t in more.get_trials(states=(TrialState.COMPLETE,))] == list(range(8))
    assert len(set(finished_allocations(more))) == 8
    ranks, best = search.best_levels(ws.study)
    assert best.value == min(t.value for t in more.trials) and ranks == best.levels
    assert search.summary(more)["proposals"] == {"uniform": 1, "startup": 2, "model": 5}
    # Optuna's own plots read the study as users open it (plotly is a dependency)
    history = optuna.visualization.plot_optimization_history(more)
    assert sorted(history.data[0].y) == sorted(t.value for t in more.get_trials(states=(TrialState.COMPLETE,)))


def test_a_resume_in_the_middle_of_start_up_draws_new_points(tmp_path):
    ws, comp = tiny_workspace(tmp_path, startup=6)
    search.run(ws, comp, create=True, trials=3, artifacts=None)
    opt = search.run(ws, comp, create=True, trials=6, artifacts=None)
    trials = opt.get_trials(states=(TrialState.COMPLETE,))
    assert [t.user_attrs["proposal"] for t in trials] == ["uniform"] + ["startup"] * 5
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    assert len(set(finished_allocations(opt))) == 6


@pytest.mark.parametrize("sampler", ["botorch", "gp", "tpe", "random"])
def test_every_sampler_meets_the_budget_and_leaves_dense_types_alone(tmp_path, sampler):
    ws, comp = tiny_workspace(tmp_path, sampler=sampler, dense=("v",), r_min=0.5, startup=2)
    opt = search.run(ws, comp, create=True, trials=5, artifacts=None)
    target = comp.budget.target(0.3)
    space = space_of(ws, comp)
    trials = opt.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 5 and len(set(finished_allocations(opt))) == 5
    for t in trials:
        ranks = t.user_attrs["levels"]
        assert not [lid for lid in ranks if lid.endswith(".v")]
        assert target - comp.budget.min_step(ranks) < t.user_attrs["params"] <= target
        assert all(0.5 <= v <= 1 for v in t.params.values())
        assert float(space.coefficients @ space.vector(t.params)) == pytest.approx(space.rhs, rel=1e-9)
    if sampler != "random":
        assert trials[-1].user_attrs["proposal"] == "model"


def test_search_space_parameterisations(tmp_path):
    ws, comp = tiny_workspace(tmp_path, tie=(("q", "k"),), dense=("v",))
    space = space_of(ws, comp)
    assert space.dim == 2 * 5 and "q+k.b0-1" in space.names
    column = space.names.index("q+k.b2-3")
    assert [space.uids[i] for i in torch.nonzero(space.weights[:, column]).flatten()] == ["2.q", "2.k", "3.q", "3.k"]
    ranks = space.levels(space.uniform_point())
    assert not any(lid.endswith(".v") for lid in ranks)
    assert comp.budget.params(ranks) <= comp.budget.target(0.3)

    ws, comp = tiny_workspace(tmp_path, space="types")
    types = space_of(ws, comp)
    assert types.names == ("q", "k", "v", "o", "gate", "up", "down")
    ws, comp = tiny_workspace(tmp_path, space="knots", knots=3, layers=5)
    knots = space_of(ws, comp)
    assert knots.dim == 21 and knots.names[:3] == ("q.k0", "q.k1", "q.k2")
    # block b of 5 sits at 2b/4 on the knots: weights (1,0,0) (.5,.5,0) (0,1,0) (0,.5,.5) (0,0,1)
    rows = [knots.uids.index(f"{b}.q") for b in range(5)]
    assert knots.weights[rows, :3].tolist() == [[1, 0, 0], [.5, .5, 0], [0, 1, 0], [0, .5, .5], [0, 0, 1]]
    assert torch.allclose(knots.weights.sum(1), torch.ones(len(knots.uids), dtype=torch.float64))
    # projection: onto the plane, inside the box, and the identity on the plane
    x = torch.linspace(0.2, 1.0, knots.dim, dtype=torch.float64)
    p = knots.project(x)
    assert float(knots.coefficients @ p) == pytest.approx(knots.rhs, rel=1e-12)
    assert float(p.min()) >= knots.r_min and float(p.max()) <= 1
    assert torch.allclose(knots.project(p), p, rtol=1e-12)
    z = torch.arange(7, dtype=torch.float64) / 10 + 0.2
    assert torch.allclose(knots.coarse_of(knots.coarse_lift @ z), z)


def test_coarse_to_fine_proposes_one_ratio_per_type_first(tmp_path):
    ws, comp = tiny_workspace(tmp_path, coarse_trials=5, startup=2)
    opt = search.run(ws, comp, create=True, trials=7, artifacts=None)
    trials = opt.get_trials(states=(TrialState.COMPLETE,))
    for t in trials:
        per_type = {}
        for name, v in t.params.items():
            per_type.setdefault(name.split(".")[0], set()).add(round(v, 12))
        coarse = all(len(vals) == 1 for vals in per_type.values())
        assert coarse == (t.number < 5), (t.number, per_type)
    assert [t.user_attrs.get("phase") for t in trials[1:]] == ["coarse"] * 4 + ["fine"] * 2
    assert trials[-1].user_attrs["proposal"] == "model"


def test_bad_search_input_is_refused(tmp_path):
    ws, comp = tiny_workspace(tmp_path, r_min=0.9)
    with pytest.raises(BolacoError, match="cannot meet remove"):
        space_of(ws, comp)
    ws, comp = tiny_workspace(tmp_path, tie=(("q", "qq"),))
    with pytest.raises(BolacoError, match=r"unknown unit type\(s\) qq in search.tie or search.dense \(this study's "
                                          r"unit types are q, k, v, o, gate, up, down\)"):
        space_of(ws, comp)
    with pytest.raises(BolacoError, match="cannot open the study storage"):
        search.open_storage("postgresql+psycopg://nobody@127.0.0.1:9/none")
    ws, comp = tiny_workspace(tmp_path)
    with pytest.raises(BolacoError, match="no study store at"):   # a mistyped path is not created
        search.run(ws, comp, create=False)
    assert not list(tmp_path.glob("*.db"))
    search.run(ws, comp, create=True, trials=1, artifacts=None)
    ws.study = ws.study.override(search__space="types")
    with pytest.raises(BolacoError, match="created with another search.variables: its trials answer another "
                                          "question; start a new study"):
        search.run(ws, comp, create=True, trials=2, artifacts=None)


def test_malformed_study_files_are_refused(tmp_path):
    from bolaco.study import load_study
    from bolaco.workspace import check_names
    cases = {"sampler: cmaes": "search.sampler: unknown sampler 'cmaes'; choose from random, botorch, gp, tpe",
             "trials: 0": r"search.trials is 0: input should be greater than or equal to 1",
             "colour: red": r"unknown key 'search.colour' \(allowed there: sampler, trials, ",
             "tie: [[q, k]]\n  nonsense: 1": "unknown key 'search.nonsense'",
             "space: spline": "search.space is 'spline': input should be 'types', 'groups' or 'knots'",
             "objective: bleu": r"search.objective: unknown objective 'bleu'; choose from ppl, kl, ppl\+kl",
             "tie: qk": r"search.tie is 'qk': input should be a valid tuple",
             "design: [uniform, guess]": "search.design: unknown start-up design 'guess'; choose from uniform, "
                                         "importance, sensitivity",
             "coarse_trials: 5\n  sampler: gp": "needs sampler botorch"}
    for body, message in cases.items():
        f = tmp_path / "s.yaml"
        f.write_text("name: s\nsearch:\n  " + body + "\n")
        with pytest.raises(BolacoError, match=message):
            check_names(load_study(f))
    f.write_text("name: [unclosed\n")
    with pytest.raises(BolacoError, match="not valid YAML"):
        load_study(f)


@pytest.mark.parametrize("objective", ["kl", "ppl+kl"])
def test_kl_objectives(tmp_path, objective):
    ws, comp = tiny_workspace(tmp_path, sampler="random", objective=objective, kl_weight=10.0)
    opt = search.run(ws, comp, create=True, trials=2, artifacts=None)
    for t in opt.trials:
        kl, nll = t.user_attrs["search_kl"], t.user_attrs["search_nll"]
        assert kl > 0
        assert t.value == pytest.approx(kl if objective == "kl" else nll + 10.0 * kl)


def test_recall_objective_adds_the_nll_of_rare_tokens_repeated_from_their_window(tmp_path):
    from bolaco.evaluate.perplexity import perplexity, recall_positions
    ws, comp = tiny_workspace(tmp_path, sampler="random", objective="ppl+recall", recall_weight=2.0)
    # tokens 250-299 never occur in the calibration data (rare); each window repeats its first half
    half = torch.randint(250, 300, (4, 8), generator=torch.Generator().manual_seed(4))
    ws.data["calibration"] = torch.randint(0, 250, (8, 16), generator=torch.Generator().manual_seed(5))
    ws.data["search"] = torch.cat([half, half], dim=1)
    focus = recall_positions(ws.data["search"], torch.arange(300) >= 250)
    assert focus[:, 7:].all()
    opt = search.run(ws, comp, create=True, trials=2, artifacts=None)
    for t in opt.trials:
        recall, nll = t.user_attrs["search_recall"], t.user_attrs["search_nll"]
        assert t.value == pytest.approx(nll + 2.0 * recall)
        comp.apply(t.user_attrs["levels"])
        try:
            assert recall == pytest.approx(perplexity(ws.model, ws.data["search"], progress=False,
                                                      focus=focus).focus_nll, rel=1e-6)
        finally:
            comp.restore()
    # the weight is part of what the trials answer: a resume with another is refused
    ws.study = ws.study.override(search__recall_weight=1.0)
    with pytest.raises(BolacoError, match="created with another search.recall_weight"):
        search.run(ws, comp, create=False, trials=3, artifacts=None)


def test_a_failed_model_step_is_recorded_and_counted(tmp_path, monkeypatch):
    from bolaco.search import sampler as sampler_module

    def fail(*args, **kwargs):
        raise RuntimeError("Optimization failed: Iteration limit reached")

    monkeypatch.setattr(sampler_module, "botorch_step", fail)
    ws, comp = tiny_workspace(tmp_path, startup=1)
    with pytest.warns(UserWarning, match="model step failed on trial"):
        opt = search.run(ws, comp, create=True, trials=4, artifacts=None)
    trials = opt.get_trials(states=(TrialState.COMPLETE,))
    assert [t.user_attrs["proposal"] for t in trials] == ["uniform", "startup", "fallback-acqf", "fallback-acqf"]
    assert "Iteration limit" in trials[-1].user_attrs["error"]
    assert search.summary(opt)["proposals"]["fallback-acqf"] == 2
    space = space_of(ws, comp)
    for t in trials:   # fallback points lie on the budget hyperplane
        assert float(space.coefficients @ space.vector(t.params)) == pytest.approx(space.rhs, rel=1e-9)


def test_a_proposal_that_repeats_a_stored_allocation_is_replaced(tmp_path, monkeypatch):
    from bolaco.search import sampler as sampler_module
    ws, comp = tiny_workspace(tmp_path, startup=1)
    space = space_of(ws, comp)
    uniform = space.to_unit(space.vector(space.uniform_point()))
    monkeypatch.setattr(sampler_module, "botorch_step", lambda *a, **k: (uniform, None))
    opt = search.run(ws, comp, create=True, trials=4, artifacts=None)
    assert [t.user_attrs["proposal"] for t in opt.trials] == ["uniform", "startup", "fallback-duplicate",
                                                              "fallback-duplicate"]
    assert len(set(finished_allocations(opt))) == 4


def test_a_proposal_gives_way_to_a_later_trial_that_recorded_the_same_map_first(tmp_path):
    """The interleaving two loaded workers produced: trial 1 records a map and finds no twin, then trial 0 records
    the same map. Trial 0 must give way, or both are evaluated."""
    import optuna
    from types import SimpleNamespace
    from bolaco.search.worker import Worker
    opt = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db")
    first, second = opt.ask(), opt.ask()
    ranks = {"0.q": 8, "0.k": 4}
    second.set_user_attr("levels", ranks)
    assert Worker._twin(SimpleNamespace(opt=opt), second, ranks) is None
    first.set_user_attr("levels", dict(reversed(ranks.items())))
    assert Worker._twin(SimpleNamespace(opt=opt), first, ranks) == second.number
    opt.tell(second, state=TrialState.FAIL)   # a failed trial's map may be proposed again
    assert Worker._twin(SimpleNamespace(opt=opt), first, ranks) is None


def test_proposing_ahead_evaluates_distinct_trials(tmp_path):
    ws, comp = tiny_workspace(tmp_path, startup=2)
    opt = search.run(ws, comp, create=True, trials=6, artifacts=None, prefetch=True)
    trials = opt.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 6 and len(set(finished_allocations(opt))) == 6
    assert not opt.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_two_worker_processes_never_repeat_an_allocation(tmp_path):
    """Two `bolaco worker`-like processes on one SQLite study, started together, each with the same study file."""
    storage = f"sqlite:///{tmp_path}/studies.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                            os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(HELPER), storage, str(tmp_path)]
    first = subprocess.run(cmd + ["1", "create", "fast"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    workers = [subprocess.Popen(cmd + ["9", "join", "fast"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    import optuna
    opt = optuna.load_study(study_name="tiny-botorch", storage=storage)
    allocations = finished_allocations(opt)
    assert len(allocations) == 9 and len(set(allocations)) == len(allocations)   # the target, not one more
    assert len({t.user_attrs["worker"] for t in opt.get_trials(states=(TrialState.COMPLETE,))[1:]}) == 2


@pytest.mark.parametrize("modules", [(), STRUCTURED], ids=["factors", "structured"])
def test_every_family_runs_a_search_and_its_parameter_count_is_exact(family, modules, tmp_path):
    ws, comp = tiny_workspace(tmp_path, sampler="random", family=family, trials=2, modules=modules)
    dense_params = count_params(ws.model)
    opt = search.run(ws, comp, create=True, trials=2, artifacts=None)
    trials = opt.get_trials(states=(TrialState.COMPLETE,))
    types = comp.decomposition.unit_types
    assert len(trials) == 2 and set(opt.user_attrs["identity"]["search.variables"]) == {f"{t}.b{r}" for t in types
                                                                                        for r in ("0-1", "2-3")}
    taken = [m for m in modules if m in ws.adapter.modules]         # a family without a module keeps factors
    assert set(types) == set(taken) | {t for t in ws.adapter.types
                                       if not any(t in ws.adapter.modules[m] for m in taken)}
    ranks = trials[1].user_attrs["levels"]
    comp.apply(ranks)
    try:
        assert count_params(ws.model) == sum(p.numel() for p in ws.model.parameters())
        assert count_params(ws.model) == dense_params - comp.budget.decomposable + trials[1].user_attrs["params"]
    finally:
        comp.restore()


def test_a_trial_can_refit_its_allocation(tmp_path, monkeypatch):
    """search.refit_trials: each trial evaluates the closed-loop refitted layers of its level map, fitted on
    search.refit_sequences calibration sequences spread over the role."""
    import bolaco.workspace as workspace_module
    ws, comp = tiny_workspace(tmp_path, sampler="random", trials=2)
    plain = search.run(ws, comp, create=True, trials=2, artifacts=None)
    ws.study = ws.study.override(name="refit", search__refit_trials=True, search__refit_sequences=3)
    seen, real = [], workspace_module.refit
    monkeypatch.setattr(workspace_module, "refit", lambda c, r, calibration, **kw: seen.append(calibration) or real(
        c, r, calibration, **kw))
    refitted = search.run(ws, comp, create=True, trials=2, artifacts=None)
    monkeypatch.undo()
    calibration = ws.data["calibration"]                               # 8 sequences: rows 0, 4 (3.5) and 7
    assert len(seen) == 2 and all(torch.equal(c, calibration[[0, 4, 7]]) for c in seen)
    for a, b in zip(plain.trials, refitted.trials):
        assert a.user_attrs["levels"] == b.user_attrs["levels"]       # same seeds, same allocations
        assert b.value != a.value
        ranks = b.user_attrs["levels"]                                 # the value is that of the refitted factors
        comp.apply(ranks, ws.refit(comp, ranks, cache=False, progress=False, sequences=3))
        try:
            expected = perplexity.perplexity(ws.model, ws.data["search"], ws.study.evaluate.batch_size).nll
        finally:
            comp.restore()
        assert b.value == pytest.approx(expected, rel=1e-6)


def test_the_same_seed_on_the_same_machine_gives_the_same_trials(tmp_path):
    """Two fresh studies of one study file (new storage, same cache): identical parameters and values, trial by
    trial, model proposals included."""
    runs = []
    for store in ("a", "b"):
        ws, comp = tiny_workspace(tmp_path, startup=2)
        ws.study = ws.study.override(storage=f"sqlite:///{tmp_path}/{store}.db")
        opt = search.run(ws, comp, create=True, trials=6, artifacts=None)
        runs.append([(t.params, t.value, t.user_attrs["proposal"]) for t in opt.get_trials()])
    assert runs[0] == runs[1] and [p for _, _, p in runs[0]][-1] == "model"


def test_designed_allocations_come_first_and_follow_their_rules(tmp_path):
    from bolaco.search.design import MAX_REMOVED, SMOOTHING
    ws, comp = tiny_workspace(tmp_path, sampler="random", modules=STRUCTURED, space="groups", groups=4,
                              design=("uniform", "importance", "sensitivity"), r_min=0.1)
    opt = search.run(ws, comp, create=True, trials=4, artifacts=None)
    trials = opt.get_trials(states=(TrialState.COMPLETE,))
    assert [t.user_attrs["proposal"] for t in trials] == ["uniform", "design:importance", "design:sensitivity",
                                                          "startup"]
    space = space_of(ws, comp)
    for t in trials:
        assert float(space.coefficients @ space.vector(t.params)) == pytest.approx(space.rhs, rel=1e-9)
    # importance: removal shares softmax(-(1 - cos) / 0.015) over blocks, as MoDeGPT allocates, then projected
    cov = ws.covariances(progress=False)
    scores = torch.tensor([1 - cov.block_cosine(b) for b in range(4)], dtype=torch.float64)
    weights = torch.softmax(-scores / SMOOTHING, 0)
    allowed = space.rhs + sum(comp.budget.units[u].fixed for u in space.uids)
    removed = (weights * 4 * (1 - allowed / sum(comp.budget.dense(u) for u in space.uids))).clamp(max=MAX_REMOVED)
    point = space.vector(trials[1].params)
    by_block = [float(point[space.names.index(f"mlp.b{b}-{b}")]) for b in range(4)]
    order = sorted(range(4), key=lambda b: float(removed[b]))
    assert sorted(range(4), key=lambda b: -by_block[b]) == order or len(set(by_block)) == 1
    # sensitivity: the type whose compression raised the search loss most keeps the most
    sens = space.keeps(space.vector(trials[2].params))
    mean = {t: sum(v for u, v in sens.items() if u.endswith(f".{t}")) / 4 for t in ("qk", "vo", "mlp")}
    assert len(set(round(v, 6) for v in mean.values())) > 1


def test_a_resume_with_another_budget_or_model_is_refused(tmp_path):
    ws, comp = tiny_workspace(tmp_path, sampler="random")
    search.run(ws, comp, create=True, trials=2, artifacts=None)
    again, comp2 = tiny_workspace(tmp_path, sampler="random")
    again.study = again.study.override(budget__remove=0.5)
    with pytest.raises(BolacoError, match=r"was created with another budget.remove: its trials answer another "
                                          r"question; start a new study \(--set name=<new name>\)"):
        search.run(again, comp2, create=False, trials=3, artifacts=None)
    other, comp3 = tiny_workspace(tmp_path, sampler="random")
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)     # other weights, same shapes
    other.__dict__.pop("fingerprint", None)
    with pytest.raises(BolacoError, match="created with another model"):
        search.run(other, comp3, create=True, trials=3, artifacts=None)
    assert len(search.load_optuna_study(ws.study).trials) == 2


def test_the_best_few_are_measured_again_on_the_selection_split(tmp_path):
    ws, comp = tiny_workspace(tmp_path, sampler="random", modules=STRUCTURED)
    ws.study = ws.study.override(decompose__refit=True)
    opt = search.run(ws, comp, create=True, trials=4, artifacts=None)
    levels, refitted, record = search.select(ws, comp, opt, top=2)
    best_two = sorted(opt.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)[:2]
    cands = record["candidates"]
    assert [(c["trial"], c["refit"]) for c in cands] == [(t.number, r) for t in best_two for r in (False, True)]
    for c in cands:      # every value is the selection split's perplexity of that trial, as it would be exported
        trial = next(t for t in best_two if t.number == c["trial"])
        lv = trial.user_attrs["levels"]
        comp.apply(lv, ws.refit(comp, lv) if c["refit"] else None)
        try:
            ppl = perplexity.perplexity(ws.model, ws.data["selection"], 8, progress=False).ppl
        finally:
            comp.restore()
        assert c["selection_ppl"] == pytest.approx(ppl, rel=1e-9)
    winner = min(cands, key=lambda c: c["selection_value"])
    assert (record["trial"], record["refit"]) == (winner["trial"], winner["refit"]) and refitted == winner["refit"]
    assert levels == next(t for t in best_two if t.number == winner["trial"]).user_attrs["levels"]
