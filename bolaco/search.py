"""The Bayesian-optimisation study (DESIGN 2.5, 2.6): keep ratios per (type group, block group) under an
exact parameter budget, evaluated on the search split, stored in any SQLAlchemy database.

Parameter count is (up to rounding) linear in the keep ratios, params ~ sum_j P_j x_j + c, so the budget
is a hyperplane. The BoTorch sampler optimises LogEI on that hyperplane (an equality constraint of
`optimize_acqf`) and draws its start-up points from the same polytope; every sampler's proposal is then
projected exactly onto the budget by `Budget.fit` (scale, round to multiples, top up within one step).
"""

from __future__ import annotations

import io
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from . import perplexity
from .arch import TYPES, Adapter
from .budget import Budget, RankMap
from .errors import BolacoError
from .study import Study

ARTIFACT_DIR = "storage/artifacts"
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 30   # a worker silent for GRACE_SECONDS has its trial failed and retried
# BoTorchSampler, heartbeats and the retry callback are marked experimental; bolaco pins their use in tests.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass(frozen=True)
class SearchSpace:
    variables: dict[str, list[str]]     # variable name -> linear ids sharing its keep ratio
    r_min: float
    budget: Budget
    target: int

    @classmethod
    def from_study(cls, study: Study, adapter: Adapter, budget: Budget) -> "SearchSpace":
        cfg = study.search
        known = set(TYPES)
        tied = [tuple(g) for g in cfg.tie]
        for t in [t for g in tied for t in g] + list(cfg.dense):
            if t not in known:
                raise BolacoError(f"search: unknown type '{t}' (types are {', '.join(TYPES)})")
        type_groups = tied + [(t,) for t in TYPES if t not in cfg.dense and all(t not in g for g in tied)]
        n = adapter.n_blocks
        groups = min(cfg.groups, n)
        variables: dict[str, list[str]] = {}
        for tg in type_groups:
            for g in range(groups):
                blocks = [b for b in range(n) if b * groups // n == g]
                name = f"{'+'.join(tg)}.b{blocks[0]}-{blocks[-1]}"
                variables[name] = [f"{b}.{t}" for b in blocks for t in tg]
        target = budget.target(study.remove)
        space = cls(variables, cfg.r_min, budget, target)
        if space.rhs <= space.r_min * float(space.coefficients().sum()):
            raise BolacoError(f"the search space cannot meet remove={study.remove}: with r_min={cfg.r_min} and "
                              f"types {list(cfg.dense)} kept dense ({space.dense_rest:,} parameters) the searched layers would "
                              "need keep ratios below r_min; lower r_min or search more types")
        if space.rhs >= float(space.coefficients().sum()):
            raise BolacoError(f"remove={study.remove} is met with every searched layer dense: nothing to search")
        return space

    @property
    def names(self) -> list[str]:
        return list(self.variables)

    def coefficients(self, names: list[str] | None = None) -> torch.Tensor:
        """P_j: dense parameters of the linears of variable j (the slope of params in x_j), in `names` order."""
        return torch.tensor([float(sum(self.budget.dense(l) for l in self.variables[n])) for n in names or self.names],
                            dtype=torch.float64)

    @property
    def dense_rest(self) -> int:
        """Parameters of the linears no variable covers (types kept dense)."""
        searched = {l for ids in self.variables.values() for l in ids}
        return sum(self.budget.dense(l) for l in self.budget.linears if l not in searched)

    @property
    def rhs(self) -> float:
        """sum_j P_j x_j must equal this for the budget to be met (before rounding)."""
        offset = sum(self.budget.lowrank(l, 0) for ids in self.variables.values() for l in ids)
        return float(self.target - offset - self.dense_rest)

    def uniform_point(self) -> dict[str, float]:
        r = self.rhs / float(self.coefficients().sum())
        return {name: r for name in self.variables}

    def ranks(self, point: dict[str, float]) -> RankMap:
        keeps = {lid: point[name] for name, ids in self.variables.items() for lid in ids}
        return self.budget.fit(keeps, self.target)

    def constraint(self, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The budget hyperplane in BoTorch's normalised [0, 1]^d coordinates: (indices, coefficients, rhs),
        scaled so that the coefficients sum to 1 (parameter counts of ~1e6 make SLSQP fail). Columns follow
        the sampler's order: Optuna's IntersectionSearchSpace sorts parameters by name."""
        if bounds.shape[1] != len(self.names):
            raise RuntimeError(f"BoTorch got {bounds.shape[1]} columns for {len(self.names)} search variables")
        lo, hi = bounds[0], bounds[1]
        p = self.coefficients(sorted(self.names)).to(bounds)
        coef = p * (hi - lo)
        scale = float(coef.sum())
        return (torch.arange(len(p)), coef / scale, (self.rhs - float(p @ lo)) / scale)


def botorch_candidates(space: SearchSpace, startup: int, seed: int):
    """A `candidates_func` for optuna_integration.BoTorchSampler: LogEI optimised on the budget hyperplane."""
    from botorch.acquisition.analytic import LogExpectedImprovement
    from botorch.exceptions.errors import CandidateGenerationError
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Standardize
    from botorch.optim import optimize_acqf
    from botorch.utils.sampling import get_polytope_samples
    from botorch.utils.transforms import normalize, unnormalize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    calls = {"n": 0}

    def candidates(train_x, train_obj, train_con, bounds, pending_x):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # BoTorch's small dense algebra is several times slower with more threads
        try:
            unit = torch.zeros_like(bounds)
            unit[1] = 1
            eq = [space.constraint(bounds)]
            calls["n"] += 1
            x = None
            if train_x.shape[0] >= startup:
                try:
                    gp = SingleTaskGP(normalize(train_x, bounds), train_obj, outcome_transform=Standardize(m=1))
                    fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
                    acqf = LogExpectedImprovement(gp, best_f=train_obj.max())
                    x, _ = optimize_acqf(acqf, bounds=unit, q=1, num_restarts=8, raw_samples=256,
                                         equality_constraints=eq, options={"maxiter": 200, "batch_limit": 8})
                except (CandidateGenerationError, RuntimeError, ValueError) as exc:
                    # one failed acquisition optimisation must not stop a worker: explore instead
                    warnings.warn(f"BoTorch could not optimise the acquisition ({exc}); "
                                  "drawing this trial at random from the budget polytope")
            if x is None:
                x = get_polytope_samples(1, unit, equality_constraints=eq, seed=seed + calls["n"], n_burnin=200)
            return unnormalize(x.detach().clamp(0, 1), bounds)
        finally:
            torch.set_num_threads(threads)

    return candidates


def make_sampler(study: Study, space: SearchSpace) -> optuna.samplers.BaseSampler:
    cfg = study.search
    if cfg.sampler == "botorch":
        from optuna_integration import BoTorchSampler
        return BoTorchSampler(candidates_func=botorch_candidates(space, cfg.startup, cfg.seed), n_startup_trials=0,
                              seed=cfg.seed)
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=cfg.seed)
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def open_storage(url: str) -> RDBStorage:
    """An Optuna RDB storage with a heartbeat: a trial whose worker died is failed and re-queued."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                          engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as exc:   # sqlalchemy raises many types; the user needs the URL and the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BolacoError(f"cannot open the study storage {url}: {first}") from exc


def study_name(study: Study) -> str:
    return f"{study.name}-{study.search.sampler}"


def open_optuna_study(study: Study, space: SearchSpace, create: bool) -> optuna.Study:
    storage = open_storage(study.storage)
    name = study_name(study)
    sampler = make_sampler(study, space)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if study.search.pruner == "median" \
        else optuna.pruners.NopPruner()
    exists = name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if not create and not exists:
        raise BolacoError(f"no study '{name}' in {study.storage}: start it with `make study` (bolaco search) first")
    opt = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                              pruner=pruner, load_if_exists=True)
    if not exists:
        opt.set_user_attr("variables", space.names)
        opt.set_user_attr("study_file", study.path)
        opt.enqueue_trial(space.uniform_point(), user_attrs={"allocation": "uniform"})
    elif opt.user_attrs.get("variables") != space.names:
        raise BolacoError(f"study '{name}' in {study.storage} was created with other search variables: "
                          "use a new study name or the study file it was created with")
    return opt


def allocation_heatmap(budget: Budget, ranks: RankMap, n_blocks: int, title: str) -> bytes:
    """PNG of the share of parameters kept per (layer, type)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = [[budget.keep(f"{b}.{t}", ranks) for b in range(n_blocks)] for t in TYPES]
    fig, ax = plt.subplots(figsize=(max(4, n_blocks * 0.22 + 1.5), 2.6), dpi=100)
    im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(TYPES)), TYPES)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="kept")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class Objective:
    """ask -> apply -> evaluate -> tell, with per-trial user attrs and an allocation heat map artifact."""

    def __init__(self, ws, comp, space: SearchSpace, artifacts: str | None = ARTIFACT_DIR):
        self.ws, self.comp, self.space = ws, comp, space
        self.store, self.artifact_dir = None, artifacts
        if artifacts:
            from optuna.artifacts import FileSystemArtifactStore
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            self.store = FileSystemArtifactStore(artifacts)
        self.eval_threads = torch.get_num_threads()
        self.kl_weight = ws.study.search.kl_weight
        # dense log-probs of the search split, once, for the KL term (the model is dense here)
        self.reference = (perplexity.log_probs(ws.model, ws.data["search"], ws.study.batch_size)
                          if self.kl_weight > 0 else None)
        self._last_end = time.perf_counter()

    def __call__(self, trial: optuna.Trial) -> float:
        # Optuna samples relative parameters lazily, at the first suggest: the GP fit happens in this loop
        point = {name: trial.suggest_float(name, self.space.r_min, 1.0) for name in self.space.names}
        sampled = time.perf_counter() - self._last_end
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        torch.set_num_threads(self.eval_threads)
        try:
            t = time.perf_counter()
            ranks = self.space.ranks(point)
            self.comp.apply(ranks)
            applied = time.perf_counter() - t

            def report(step, ppl):
                trial.report(ppl, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            result = perplexity.perplexity(self.ws.model, self.ws.data["search"], self.ws.study.batch_size,
                                           desc=f"trial {trial.number}", on_chunk=report, reference=self.reference)
            budget = self.comp.budget
            params = budget.params(ranks)
            attrs = {"ranks": ranks, "params": params, "compression": 1 - params / budget.decomposable,
                     "search_ppl": result.ppl, "search_kl": result.kl, "seconds_sampling": round(sampled, 3),
                     "seconds_apply": round(applied, 3), "seconds_eval": round(result.seconds, 3)}
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            if self.store is not None:
                self._upload_heatmap(trial, budget, ranks, result.ppl)
            value = result.ppl + (self.kl_weight * result.kl if self.reference is not None else 0.0)
            print(f"trial {trial.number}: search ppl {result.ppl:.3f}, removed {attrs['compression']:.2%}; seconds: "
                  f"sampling {sampled:.1f}, apply {applied:.2f}, eval {result.seconds:.1f}", flush=True)
            return value
        finally:
            self.comp.restore()
            torch.set_num_threads(1)   # the sampler runs between objective calls
            self._last_end = time.perf_counter()

    def _upload_heatmap(self, trial, budget, ranks, ppl):
        from optuna.artifacts import upload_artifact
        png = allocation_heatmap(budget, ranks, self.ws.adapter.n_blocks, f"trial {trial.number}: search ppl {ppl:.2f}")
        path = Path(self.artifact_dir) / f".heatmap-{os.getpid()}.png"
        path.write_bytes(png)
        upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial,
                        mimetype="image/png")
        path.unlink()


def remaining(opt: optuna.Study, target: int) -> int:
    done = len(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    return max(0, target - done)


def run(ws, comp, create: bool, trials: int | None = None, artifacts: str | None = ARTIFACT_DIR) -> optuna.Study:
    """Create or join the study and work until it has `trials` finished trials (all workers together)."""
    study = ws.study
    space = SearchSpace.from_study(study, ws.adapter, comp.budget)
    opt = open_optuna_study(study, space, create)
    target = trials or study.search.trials
    objective = Objective(ws, comp, space, artifacts)
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # bolaco prints one short line per trial
    stop_at = optuna.study.MaxTrialsCallback(target, states=(TrialState.COMPLETE, TrialState.PRUNED))
    todo = remaining(opt, target)
    print(f"study {opt.study_name} in {study.storage}: {len(space.names)} variables, "
          f"{target - todo} of {target} trials finished, sampler {study.search.sampler}")
    if todo:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            opt.optimize(objective, n_trials=todo, callbacks=[stop_at], gc_after_trial=False)
        finally:
            torch.set_num_threads(threads)
    return opt


def best_ranks(study: Study) -> tuple[RankMap, optuna.trial.FrozenTrial]:
    storage = open_storage(study.storage)
    name = study_name(study)
    try:
        opt = optuna.load_study(study_name=name, storage=storage)
        best = opt.best_trial
    except (KeyError, ValueError):
        raise BolacoError(f"study '{name}' in {study.storage} has no finished trial yet: run `make study` first")
    return {k: int(v) for k, v in best.user_attrs["ranks"].items()}, best
