"""Shared set-up for the bench scripts: the default study with the data sizes a bench asks for."""

from __future__ import annotations

import sys
from dataclasses import replace

from bolaco.data import RoleSpec
from bolaco.study import load_study


def bench_study(path: str, calibration: int, search: int, test: int, partitions: int, cache_dir: str, **kw):
    study = load_study(path)
    data = {"calibration": RoleSpec("wikitext2-valid", 0, calibration),
            "search": RoleSpec("wikitext2-valid", -search, search),
            "test": RoleSpec("wikitext2-test", 0, test)}
    return replace(study, data=data, partitions=partitions, cache_dir=cache_dir, **kw)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in r) + " |")
    print(f"\ncommand: {' '.join(['python'] + sys.argv)}")


def ppl_at(ws, comp, ranks, role, batch_size):
    """Perplexity of the workspace model on `role` with `ranks` applied (dense again afterwards)."""
    from bolaco.evaluate.perplexity import perplexity
    comp.apply(ranks)
    try:
        return perplexity(ws.model, ws.data[role], batch_size, desc=role).ppl
    finally:
        comp.restore()
