"""The study file (YAML): one typed section per stage, each field with its default and its help text.

A study file is data: it is parsed with yaml.safe_load and validated by the pydantic models below (unknown keys,
wrong types and out-of-range values are refused in one line), never executed. `bolaco config` prints every key
with its default and help from these models. Names that pick a registered class (decomposition methods, samplers,
objectives) are checked against their registries by the command layer (`bolaco.workspace.check_names`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .data import ROLES, Role
from .errors import BolacoError, mask_secrets

DType = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    """A frozen section of the study file: unknown keys are refused; field docstrings are the help text."""
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ModelConfig(Section):
    path: str = "default"
    """A Hugging Face id, a model folder, a .gguf file, or 'default' (SmolLM2-135M-Instruct, shipped)."""
    dtype: DType = "float32"
    """The dtype the model's weights are loaded in; statistics and bases are float32/float64 regardless."""
    device_map: str | None = None
    """None: one device (--device); 'auto': spread over a node's GPUs through accelerate."""


class DataConfig(Section):
    calibration: Role | None = None
    """Sequences for the covariances and the refit: a range {corpus, start, sequences} or a list (a mixture)."""
    search: Role | None = None
    """Sequences of the search objective (the BO's and the surgical search's)."""
    selection: Role | None = None
    """Sequences that pick the exported trial among the search's best few (none: the best search value wins)."""
    test: Role | None = None
    """Sequences for reported figures only; never read by calibration, search, selection or training."""
    train: Role | None = None
    """Sequences for post-training (finetune); may overlap calibration."""
    dir: str | None = None
    """The folder holding the corpora and tasks that are not shipped (default: $BOLACO_DATA_DIR or ../shared/data)."""

    @field_validator(*ROLES, mode="before")
    @classmethod
    def _mixture(cls, value: Any) -> Any:
        # one range or a list of ranges: always stored as a tuple (a mixture of one or more parts)
        if value is None or isinstance(value, tuple):
            return value
        return tuple(value) if isinstance(value, list) else (value,)

    @field_validator(*ROLES)
    @classmethod
    def _not_empty(cls, value: Role | None) -> Role | None:
        if value is not None and not value:
            raise ValueError("an empty list names no sequences")
        return value

    def roles(self) -> dict[str, Role]:
        return {r: getattr(self, r) for r in ROLES if getattr(self, r) is not None}


class CollectConfig(Section):
    partitions: int = Field(1, ge=1)
    """Equal parts of the calibration sequences whose covariances are averaged (Bolaco's pooling; 1: plain)."""
    batch_size: int = Field(8, ge=1)
    """Calibration sequences per forward pass while collecting and refitting."""


class BudgetConfig(Section):
    remove: float = Field(0.2, ge=0, lt=1)
    """Share of the decomposable parameters (every compressible projection) to remove."""


class DecomposeConfig(Section):
    method: str = "feature"
    """Per-matrix factors for the projections no structured module takes: feature (centred PCA of the outputs,
    Bolaco), feature-uncentred (SVD-LLM's closed form) or weight (truncated SVD)."""
    modules: tuple[str, ...] = ()
    """Structured decompositions (MoDeGPT) that take over their projections: mlp (neurons kept), qk (head
    dimensions kept), vo (rank per head group). A module the family cannot take falls back to `method`."""
    rank_multiple: int = Field(8, ge=1)
    """Ranks and MLP widths are multiples of this (fast kernels); head dimensions move in rotary pairs."""
    refit: bool = True
    """Refit the exported allocation closed-loop: every layer fitted to the inputs it sees in the compressed model."""
    refit_ridge: float = Field(0.1, ge=0)
    """Shrinkage of the refit towards the open-loop layer, relative to the mean input variance."""


