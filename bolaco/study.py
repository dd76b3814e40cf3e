"""The study file (YAML): model, data roles, collect settings, budget, decomposition, storage.

A study file is data: it is parsed with yaml.safe_load and checked key by key, never executed.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .data import ROLES, Role, RoleSpec
from .errors import BolacoError

# The allowed values, declared once: the dataclasses below use these types, `_check` validates against them.
Method = Literal["feature", "feature-uncentred", "weight"]
Sampler = Literal["botorch", "gp", "tpe", "random"]
Space = Literal["groups", "types", "knots"]
Objective = Literal["ppl", "kl", "ppl+kl"]   # search NLL (log-perplexity), KL(compressed || dense), NLL + w * KL
DType = Literal["float32", "bfloat16", "float16"]
Pruner = Literal["none", "median"]
FinetuneVariant = Literal["lora", "scaling"]
METHODS, SAMPLERS, FINETUNE_VARIANTS = get_args(Method), get_args(Sampler), get_args(FinetuneVariant)


def bounded(default, *, ge=None, gt=None, lt=None, key: str | None = None):
    """A field with numeric bounds (checked by `_check`); `key`: its name in the study file, if not section.name."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "lt": lt, "key": key})


def named(default, key: str):
    return field(default=default, metadata={"key": key})


@dataclass(frozen=True)
class SurgicalConfig:
    """SFSD greedy search (bolaco surgical)."""
    metric: str = "ppl"                # "ppl" (search split) or a zero-shot task (bolaco.tasks.ZERO_SHOT)
    delta: float = bounded(0.01, ge=0)               # ppl: geometric factor per module; accuracy: absolute drop allowed
    task_rows: int = bounded(200, ge=2)              # task rows for search + verification (seeded; the rest is test)
    start_block: int | None = None     # default: the last block
    backwards: bool = True
    types: tuple[str, ...] = ()        # projection types visited in each block; empty: all of the model's
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class FinetuneConfig:
    """Post-training in the low-rank subspace (bolaco finetune)."""
    variant: FinetuneVariant = "lora"           # lora (peft on every `down` factor) or scaling (diagonal scalings)
    steps: int = bounded(100, ge=0)
    batch_size: int = bounded(4, ge=1)
    grad_accum: int = bounded(1, ge=1)
    lr: float = bounded(2e-4, gt=0)
    schedule: str = "cosine"         # any transformers.get_scheduler name: cosine, linear, constant, ...
    warmup: int = bounded(10, ge=0)
    lora_r: int = bounded(8, ge=1)
    lora_alpha: int = 16
    seed: int = 0
    checkpoint_every: int = bounded(25, ge=1)
    distill: float = bounded(0.0, ge=0)   # loss = CE + distill * KL(dense || model) on the same tokens (0: off)
    # lora: also LoRA on the projections the rank map keeps dense, merged into their weights (same parameter count)
    lora_dense: bool = True


@dataclass(frozen=True)
class SearchConfig:
    """The BO study: keep ratios in [r_min, 1] of the searched linears, parameterised by `space`."""
    sampler: Sampler = "botorch"
    trials: int = bounded(30, ge=1)                # total finished trials the study aims for (all workers together)
    space: Space = "types"   # types (one ratio per type), groups (type x block group), knots (curve over depth)
    groups: int = bounded(6, ge=1)   # space groups: contiguous block groups; = number of blocks for per-layer ratios
    knots: int = bounded(3, ge=2)                  # space knots: values per type curve, evenly spaced over depth
    # botorch: the first N trials search one ratio per type, then refine (0: off)
    coarse_trials: int = bounded(0, ge=0)
    r_min: float = bounded(0.1, gt=0, lt=1)
    tie: tuple[tuple[str, ...], ...] = ()   # types sharing one ratio, e.g. ((q, k),)
    dense: tuple[str, ...] = ()      # types left out of the search (kept dense)
    startup: int = bounded(10, ge=0)               # first trials: space-filling draws from the budget polytope
    seed: int = 0
    objective: Objective = "ppl"          # ppl (the GP models log-perplexity), kl, ppl+kl
    # objective ppl+kl: NLL + kl_weight * KL(compressed || dense), nats per token
    kl_weight: float = bounded(1.0, ge=0)
    pruner: Pruner = "none"
    prefetch: bool | Literal["auto"] = "auto"   # propose the next trial while one evaluates; auto: on a GPU
    refit: bool = False              # closed-loop refit inside every trial (costs ~2 calibration passes; GPU)
    # calibration sequences the per-trial refit reads, evenly spaced over the role (0: all of them)
    refit_sequences: int = bounded(0, ge=0)


