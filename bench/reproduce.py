"""What a new user gets: the default study run from scratch for several seeds, through the code of `make study` and
`make export` (`bolaco search`, `bolaco export`), each seed with a fresh study store and a fresh cache, then the
held-out table per seed against the dense model measured in the same run.

    .venv/bin/python bench/reproduce.py [--study studies/smollm2-20.yaml] [--seeds 0 1 2 3 4] [--limit 200]
                                        [--set search.trials=40 ...] [--work DIR] [--finetune STEPS]

Columns: WikiText-2 test, PTB test and C4 perplexity over dense (first 64 x 256 tokens of each; no role of the
study reads them), the share of dense accuracy kept on the zero-shot tasks where the dense model is above chance
(first --limit rows), and the seconds of `bolaco search` and `bolaco export` (the whole default job). The work
folder is per code version (commit), so nothing an older bolaco left is ever resumed; a rerun of the same code
resumes where it stopped.

--finetune STEPS adds post-training (`make finetune`: `bolaco finetune` on each seed's export, LoRA on the study's
train role, STEPS steps) and, beside it, the dense model given the same LoRA on the same data and tokens, so that
recovery is told apart from adaptation to the training text (with `--set finetune.ce=0 --set finetune.distill=1`,
pure distillation from the dense model, that baseline is the dense model itself).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bolaco import model as model_io
from bolaco.data import role_sequences
from bolaco.finetune import SubspaceTuner
from bolaco.study import Study, load_study
from common import CORPORA, LABELS, TASKS, HeldOut, bolaco, code_version, print_table, ratios, spread


def run_seed(study: str, sets: list[str], seed: int, work: Path) -> tuple[Path, dict]:
    """The default job for one seed, in its own folder; returns (export folder, seconds per command)."""
    folder = work / f"seed{seed}"
    out, timing_file = folder / "export", folder / "seconds.json"
    if (out / "bolaco.json").is_file() and timing_file.is_file():
        return out, json.loads(timing_file.read_text())
    common = ["--study", study, "--cache-dir", str(folder / "cache"), "--storage", f"sqlite:///{folder}/studies.db",
              "--set", f"search.seed={seed}", *[x for s in sets for x in ("--set", s)]]
    seconds = {}
    t = time.perf_counter()
    bolaco("search", *common)
    seconds["search"] = time.perf_counter() - t
    t = time.perf_counter()
    bolaco("export", *common, "--out", str(out))
    seconds["export"] = time.perf_counter() - t
    timing_file.write_text(json.dumps(seconds))
    return out, seconds


def finetune_name(sets: list[str], steps: int) -> str:
    """finetuned-STEPS and the finetune overrides (finetuned-100-ce0-distill1): one folder per training recipe."""
    return "-".join([f"finetuned-{steps}", *(s.split(".", 1)[1].replace("=", "") for s in sets
                                             if s.startswith("finetune."))])


def finetune_seed(study: str, sets: list[str], seed: int, steps: int, work: Path) -> tuple[Path, float]:
    """`bolaco finetune` on one seed's export; (post-trained export, seconds)."""
    folder, name = work / f"seed{seed}", finetune_name(sets, steps)
    out, timing_file = folder / name, folder / f"{name}-seconds.json"
    if not ((out / "bolaco.json").is_file() and timing_file.is_file()):
        t = time.perf_counter()
        bolaco("finetune", "--study", study, "--cache-dir", str(folder / "cache"), "--from", str(folder / "export"),
               "--out", str(out), *[x for s in [*sets, f"finetune.steps={steps}"] for x in ("--set", s)])
        timing_file.write_text(json.dumps({"seconds": time.perf_counter() - t}))
    return out, json.loads(timing_file.read_text())["seconds"]