class SearchConfig(Section):
    sampler: str = "botorch"
    """The model step of the sampler: botorch (GP + LogEI on the budget hyperplane), gp (Optuna's GPSampler),
    tpe (multivariate TPE) or random (start-up draws only)."""
    trials: int = Field(30, ge=1)
    """Finished trials the study aims for, all workers together."""
    space: Literal["types", "groups", "knots"] = "types"
    """Search variables: one keep ratio per unit type (types), per type and block group (groups), or a curve
    over depth per type (knots)."""
    groups: int = Field(6, ge=1)
    """space groups: contiguous block groups (the number of blocks for one ratio per layer)."""
    knots: int = Field(3, ge=2)
    """space knots: values per type curve, evenly spaced over depth."""
    coarse_trials: int = Field(0, ge=0)
    """botorch: the first N trials search one ratio per type, then refine in the full space (0: off)."""
    r_min: float = Field(0.1, gt=0, lt=1)
    """The lowest keep ratio of any searched unit."""
    tie: tuple[tuple[str, ...], ...] = ()
    """Unit types sharing one ratio, e.g. [[q, k]]."""
    dense: tuple[str, ...] = ()
    """Unit types left out of the search (kept dense), e.g. [v]."""
    startup: int = Field(10, ge=0)
    """The first trials (after the designed ones) are space-filling draws from the budget polytope."""
    design: tuple[str, ...] = ("uniform",)
    """Allocations evaluated first, before any draw: uniform, importance (MoDeGPT's per-block rule from the
    block-importance scores) and sensitivity (one type at a time compressed, the others kept; ranked by the loss)."""
    seed: int = 0
    """Seeds every proposal (with the trial number): the same seed on the same machine gives the same trials."""
    objective: str = "ppl+recall"
    """What a trial minimises on the search split: ppl+recall (the NLL plus the NLL of rare tokens that already
    occur earlier in their window), ppl (log-perplexity), kl (to the dense model) or ppl+kl."""
    kl_weight: float = Field(1.0, ge=0)
    """objective ppl+kl: NLL + kl_weight x KL, nats per token."""
    recall_weight: float = Field(1.0, ge=0)
    """objective ppl+recall: NLL + recall_weight x the recall tokens' mean NLL, nats per token."""
    pruner: Literal["none", "median"] = "none"
    """median: stop a trial whose running search value is worse than the median of earlier trials at that point."""
    prefetch: bool | Literal["auto"] = "auto"
    """Propose the next trial while one evaluates; auto: on a GPU."""
    refit_trials: bool = False
    """Refit every trial's allocation closed-loop before evaluating it (a few calibration passes per trial)."""
    refit_sequences: int = Field(0, ge=0)
    """refit_trials: calibration sequences each trial's refit reads, evenly spaced (0: all)."""
    select_top: int = Field(0, ge=0)
    """Before export, the best N trials are evaluated open-loop and refitted on data.selection; the winner is
    exported (0: the best search value is exported as it is)."""


class EvaluateConfig(Section):
    batch_size: int = Field(8, ge=1)
    """Sequences per forward pass when measuring perplexity (search trials, selection, reports)."""


class FinetuneConfig(Section):
    variant: Literal["lora", "scaling"] = "lora"
    """lora: peft LoRA on every low-rank `down` factor; scaling: trainable diagonal scalings (Bolaco)."""
    steps: int = Field(100, ge=0)
    """Optimizer steps; tokens = steps x batch_size x grad_accum x seq_len."""
    batch_size: int = Field(4, ge=1)
    """Training sequences per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(2e-4, gt=0)
    """AdamW's learning rate."""
    schedule: str = "cosine"
    """Any transformers.get_scheduler name: cosine, linear, constant, ..."""
    warmup: int = Field(10, ge=0)
    """Steps of linear warm-up of the learning rate."""
    lora_r: int = Field(8, ge=1)
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    seed: int = 0
    """Seeds the LoRA initialisation and the order of the training batches."""
    checkpoint_every: int = Field(25, ge=1)
    """Steps between checkpoints (an interrupted run resumes from the last one)."""
    ce: float = Field(1.0, ge=0)
    """Weight of the next-token cross-entropy on the training text (0 with distill > 0: pure distillation)."""
    distill: float = Field(0.0, ge=0, validate_default=True)   # checked against ce even when left out
    """Loss = ce x CE + distill x KL(dense || model) on the same tokens (0: off)."""

    @field_validator("distill")
    @classmethod
    def _some_loss(cls, v: float, info) -> float:
        if v == 0 and info.data.get("ce") == 0:
            raise ValueError("finetune.ce is 0 too, so nothing would be trained: set one of them above 0")
        return v
    lora_dense: bool = True
    """lora: also LoRA on every projection that is a plain matrix (kept dense or structurally reduced), merged in."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more time; for large models)."""


class SurgicalConfig(Section):
    metric: str = "ppl"
    """ppl (search split) or a zero-shot task: boolq piqa hellaswag winogrande arc_easy arc_challenge openbookqa."""
    delta: float = Field(0.01, ge=0)
    """ppl: geometric allowance per module; accuracy: the absolute drop allowed."""
    task_rows: int = Field(200, ge=2)
    """Task rows for search + verification (seeded; the other rows are test)."""
    start_block: int | None = None
    """The first block visited (default: the last one)."""
    backwards: bool = True
    """Visit the blocks from start_block towards the first (else towards the last)."""
    types: tuple[str, ...] = ()
    """Unit types visited in each block; empty: all of them."""
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    """Levels tried per unit, as fractions of its break-even level (after the smallest level)."""


class ExportConfig(Section):
    shard_size: str = "5GB"
    """Exports larger than this are written as several safetensors files."""