@dataclass(frozen=True)
class Study:
    name: str
    model: str = "default"
    # the model's weights; statistics and bases are float32/float64 regardless
    dtype: DType = named("float32", "model.dtype")
    device_map: str | None = None    # None: one device (--device); "auto": across a node's GPUs via accelerate
    seq_len: int = bounded(256, ge=2)
    data: dict[str, Role] = field(default_factory=dict)
    data_dir: str | None = None
    partitions: int = bounded(1, ge=1, key="collect.partitions")
    batch_size: int = bounded(8, ge=1, key="collect.batch_size")
    remove: float = bounded(0.2, ge=0, lt=1, key="budget.remove")   # fraction of the decomposable parameters removed
    method: Method = named("feature", "decompose.method")
    rank_multiple: int = bounded(8, ge=1, key="decompose.rank_multiple")
    refit: bool = named(True, "decompose.refit")    # closed-loop refit of the exported allocation (bolaco.refit)
    # shrinkage of the refit towards the dense layer (relative to mean input variance)
    refit_ridge: float = bounded(0.1, ge=0, key="decompose.refit_ridge")
    shard_size: str = "5GB"          # exports larger than this are written as several safetensors files
    storage: str = "sqlite:///storage/studies.db"
    cache_dir: str = "storage/cache"
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    surgical: SurgicalConfig = field(default_factory=SurgicalConfig)
    path: str | None = None

    def with_overrides(self, **kw) -> "Study":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


_SECTIONS = {"SearchConfig": "search", "FinetuneConfig": "finetune", "SurgicalConfig": "surgical"}


def _allowed(hint) -> tuple[list, list[type]]:
    """(the literal values, the plain types) a type annotation admits."""
    if get_origin(hint) is Literal:
        return list(get_args(hint)), []
    if get_origin(hint) in (Union, UnionType):
        values, types = [], []
        for arg in get_args(hint):
            v, t = _allowed(arg)
            values += v
            types += t
        return values, types
    return [], [hint]


def _check(config, where: str) -> None:
    """Every field of a study dataclass (and of its section dataclasses) against its annotation and bounds: the
    one validator of the study model."""
    hints = get_type_hints(type(config))
    section = _SECTIONS.get(type(config).__name__)
    for f in fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if is_dataclass(value):
            _check(value, where)
            continue
        key = f.metadata.get("key") or (f"{section}.{f.name}" if section else f.name)
        values, types = _allowed(hint)
        if value is None and type(None) in types:
            continue
        if bool in types:       # YAML true/false
            values += [True, False]
        if value in values:
            continue
        if values:              # a Literal (or bool) field given something else
            choices = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
            raise BolacoError(f"{where}: {key} is {value!r}; choose from {choices}")
        numeric = [t for t in types if t in (int, float)]
        if not numeric:
            continue
        if isinstance(value, bool) or not isinstance(value, int if numeric == [int] else (int, float)):
            raise BolacoError(f"{where}: {key} must be {'an integer' if numeric == [int] else 'a number'}, "
                              f"not {value!r}")
        for bound, holds, word in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("lt", operator.lt, "<")):
            limit = f.metadata.get(bound)
            if limit is not None and not holds(value, limit):
                raise BolacoError(f"{where}: {key} is {value}, but it must be {word} {limit}")


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


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
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
                      dtype=model.get("dtype", "float32"),
                      device_map=None if model.get("device_map") is None else str(model["device_map"]),
                      seq_len=raw.get("seq_len", 256), data=roles, data_dir=data.get("dir"),
                      partitions=collect.get("partitions", 1), batch_size=collect.get("batch_size", 8),
                      remove=budget.get("remove", 0.2), method=decompose.get("method", "feature"),
                      rank_multiple=decompose.get("rank_multiple", 8),
                      refit=decompose.get("refit", Study.refit),
                      refit_ridge=decompose.get("refit_ridge", Study.refit_ridge),
                      shard_size=str(export.get("shard_size", Study.shard_size)),
                      storage=str(raw.get("storage", Study.storage)),
                      cache_dir=str(raw.get("cache_dir", Study.cache_dir)),
                      search=search_cfg, finetune=FinetuneConfig(**finetune),
                      surgical=SurgicalConfig(**{**surgical, **{k: tuple(surgical[k]) for k in ("types", "fractions")
                                                                if k in surgical}}),
                      path=str(path))
    except (TypeError, ValueError) as exc:
        raise BolacoError(f"{where}: {exc}")
    _check(study, where)
    if study.search.coarse_trials and study.search.sampler != "botorch":
        raise BolacoError(f"{where}: search.coarse_trials needs sampler botorch")
    from .evaluate import ZERO_SHOT
    if study.surgical.metric != "ppl" and study.surgical.metric not in ZERO_SHOT:
        raise BolacoError(f"{where}: unknown surgical metric '{study.surgical.metric}' "
                          f"(ppl or a task: {', '.join(ZERO_SHOT)})")
    return study
