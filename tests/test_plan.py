"""`bolaco plan`: shapes from the configuration alone, disk figures equal to what the stages then write, and a
one-line refusal of what cannot fit."""

from collections import namedtuple

from bolaco import plan as plan_module
from bolaco.cli import main
from conftest import tiny_model


def _study(tmp_path, tokenizer, layers=3):
    model_dir = tmp_path / f"tiny{layers}"
    tiny_model("llama", vocab_size=len(tokenizer), layers=layers).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    study = tmp_path / f"s{layers}.yaml"
    study.write_text(f"name: s\nmodel: {model_dir}\nseq_len: 16\nstorage: sqlite:///{tmp_path}/s.db\n"
                     f"cache_dir: {tmp_path}/cache{layers}\ndata:\n"
                     "  calibration: {corpus: wikitext2-valid, start: 0, sequences: 8}\n"
                     "  search: {corpus: wikitext2-valid, start: -4, sequences: 4}\n"
                     "collect: {partitions: 2, batch_size: 4}\nbudget: {remove: 0.25}\n"
                     "decompose: {rank_multiple: 2, modules: [mlp, qk, vo]}\nsearch: {trials: 3, startup: 2}\n")
    return ["--study", str(study)]


def _size(folder):
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def test_plan_predicts_the_caches_on_disk_and_every_stage(tmp_path, tokenizer, capsys):
    s = _study(tmp_path, tokenizer)
    assert main(["plan", *s]) == 0
    out = capsys.readouterr().out
    for stage in ("load", "collect", "bases", "search", "export"):
        assert f"\n{stage} " in out
    assert "default job" in out and "3 blocks" in out
    assert not (tmp_path / "cache3").exists()           # planning does no work
    assert main(["compress", *s]) == 0                  # collect and bases, then a uniform export
    from bolaco.study import load_study
    p = plan_module.plan(load_study(s[1]), costs=plan_module.BlockCosts(0, 0, 0, 0, 0, 0))
    cov = next((tmp_path / "cache3").rglob("covariance"))
    # the safetensors files hold the tensors the plan counts, plus their small JSON headers
    assert 0 < p.stage("collect").disk <= _size(cov) <= p.stage("collect").disk * 1.1
    bases = [f for f in cov.parent.iterdir() if f.name.startswith("bases-")]
    assert len(bases) == 3 and 0 < p.stage("bases").disk <= sum(map(_size, bases)) * 1.1


def test_memory_apart_from_weights_does_not_grow_with_depth(tmp_path, tokenizer):
    from bolaco.study import load_study
    costs = plan_module.BlockCosts(1e-4, 0.5, 1.0, 0.01, 1e-4, 1e-3, 2e-4, 0.7)
    shallow, deep = (plan_module.plan(load_study(_study(tmp_path, tokenizer, n)[1]), costs=costs) for n in (2, 6))
    for stage in ("collect", "bases"):
        assert deep.stage(stage).host - deep.stage("load").host == \
            shallow.stage(stage).host - shallow.stage("load").host
    assert deep.stage("collect").disk == 3 * shallow.stage("collect").disk
    assert deep.stage("collect").seconds == 3 * shallow.stage("collect").seconds


def test_a_study_that_cannot_fit_is_refused_in_one_line(tmp_path, tokenizer, capsys, monkeypatch):
    s = _study(tmp_path, tokenizer)
    capsys.readouterr()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda _p: usage(10**6, 10**6 - 1000, 1000))
    assert main(["plan", *s]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "free" in err[0] and "cache_dir" in err[0] and "cache3" in err[0]
    monkeypatch.undo()
    monkeypatch.setattr(plan_module, "available_host", lambda: 1000.0)
    assert main(["plan", *s]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "memory" in err[0]


def test_search_time_counts_compressed_trials_and_the_dense_passes_apart(tmp_path, tokenizer):
    from bolaco.study import load_study
    study = load_study(_study(tmp_path, tokenizer)[1], ["search.design=[uniform, sensitivity]",
                                                         "search.objective=ppl+kl"])
    eval_token, trial_token, head, apply, kl = 1e-3, 4e-4, 2e-3, 0.05, 3e-3
    p = plan_module.plan(study, costs=plan_module.BlockCosts(0, 0, 0, apply, eval_token, head,
                                                             trial_token=trial_token, kl_token=kl))
    tokens = 4 * 16                                   # the search split: 4 sequences of 16 tokens
    trial = 3 * apply + tokens * (3 * trial_token + head + kl)
    assert abs(p.trial_seconds - trial) < 1e-12
    # the bases read once; the sensitivity design: one dense pass and one per unit type (mlp, qk, vo); the KL
    # objective's reference
    dense = tokens * (3 * eval_token + head)
    read = p.stage("bases").disk / plan_module.READ
    assert abs(p.stage("search").seconds - (read + 3 * trial + (1 + 3 + 1) * dense)) < 1e-9


def test_a_noisy_timing_never_plans_zero_seconds_per_token():
    assert plan_module._time_line([1.0, 3.0], [100, 300]) == (0.01, 0.0)
    slope, fixed = plan_module._time_line([1.0, 0.9], [100, 300])      # the larger run was no slower
    assert slope == 0.9 / 300 and fixed == 0.0
    assert plan_module._line([5.0, 4.0], [100, 300]) == (0.0, 5.0)      # bytes: a peak that did not grow is fixed