class Study(Section):
    name: str
    """Names the study in the store, the cache of its refits and its output folders."""
    model: ModelConfig = ModelConfig()
    seq_len: int = Field(256, ge=2)
    """Tokens per sequence for every role."""
    data: DataConfig = DataConfig()
    collect: CollectConfig = CollectConfig()
    budget: BudgetConfig = BudgetConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    search: SearchConfig = SearchConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    surgical: SurgicalConfig = SurgicalConfig()
    export: ExportConfig = ExportConfig()
    storage: str = "sqlite:///storage/studies.db"
    """The Optuna study store: any SQLAlchemy URL (PostgreSQL for many machines); or $BOLACO_STORAGE."""
    cache_dir: str = "storage/cache"
    """Covariances, bases, refits and post-training checkpoints (artifacts go beside it)."""
    _path: str | None = PrivateAttr(default=None)

    @field_validator("model", mode="before")
    @classmethod
    def _model_path(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("give a path, a Hugging Face id, a .gguf file or 'default'")
        return {"path": value} if isinstance(value, str) else value

    @property
    def path(self) -> str | None:
        """The study file it was read from."""
        return self._path

    def override(self, **dotted: Any) -> "Study":
        """A copy with `section.key` values replaced (underscores for dots: search__seed=1), validated like a file."""
        raw = self.model_dump(mode="python")
        for key, value in dotted.items():
            *sections, name = key.split("__")
            node = raw
            for s in sections:
                node = node[s]
            node[name] = value
        study = validate(raw, f"study {self.name}")
        study._path = self._path
        return study


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys the section at `loc` accepts."""
    model: type[BaseModel] = Study
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return list(model.model_fields)


def validate(raw: dict, where: str) -> Study:
    try:
        return Study.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("tuple[", "function-"))))
        key = _key(loc)
        if err["type"] == "extra_forbidden":
            raise BolacoError(f"{where}: unknown key '{key}' (allowed there: {', '.join(_allowed_keys(loc[:-1]))})")
        if err["type"] == "missing":
            raise BolacoError(f"{where}: '{key}' is required")
        message = err["msg"][0].lower() + err["msg"][1:]
        raise BolacoError(f"{where}: {key} is {err['input']!r}: {message}")


def apply_overrides(raw: dict, overrides: list[str], where: str) -> dict:
    """`section.key=value` (or `key=value` at the top level) on the parsed YAML, before validation, so that an
    override is checked like the file itself. Values are YAML: 0.3, true, [q, k], {corpus: c4-valid}."""
    raw = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise BolacoError(f"--set {mask_secrets(item)!r}: write section.key=value, e.g. --set budget.remove=0.3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise BolacoError(f"--set {mask_secrets(item)!r}: the value is not valid YAML")
        *sections, name = key.strip().split(".")
        node = raw
        for sec in sections:
            child = node.get(sec)
            if child is None:
                child = node[sec] = {}
            elif not isinstance(child, dict):
                raise BolacoError(f"--set {mask_secrets(item)!r}: '{sec}' in {where} is not a section")
            else:
                child = node[sec] = dict(child)
            node = child
        node[name] = value
    return raw


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BolacoError(f"study file {path} is not UTF-8 text")
    except OSError as exc:
        raise BolacoError(f"cannot read study file {path}: {exc.strerror or exc}")
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise BolacoError(f"study file {path} is not valid YAML: {where}{exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        raise BolacoError(f"study file {path} is not valid YAML: {str(exc).splitlines()[0]}")
    if not isinstance(raw, dict):
        raise BolacoError(f"study file {path} must be a YAML mapping")
    return raw


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    """The study file at `path`, with `overrides` (`section.key=value`, see apply_overrides) applied."""
    path = Path(path)
    if not path.is_file():
        raise BolacoError(f"study file not found: {path}")
    raw = read_yaml(path)
    where = f"study file {path}" + (f" with --set {mask_secrets(' '.join(overrides))}" if overrides else "")
    raw = apply_overrides(raw, list(overrides), where)
    raw.setdefault("name", path.stem)
    study = validate(raw, where)
    study._path = str(path)
    if study.search.coarse_trials and study.search.sampler != "botorch":
        raise BolacoError(f"{where}: search.coarse_trials needs sampler botorch")
    if study.search.select_top and study.data.selection is None:
        raise BolacoError(f"{where}: search.select_top needs a data.selection role to select on")
    return study


def describe_config() -> list[tuple[str, str, str]]:
    """(key, default, help) of every setting of a study file, in file order."""
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Section):
                walk(ann, f"{key}.")
                continue
            default = "(required)" if field.is_required() else yaml.safe_dump(
                field.get_default(call_default_factory=True), default_flow_style=True).strip().removesuffix("...")
            rows.append((key, default.strip(), " ".join((field.description or "").split())))

    walk(Study, "")
    return rows
