"""bolaco's methods against MoDeGPT's way of compressing, on one held-out benchmark: SmolLM2-135M-Instruct, the
default study's data, every row at the same exact budget, every ratio to the dense model measured in this run.

    .venv/bin/python bench/peers.py [--budgets 0.2 0.4] [--seeds 0 1 2] [--rows ROW ...] [--limit 200]
                                    [--task-seeds 0] [--work DIR]

Rows (the study's data roles and search settings unless the row says otherwise):
- uniform-factors: per-matrix feature-space factors, the same keep ratio everywhere, open-loop (no search);
- modegpt: the structured modules (MLP neurons, per-head Q/K dimensions, V/O rank per head group) with MoDeGPT's own
  allocation rule (per-block ratios from block importance), open-loop, no search: MoDeGPT's recipe, built from
  bolaco's statistics (the V/O basis from the attention outputs' statistics, see docs/design.md);
- bo-structured: the default job (`bolaco search` + `bolaco export`: BO over the structured modules, selection of
  the best 3 on the selection split, open-loop or refitted), one fresh study per seed;
- bo-mixed: the same BO with the structured MLP and per-matrix factors for q, k, v, o;
- bo-factors: the same BO over per-matrix factors only (bolaco's previous default method).
Columns: WikiText-2 / PTB / C4 perplexity over dense (first 64 x 256 tokens; no role reads them) and the share of
dense accuracy kept on the zero-shot tasks above chance (first --limit rows; measured on --task-seeds only, since
they take minutes per model). BO rows: median [min-max] over seeds. Each job runs in its own folder under the work
folder (per code version: nothing an older bolaco left is resumed); a rerun resumes at the first missing job.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bolaco import model as model_io
from bolaco.study import load_study
from common import CORPORA, LABELS, TASKS, HeldOut, bolaco, code_version, print_table, ratios, spread

ROWS = {   # name -> (overrides of the study, BO search or the design exported without search)
    "uniform-factors": (["decompose.modules=[]", "decompose.refit=false"], "uniform"),
    "modegpt": (["decompose.modules=[mlp, qk, vo]", "decompose.refit=false"], "importance"),
    "bo-structured": (["decompose.modules=[mlp, qk, vo]"], None),
    "bo-mixed": (["decompose.modules=[mlp]"], None),
    "bo-factors": (["decompose.modules=[]"], None),
}


def job(study: str, row: str, remove: float, seed: int, work: Path) -> tuple[Path, float]:
    """One row's model at one budget and seed, through the `bolaco` commands; (export folder, seconds)."""
    sets, design = ROWS[row]
    folder = work / f"{row}-{int(100 * remove)}" / (f"seed{seed}" if design is None else "")
    out, done = folder / "export", folder / "seconds.json"
    if (out / "bolaco.json").is_file() and done.is_file():
        return out, json.loads(done.read_text())["seconds"]
    common = ["--study", study, "--cache-dir", str(work / "cache"), "--storage", f"sqlite:///{folder}/studies.db",
              *[x for s in [*sets, f"budget.remove={remove}", f"search.seed={seed}", f"name=peers-{row}"]
                for x in ("--set", s)]]
    t = time.perf_counter()
    if design is None:
        bolaco("search", *common)
        bolaco("export", *common, "--out", str(out))
    else:
        bolaco("compress", *common, "--design", design, "--out", str(out))
    seconds = time.perf_counter() - t
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"seconds": seconds}))
    return out, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--task-seeds", type=int, nargs="*", default=[0], help="seeds whose models get the task columns")
    ap.add_argument("--limit", type=int, default=200, help="rows per zero-shot task")
    ap.add_argument("--work", help="work folder (default storage/bench/peers-<commit>)")
    args = ap.parse_args()
    work = Path(args.work or f"storage/bench/peers-{code_version()}")
    study = load_study(args.study)
    held = HeldOut(work / "eval", args.limit)
    dense_model, tokenizer = model_io.load(study.model.path, dtype=study.model.dtype)
    dense = held("dense", dense_model, tokenizer)
    del dense_model
    columns = list(CORPORA) + [t for t in TASKS if t in dense]
    for remove in args.budgets:
        table = [["dense (absolute)", *(f"{dense[c]:.2f}" if c in CORPORA else f"{100 * dense[c]:.1f} %"
                                        for c in columns), "", ""]]
        for row in args.rows:
            seeds = args.seeds if ROWS[row][1] is None else [0]
            found, minutes = [], []
            for seed in seeds:
                out, seconds = job(args.study, row, remove, seed, work)
                tasks = seed in args.task_seeds or ROWS[row][1] is not None
                found.append(ratios(held.export(f"{row}-{int(100 * remove)}-s{seed}", out, tasks), dense))
                minutes.append(seconds / 60)
                print(f"{row} {remove:.0%} seed {seed}: " + ", ".join(f"{LABELS[c]} {v:.3f}"
                                                                     for c, v in found[-1].items()), flush=True)
            table.append([row, *(spread([f[c] for f in found if c in f], 3) if any(c in f for f in found) else "-"
                                 for c in columns), len(seeds), spread(minutes, 1)])
        print_table(f"SmolLM2-135M-Instruct at {remove:.0%} of the decomposable parameters removed (code "
                    f"{code_version()}): perplexity over dense, share of dense accuracy kept ({args.limit} rows per "
                    "task); BO rows median [min-max] over seeds", ["row", *(LABELS[c] for c in columns), "seeds",
                                                                    "minutes"], table)


if __name__ == "__main__":
    main()
