"""The study file (YAML): model, data roles, collect settings, budget, decomposition, storage.

A study file is data: it is parsed with yaml.safe_load and checked key by key, never executed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from .data import ROLES, Role, RoleSpec
from .errors import BolacoError

METHODS = ("feature", "feature-uncentred", "weight")
SAMPLERS = ("botorch", "gp", "tpe", "random")
SPACES = ("groups", "types", "knots")
# search NLL (log-perplexity), KL(compressed || dense), NLL + kl_weight * KL
OBJECTIVES = ("ppl", "kl", "ppl+kl")
DTYPES = ("float32", "bfloat16", "float16")
PRUNERS = ("none", "median")
FINETUNE_VARIANTS = ("lora", "scaling")


@dataclass(frozen=True)
class SurgicalConfig:
    """SFSD greedy search (bolaco surgical)."""
    metric: str = "ppl"                # "ppl" (search split) or a zero-shot task (bolaco.tasks.ZERO_SHOT)
    delta: float = 0.01                # ppl: geometric factor per module; accuracy: absolute drop allowed
    task_rows: int = 200               # task rows for search + verification (seeded; the rest is test)
    start_block: int | None = None     # default: the last block
    backwards: bool = True
    types: tuple[str, ...] = ()        # projection types visited in each block; empty: all of the model's
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class FinetuneConfig:
    """Post-training in the low-rank subspace (bolaco finetune)."""
    variant: str = "lora"            # lora (peft on every `down` factor) or scaling (diagonal scalings)
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "cosine"         # any transformers.get_scheduler name: cosine, linear, constant, ...
    warmup: int = 10
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    checkpoint_every: int = 25
    distill: float = 0.0             # loss = CE + distill * KL(dense || model) on the same tokens (0: off)


@dataclass(frozen=True)
class SearchConfig:
    """The BO study: keep ratios in [r_min, 1] of the searched linears, parameterised by `space`."""
    sampler: str = "botorch"
    trials: int = 30                 # total finished trials the study aims for (all workers together)
    space: str = "types"             # types (one ratio per type), groups (type x block group), knots (curve over depth)
    groups: int = 6                  # space groups: contiguous block groups; = number of blocks for per-layer ratios
    knots: int = 3                   # space knots: values per type curve, evenly spaced over depth
    coarse_trials: int = 0           # botorch: the first N trials search one ratio per type, then refine (0: off)
    r_min: float = 0.1
    tie: tuple[tuple[str, ...], ...] = ()   # types sharing one ratio, e.g. ((q, k),)
    dense: tuple[str, ...] = ()      # types left out of the search (kept dense)
    startup: int = 10                # first trials: space-filling draws from the budget polytope
    seed: int = 0
    objective: str = "ppl"           # ppl (the GP models log-perplexity), kl, ppl+kl
    kl_weight: float = 1.0           # objective ppl+kl: NLL + kl_weight * KL(compressed || dense), nats per token
    pruner: str = "none"
    prefetch: bool | str = "auto"    # propose the next trial while one evaluates; auto: on a GPU
    refit: bool = False              # closed-loop refit inside every trial (costs ~4 calibration passes; GPU)


@dataclass(frozen=True)
class Study:
    name: str
    model: str = "default"
    dtype: str = "float32"           # the model's weights; statistics and bases are float32/float64 regardless
    device_map: str | None = None    # None: one device (--device); "auto": across a node's GPUs via accelerate
    seq_len: int = 256
    data: dict[str, Role] = field(default_factory=dict)
    data_dir: str | None = None
    partitions: int = 1
    batch_size: int = 8
    remove: float = 0.2              # fraction of the decomposable parameters removed
    method: str = "feature"
    rank_multiple: int = 8
    refit: bool = False              # closed-loop refit of the exported allocation (bolaco.refit)
    refit_ridge: float = 0.1         # shrinkage of the refit towards the dense layer (relative to mean input variance)
    shard_size: str = "5GB"          # exports larger than this are written as several safetensors files
    storage: str = "sqlite:///storage/studies.db"
    cache_dir: str = "storage/cache"
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    surgical: SurgicalConfig = field(default_factory=SurgicalConfig)
    path: str | None = None

    def with_overrides(self, **kw) -> "Study":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def _section(raw: dict, name: str, allowed: set[str], where: str) -> dict:
    sec = raw.get(name) or {}
    if not isinstance(sec, dict):
        raise BolacoError(f"{where}: '{name}' must be a mapping")
    unknown = set(sec) - allowed
    if unknown:
        raise BolacoError(f"{where}: unknown key(s) {sorted(unknown)} in '{name}' (allowed: {sorted(allowed)})")
    return sec


def apply_overrides(raw: dict, overrides: list[str], where: str) -> dict:
    """`section.key=value` (or `key=value` at the top level) on the parsed YAML, before validation, so that an
    override is checked like the file itself. Values are YAML: 0.3, true, [q, k], {corpus: c4-valid}."""
    raw = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise BolacoError(f"--set {item!r}: write section.key=value, e.g. --set budget.remove=0.3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise BolacoError(f"--set {item!r}: the value is not valid YAML")
        *sections, name = key.strip().split(".")
        node = raw
        for sec in sections:
            child = node.get(sec)
            if child is None:
                child = node[sec] = {}
            elif not isinstance(child, dict):
                raise BolacoError(f"--set {item!r}: '{sec}' in {where} is not a section")
            else:
                child = node[sec] = dict(child)
            node = child
        node[name] = value
    return raw


def load_study(path: str | Path, overrides: list[str] = ()) -> Study:
    """The study file at `path`, with `overrides` (`section.key=value`, see apply_overrides) applied."""
    path = Path(path)
    if not path.is_file():
        raise BolacoError(f"study file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise BolacoError(f"study file {path} is not valid YAML: {where}{exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        raise BolacoError(f"study file {path} is not valid YAML: {str(exc).splitlines()[0]}")
    if not isinstance(raw, dict):
        raise BolacoError(f"study file {path} must be a YAML mapping")
    where = f"study file {path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
    raw = apply_overrides(raw, list(overrides), where)
    top = {"name", "model", "seq_len", "data", "collect", "budget", "decompose", "storage", "cache_dir", "search",
           "finetune", "surgical", "export"}
    unknown = set(raw) - top
    if unknown:
        raise BolacoError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(top)})")
    data = _section(raw, "data", set(ROLES) | {"dir"}, where)
    roles = {}
    for role in ROLES:
        if role in data:
            specs = data[role] if isinstance(data[role], list) else [data[role]]
            parts = []
            for spec in specs:
                if not isinstance(spec, dict) or "corpus" not in spec or set(spec) - {"corpus", "start", "sequences"}:
                    raise BolacoError(f"{where}: data.{role} needs 'corpus' and optional 'start', 'sequences' "
                                      "(or a list of such ranges, for a mixture)")
                parts.append(RoleSpec(str(spec["corpus"]), int(spec.get("start", 0)),
                                      None if spec.get("sequences") in (None, "all") else int(spec["sequences"])))
            if not parts:
                raise BolacoError(f"{where}: data.{role} is an empty list")
            roles[role] = parts[0] if len(parts) == 1 else tuple(parts)
    model = raw.get("model", "default")
    if isinstance(model, dict):
        unknown = set(model) - {"path", "dtype", "device_map"}
        if unknown or "path" not in model:
            raise BolacoError(f"{where}: model is a path, or a mapping with 'path' and optional 'dtype', 'device_map'")
    else:
        model = {"path": model}
    collect = _section(raw, "collect", {"partitions", "batch_size"}, where)
    budget = _section(raw, "budget", {"remove"}, where)
    decompose = _section(raw, "decompose", {"method", "rank_multiple", "refit", "refit_ridge"}, where)
    export = _section(raw, "export", {"shard_size"}, where)
    search = _section(raw, "search", {f.name for f in fields(SearchConfig)}, where)
    finetune = _section(raw, "finetune", {f.name for f in fields(FinetuneConfig)}, where)
    surgical = _section(raw, "surgical", {f.name for f in fields(SurgicalConfig)}, where)
    try:
        search_cfg = SearchConfig(**{**search, "tie": tuple(tuple(str(t) for t in g) for g in search.get("tie", ())),
                                     "dense": tuple(str(t) for t in search.get("dense", ()))})
        study = Study(name=str(raw.get("name") or path.stem), model=str(model["path"]),
                      dtype=str(model.get("dtype", "float32")),
                      device_map=None if model.get("device_map") is None else str(model["device_map"]),
                      seq_len=int(raw.get("seq_len", 256)), data=roles, data_dir=data.get("dir"),
                      partitions=int(collect.get("partitions", 1)), batch_size=int(collect.get("batch_size", 8)),
                      remove=float(budget.get("remove", 0.2)), method=str(decompose.get("method", "feature")),
                      rank_multiple=int(decompose.get("rank_multiple", 8)),
                      refit=bool(decompose.get("refit", Study.refit)),
                      refit_ridge=float(decompose.get("refit_ridge", Study.refit_ridge)),
                      shard_size=str(export.get("shard_size", Study.shard_size)),
                      storage=str(raw.get("storage", Study.storage)),
                      cache_dir=str(raw.get("cache_dir", Study.cache_dir)),
                      search=search_cfg, finetune=FinetuneConfig(**finetune),
                      surgical=SurgicalConfig(**{**surgical, **{k: tuple(surgical[k]) for k in ("types", "fractions")
                                                                if k in surgical}}),
                      path=str(path))
    except (TypeError, ValueError) as exc:
        raise BolacoError(f"{where}: {exc}")
    if study.dtype not in DTYPES:
        raise BolacoError(f"{where}: unknown model dtype '{study.dtype}' (choose from {', '.join(DTYPES)})")
    if study.refit_ridge < 0 or study.finetune.distill < 0:
        raise BolacoError(f"{where}: decompose.refit_ridge and finetune.distill must be >= 0")
    if study.method not in METHODS:
        raise BolacoError(f"{where}: unknown method '{study.method}' (choose from {', '.join(METHODS)})")
    sc = study.search
    if sc.sampler not in SAMPLERS:
        raise BolacoError(f"{where}: unknown sampler '{sc.sampler}' (choose from {', '.join(SAMPLERS)})")
    if sc.pruner not in PRUNERS:
        raise BolacoError(f"{where}: unknown pruner '{sc.pruner}' (choose from {', '.join(PRUNERS)})")
    if sc.space not in SPACES:
        raise BolacoError(f"{where}: unknown search space '{sc.space}' (choose from {', '.join(SPACES)})")
    if sc.objective not in OBJECTIVES:
        raise BolacoError(f"{where}: unknown search objective '{sc.objective}' (choose from {', '.join(OBJECTIVES)})")
    if sc.prefetch not in (True, False, "auto"):
        raise BolacoError(f"{where}: search.prefetch is true, false or auto")
    if sc.coarse_trials and sc.sampler != "botorch":
        raise BolacoError(f"{where}: search.coarse_trials needs sampler botorch")
    if not 0 < sc.r_min < 1 or sc.trials < 1 or sc.groups < 1 or sc.knots < 2 or sc.kl_weight < 0 \
            or sc.startup < 0 or sc.coarse_trials < 0:
        raise BolacoError(f"{where}: search needs 0 < r_min < 1, trials >= 1, groups >= 1, knots >= 2, "
                          "kl_weight >= 0, startup >= 0, coarse_trials >= 0")
    from .tasks import ZERO_SHOT
    if study.surgical.metric != "ppl" and study.surgical.metric not in ZERO_SHOT:
        raise BolacoError(f"{where}: unknown surgical metric '{study.surgical.metric}' "
                          f"(ppl or a task: {', '.join(ZERO_SHOT)})")
    if study.finetune.variant not in FINETUNE_VARIANTS:
        raise BolacoError(f"{where}: unknown finetune variant '{study.finetune.variant}' "
                          f"(choose from {', '.join(FINETUNE_VARIANTS)})")
    if study.seq_len < 2 or study.partitions < 1 or study.batch_size < 1 or study.rank_multiple < 1:
        raise BolacoError(f"{where}: seq_len >= 2, partitions, batch_size and rank_multiple >= 1 are required")
    return study