def dense_finetuned(study: Study, held: HeldOut, dense: dict, steps: int, work: Path) -> dict[str, float]:
    """The fairness baseline: the dense model with the same LoRA, data, steps and tokens as the exports. Pure
    distillation from the dense model (finetune.ce 0) starts the dense model at its optimum: the baseline is dense."""
    cfg = study.finetune.model_copy(update={"steps": steps})
    if cfg.ce == 0:
        return dense
    model, tokenizer = model_io.load(study.model.path, dtype=study.model.dtype)
    train = role_sequences({"train": study.data.roles()["train"]}, tokenizer, study.seq_len, study.data.dir,
                           str(work / "dense-finetune" / "tokens"))["train"]
    tuner = SubspaceTuner(model, cfg, dense=True)
    tuner.fit(train, checkpoint=work / "dense-finetune" / f"steps{steps}")
    return held(f"dense-finetuned-{steps}", tuner.merge(), tokenizer)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/smollm2-20.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--limit", type=int, default=200, help="rows per zero-shot task")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="a study override")
    ap.add_argument("--work", help="work folder (default storage/bench/reproduce-<commit>)")
    ap.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                    help="also post-train each export and the dense model for STEPS steps (0: no)")
    args = ap.parse_args()
    work = Path(args.work or f"storage/bench/reproduce-{code_version()}")
    study = load_study(args.study, args.set)
    held = HeldOut(work / "eval", args.limit)
    dense_model, tokenizer = model_io.load(study.model.path, dtype=study.model.dtype)
    dense = held("dense", dense_model, tokenizer)
    del dense_model
    columns = list(CORPORA) + [t for t in TASKS if t in dense]
    rows, per_seed = [], []
    for seed in args.seeds:
        out, seconds = run_seed(args.study, args.set, seed, work)
        r = ratios(held.export(f"seed{seed}", out), dense)
        meta = json.loads((out / "bolaco.json").read_text())
        per_seed.append((r, seconds))
        rows.append([f"seed {seed}", *(f"{r[c]:.3f}" for c in columns), meta["allocation"],
                     f"{seconds['search']:.0f} + {seconds['export']:.0f}"])
        print(f"seed {seed}: " + ", ".join(f"{LABELS[c]} {r[c]:.3f}" for c in columns), flush=True)
    if args.finetune:
        tuned_rows = post_training(args, study, held, dense, columns, work)
    rows.append(["median [min-max]", *(spread([r[c] for r, _ in per_seed]) for c in columns), "",
                 spread([(s["search"] + s["export"]) / 60 for _, s in per_seed], 1) + " min"])
    rows.insert(0, ["dense (absolute)", *(f"{dense[c]:.2f}" if c in CORPORA else f"{100 * dense[c]:.1f} %"
                                          for c in columns), "", ""])
    print_table(f"The default study from scratch ({args.study}{', ' + ', '.join(args.set) if args.set else ''}; "
                f"code {code_version()}): perplexity over dense, share of dense accuracy kept ({args.limit} rows per "
                "task), seconds of `bolaco search` + `bolaco export`",
                ["run", *(LABELS[c] for c in columns), "exported", "seconds"], rows)
    worst = {c: max(r[c] for r, _ in per_seed) if c in CORPORA else min(r[c] for r, _ in per_seed) for c in columns}
    print("worst seed: " + ", ".join(f"{LABELS[c]} {worst[c]:.3f}" for c in columns))
    print("median task share kept: " + ", ".join(f"{LABELS[c]} {statistics.median(r[c] for r, _ in per_seed):.3f}"
                                                  for c in columns if c not in CORPORA))
    if args.finetune:
        print_table(f"Post-training ({args.finetune} LoRA steps of `bolaco finetune` on the study's train role, the "
                    "dense model given the same): perplexity over dense, share of dense accuracy kept",
                    ["run", *(LABELS[c] for c in columns), "seconds"], tuned_rows)


def post_training(args, study: Study, held: HeldOut, dense: dict, columns: list[str], work: Path) -> list[list]:
    """Rows of the post-training table: the dense model with the same LoRA, then each seed's export post-trained."""
    base = ratios(dense_finetuned(study, held, dense, args.finetune, work), dense)
    rows, per_seed = [["dense + LoRA", *(f"{base[c]:.3f}" for c in columns), ""]], []
    for seed in args.seeds:
        out, seconds = finetune_seed(args.study, args.set, seed, args.finetune, work)
        r = ratios(held.export(f"seed{seed}-{out.name}", out), dense)
        per_seed.append(r)
        rows.append([f"seed {seed} + LoRA", *(f"{r[c]:.3f}" for c in columns), f"{seconds:.0f}"])
        print(f"seed {seed} + LoRA: " + ", ".join(f"{LABELS[c]} {r[c]:.3f}" for c in columns), flush=True)
    rows.append(["median [min-max]", *(spread([r[c] for r in per_seed]) for c in columns), ""])
    return rows


if __name__ == "__main__":
    main()
