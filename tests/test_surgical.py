import optuna
import pytest
import torch

from bolaco.errors import BolacoError
from bolaco.study import SurgicalConfig
from bolaco.search.surgical import module_order, rank_grid, surgical_objective, surgical_search
from conftest import STRUCTURED, tiny_model, uniform_compressor
from test_search import tiny_workspace


def synthetic(comp, tolerated, verify_fails=()):
    """A metric that only looks at the current ranks: each module has a smallest tolerated rank; a module
    below it costs 10 points; modules in verify_fails cost points on the verification chunk only."""
    calls = []

    def metric(chunk):
        ranks = comp.levels
        calls.append((chunk, dict(ranks)))
        bad = sum(1 for lid, k in ranks.items() if k < tolerated.get(lid, 0))
        bad += sum(1 for lid in ranks if chunk == "verify" and lid in verify_fails)
        return 100.0 - 10 * bad
    return metric, calls


@pytest.fixture
def comp(tmp_path):
    model = tiny_model("llama", layers=2)
    calibration = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    return uniform_compressor(model, calibration, tmp_path, multiple=2)[1]


def test_greedy_picks_the_smallest_tolerated_rank_and_reverts_failed_verifications(comp):
    cfg = SurgicalConfig(delta=0.5, types=("q", "up"))
    assert module_order(comp, cfg) == ["1.q", "1.up", "0.q", "0.up"]
    grid_q = rank_grid(comp, "1.q", cfg)
    assert grid_q[0] == 2 and grid_q == sorted(set(grid_q)) and grid_q[-1] <= comp.budget.max_level("1.q", 1)
    tolerated = {"1.q": grid_q[3], "1.up": 10**6, "0.q": 2}
    metric, calls = synthetic(comp, tolerated, verify_fails={"0.q"})
    ranks, summary = surgical_search(comp, metric, cfg, target=0, higher_is_better=True)
    # 1.q: smallest rank whose metric stays within delta; 1.up: never tolerated (dense);
    # 0.q: passes on the search chunk at rank 1 but fails verification, so it is reverted
    assert ranks == {"1.q": grid_q[3], "0.up": 2}
    assert summary["evaluations"] == len(calls) and not summary["reached_budget"]
    assert comp.levels == {}   # the model is left dense


def test_stops_at_the_budget_and_resumes_from_the_recorded_probes(comp, tmp_path):
    cfg = SurgicalConfig(delta=0.5)
    target = comp.budget.decomposable - 1   # any compressed module reaches it
    storage = f"sqlite:///{tmp_path}/s.db"
    metric, calls = synthetic(comp, {})
    study = optuna.create_study(study_name="s", storage=storage)
    ranks, summary = surgical_search(comp, metric, cfg, target, study=study, progress=False, higher_is_better=True)
    assert len(ranks) == 1 and summary["reached_budget"]
    probes = study.get_trials()
    assert [t.user_attrs["chunk"] for t in probes] == ["search", "verify", "search", "verify"]
    attrs = probes[2].user_attrs
    assert attrs.pop("seconds") >= 0
    assert attrs == {"module": "1.q", "rank": 2, "chunk": "search", "accepted": True}

    again, calls_again = synthetic(comp, {})
    ranks2, summary2 = surgical_search(comp, again, cfg, target, study=optuna.load_study(study_name="s",
                                                                                         storage=storage),
                                       higher_is_better=True)
    assert ranks2 == ranks and calls_again == []          # every probe was replayed, none evaluated
    with pytest.raises(BolacoError, match="do not match"):
        surgical_search(comp, again, SurgicalConfig(delta=0.5, types=("v",)), target,
                        study=optuna.load_study(study_name="s", storage=storage), higher_is_better=True)


@pytest.mark.parametrize("modules", [(), STRUCTURED], ids=["factors", "structured"])
def test_perplexity_variant_and_disjoint_chunks(tmp_path, modules):
    import math
    ws, comp = tiny_workspace(tmp_path, modules=modules)
    cfg = SurgicalConfig(delta=0.05, types=("q", "k") if not modules else ("qk", "mlp"))
    objective = surgical_objective(ws, cfg)
    assert objective.direction == "minimize"
    search_rows = {tuple(r.tolist()) for r in objective.chunks["search"]}
    verify_rows = {tuple(r.tolist()) for r in objective.chunks["verify"]}
    assert search_rows.isdisjoint(verify_rows) and len(search_rows) == len(verify_rows) == 2
    metric = lambda chunk: objective.measure(chunk).value          # noqa: E731   log-perplexity
    ranks, summary = surgical_search(comp, metric, cfg, target=0, progress=False)
    dense = summary["dense"]
    assert ranks and summary["evaluations"] >= 2 + 2 * len(ranks)
    comp.apply(ranks)   # the final allocation is the last one verified: within the geometric tolerance
    for chunk in ("search", "verify"):
        assert math.exp(metric(chunk)) <= math.exp(dense[chunk]) * (1 + cfg.delta) ** len(ranks) * (1 + 1e-9)


def test_study_run_logs_probes_in_the_store_and_resumes(tmp_path):
    from bolaco.search import surgical
    ws, comp = tiny_workspace(tmp_path)
    ranks, summary = surgical.run(ws, comp, progress=False)
    probes = optuna.load_study(study_name="tiny-surgical-ppl", storage=ws.study.storage).get_trials()
    assert len(probes) == summary["evaluations"]
    assert {t.user_attrs["module"] for t in probes if t.user_attrs["accepted"] and t.user_attrs["chunk"] == "verify"} \
        >= set(ranks)
    again, summary2 = surgical.run(ws, comp, progress=False)
    assert again == ranks and summary2 == summary
    assert len(optuna.load_study(study_name="tiny-surgical-ppl", storage=ws.study.storage).get_trials()) == len(probes)


def test_task_metric_scores_disjoint_seeded_rows_through_lm_eval_and_resumes(tmp_path, eos_tokenizer):
    from bolaco.search import surgical
    from bolaco.arch import adapter_for
    from bolaco.workspace import Workspace
    from test_tasks import write_piqa
    ws, _ = tiny_workspace(tmp_path)
    model = tiny_model("llama", layers=4, vocab_size=len(eos_tokenizer))
    study = ws.study.override(surgical__metric="piqa", surgical__task_rows=4, surgical__delta=1.0,
                              surgical__types=("q",), data__dir=str(write_piqa(tmp_path / "data")))
    ws = Workspace(study, model, eos_tokenizer, adapter_for(model), ws.data)
    comp = ws.compressor(progress=False)
    ranks, summary = surgical.run(ws, comp, progress=False)
    assert ranks == {f"{b}.q": 2 for b in range(4)}           # delta 1.0 accepts everything at the smallest rank
    probes = optuna.load_study(study_name="tiny-surgical-piqa", storage=study.storage).get_trials()
    assert len(probes) == summary["evaluations"] == 2 + 2 * 4
    assert all(p.value in (0.0, 0.5, 1.0) for p in probes)    # two rows per chunk (4 search rows, halves)
    assert surgical.run(ws, comp, progress=False) == (ranks, summary)
