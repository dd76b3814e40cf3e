"""`bolaco report`: a Markdown report of a study with PNG pictures (docs/design.md, "Evaluation").

It reads only what the other stages stored: the Optuna studies in the study store (BO studies of every
sampler, the surgical search, and those of --compare study files) and the evaluation results cached next
to the models (bolaco-eval.json, see bolaco.evaluate). Pictures: best search perplexity vs trial,
the best allocation as a layer x type heat map of the share of parameters kept (SFSD's figure 3), and,
when studies at several budgets exist, search perplexity vs share of parameters kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .decompose import Decomposition
from .study import Study

CURVE_SIZE = (6.4, 4.0)      # inches at 100 dpi: 640 x 400 pixels
DPI = 100


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bo_studies(study: Study, compare: Sequence[Study] = ()) -> dict[str, optuna.Study]:
    """label -> BO study: the `<name>-<sampler>` studies of this study file and of the --compare files, selected by
    exactly those names (a study named `smollm2` never takes in `smollm2-20-botorch`)."""
    from .search import SAMPLERS, open_storage, study_name
    out = {}
    for s in (study, *compare):
        storage = open_storage(s.storage, create=False)
        names = {study_name(s.override(search__sampler=k)) for k in SAMPLERS.names()}
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            name = summary.study_name
            if name in names:
                opt = optuna.load_study(study_name=name, storage=storage)
                if opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                    out[name] = opt
    return out


def _complete(opt: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return sorted(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def _ppl(trial: optuna.trial.FrozenTrial) -> float:
    from .search import TrialRecord
    return TrialRecord.of(trial).search_ppl


def search_curve_png(studies: dict[str, optuna.Study], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=CURVE_SIZE, dpi=DPI)
    for label, opt in studies.items():
        trials = _complete(opt)
        best, xs, ys = float("inf"), [], []
        for i, t in enumerate(trials, 1):
            best = min(best, _ppl(t))
            xs.append(i)
            ys.append(best)
        ax.plot(xs, ys, marker=".", label=label)
    ax.set_xlabel("finished trials")
    ax.set_ylabel("best search perplexity so far")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def budgets_png(points: list[tuple[str, float, float]], path: Path) -> None:
    """points: (label, share of decomposable parameters kept, search perplexity)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=CURVE_SIZE, dpi=DPI)
    for label, kept, ppl in sorted(points, key=lambda p: p[1]):
        ax.scatter([100 * kept], [ppl])
        ax.annotate(label, (100 * kept, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    xs, ys = zip(*sorted((100 * k, p) for _, k, p in points))
    ax.plot(xs, ys, alpha=0.4)
    ax.set_xlabel("decomposable parameters kept (%)")
    ax.set_ylabel("best search perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def read_eval(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return None


def eval_columns(study: Study, out_root: Path = Path("out")) -> dict[str, dict]:
    """Evaluation results cached by `bolaco eval`: the study's dense model, then its exported models."""
    from .evaluate import RESULTS_FILE, results_path
    columns = {}
    dense = read_eval(results_path(study.model.path))
    if dense:
        columns["dense"] = dense
    for d in sorted(out_root.glob(f"{study.name}*")):
        res = read_eval(d / RESULTS_FILE)
        if res:
            columns[d.name] = res
    return columns


def _surgical_section(study: Study, decomposition: Decomposition, out: Path) -> list[str]:
    """The surgical search's allocation, when the study store holds one."""
    from .search import allocation_heatmap, open_storage
    from .search.surgical import accepted_ranks
    budget = decomposition.budget
    surgical = f"{study.name}-surgical-{study.surgical.metric}"
    storage = open_storage(study.storage, create=False)
    if surgical not in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}:
        return []
    probes = _complete(optuna.load_study(study_name=surgical, storage=storage))
    ranks = accepted_ranks(probes)
    (out / "surgical.png").write_bytes(allocation_heatmap(
        budget, ranks, decomposition.unit_types, decomposition.adapter.n_blocks, f"{surgical}: share of parameters "
        "kept"))
    return ["## Surgical search", "", f"{surgical}: {len(probes)} evaluation(s), {len(ranks)} module(s) compressed, "
            f"{1 - budget.params(ranks) / budget.decomposable:.2%} removed.", "",
            "![surgical allocation](surgical.png)", ""]


def build(study: Study, decomposition: Decomposition, out_dir: str | Path, compare: Sequence[Study] = (),
          out_root: Path = Path("out")) -> Path:
    """Write report.md and its PNGs into out_dir; returns the Markdown file."""
    from .evaluate import markdown_table
    from .search import TrialRecord, allocation_heatmap, masked_url
    budget, types, n_blocks = decomposition.budget, decomposition.unit_types, decomposition.adapter.n_blocks
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies = bo_studies(study, compare)
    md = [f"# bolaco report: {study.name}", "",
          f"Model `{study.model.path}`, budget: remove {study.budget.remove:.0%} of the decomposable parameters "
          f"({budget.decomposable:,}), methods {decomposition.describe()}, study store "
          f"`{masked_url(study.storage)}`.", ""]
    if studies:
        search_curve_png(studies, out / "search.png")
        md += ["## Search", "", "| study | finished trials | best objective | its search ppl | best trial | removed "
               "| proposals |", "|---|---|---|---|---|---|---|"]
        from .search import summary
        for name, opt in studies.items():
            best = opt.best_trial
            record = TrialRecord.of(best)
            props = ", ".join(f"{k} {v}" for k, v in sorted(summary(opt)["proposals"].items()))
            objective = opt.user_attrs.get("identity", {}).get("search.objective", "?")
            md.append(f"| {name} | {len(_complete(opt))} | {best.value:.4f} ({objective}) | "
                      f"{record.search_ppl:.2f} | {best.number} | {record.removed:.2%} | {props} |")
        md += ["", "![best search perplexity vs trial](search.png)", ""]
        own = {n: o for n, o in studies.items() if n.startswith(f"{study.name}-")}
        if own:
            name, opt = min(own.items(), key=lambda kv: kv[1].best_value)
            best = opt.best_trial
            ranks = TrialRecord.of(best).levels
            (out / "allocation.png").write_bytes(allocation_heatmap(
                budget, ranks, types, n_blocks, f"{name} trial {best.number}: share of parameters kept"))
            md += ["## Best allocation", "", f"{name}, trial {best.number}: search ppl {_ppl(best):.2f}, "
                   f"{1 - budget.params(ranks) / budget.decomposable:.2%} removed.", "",
                   "![allocation heat map](allocation.png)", ""]
        points = [(n, 1 - r.evaluation.removed, r.search_ppl) for n, o in studies.items()
                  for r in [TrialRecord.of(o.best_trial)] if r.evaluation is not None]
        if len({round(k, 3) for _, k, _ in points}) > 1:
            budgets_png(points, out / "budgets.png")
            md += ["## Perplexity vs parameters kept", "", "![search perplexity vs parameters kept](budgets.png)", ""]
    else:
        md += ["No finished BO trials in the study store yet: run `make study`.", ""]
    md += _surgical_section(study, decomposition, out)
    columns = eval_columns(study, out_root)
    md += ["## Evaluation", ""]
    md += [markdown_table(columns), ""] if columns else \
        ["No evaluation results yet: `make eval` (dense) and `make eval MODEL=out/<study>` (exported).", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
