"""The Optuna study of a study file: storage, creation and resumption, the objective, the worker loop.

A worker loads the model and the cached bases once, then loops ask -> apply -> evaluate -> tell until
the study has its target of finished trials (all workers together). Trials send a heartbeat; a trial
whose worker died is failed after the grace period and re-queued with the same parameters. With
`prefetch`, the next trial is proposed in a background thread while the current one evaluates (with
the current one as a pending point), so that a GPU worker never waits for the GP.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ..evaluate import perplexity
from ..decompose import Budget, RankMap
from ..heatmap import keep_heatmap
from ..errors import BolacoError
from ..study import Study
from .sampler import BudgetSampler, _ranks_key
from .space import SearchSpace

ARTIFACT_DIR = "storage/artifacts"
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 30   # a worker silent for GRACE_SECONDS has its trial failed and retried
OBJECTIVE_FORMAT = "nats/token"             # trial values: search NLL (log-perplexity), KL, or their sum
# Heartbeats and the retry callback are marked experimental; bolaco pins their use in tests. Its worker loop
# uses ask/tell and records the heartbeats itself (see _Heartbeat), which Optuna warns about.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

log = logging.getLogger(__name__)


def masked_url(url: str) -> str:
    """The storage URL as it may be shown: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(url: str) -> RDBStorage:
    """An Optuna RDB storage with a heartbeat: a trial whose worker died is failed and re-queued."""
    try:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                          engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as exc:   # sqlalchemy raises many types; the user needs the URL and the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            password = make_url(url).password
        except ArgumentError:
            password = None
        if password:
            first = first.replace(str(password), "***")
        raise BolacoError(f"cannot open the study storage {masked_url(url)}: {first}") from None


def study_name(study: Study) -> str:
    return f"{study.name}-{study.search.sampler}"


def _study_attrs(study: Study, space: SearchSpace) -> dict:
    cfg = study.search
    return {"variables": list(space.names), "space": cfg.space, "objective": cfg.objective,
            "kl_weight": cfg.kl_weight if cfg.objective == "ppl+kl" else 0.0, "value_unit": OBJECTIVE_FORMAT}


def open_optuna_study(study: Study, space: SearchSpace, create: bool,
                      sampler: BudgetSampler) -> tuple[optuna.Study, RDBStorage]:
    storage = open_storage(study.storage)
    name = study_name(study)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if study.search.pruner == "median" \
        else optuna.pruners.NopPruner()
    exists = name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if not create and not exists:
        raise BolacoError(f"no study '{name}' in {masked_url(study.storage)}: "
                          "start it with `make study` (bolaco search) first")
    opt = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                              pruner=pruner, load_if_exists=True)
    attrs = _study_attrs(study, space)
    if not exists:
        for k, v in attrs.items():
            opt.set_user_attr(k, v)
        opt.set_user_attr("study_file", study.path)
        opt.set_metric_names([f"search {study.search.objective} ({OBJECTIVE_FORMAT})"])
        opt.enqueue_trial(space.uniform_point(), user_attrs={"allocation": "uniform", "proposal": "uniform"})
    else:
        found = {k: opt.user_attrs.get(k) for k in attrs}
        if found != attrs:
            diff = [k for k in attrs if found[k] != attrs[k]]
            raise BolacoError(f"study '{name}' in {masked_url(study.storage)} was created with another "
                              f"{', '.join(diff)} "
                              "(or by an older bolaco): use a new study name or the study file it was created with")
    return opt, storage


def allocation_heatmap(budget: Budget, ranks: RankMap, types: tuple[str, ...], n_blocks: int, title: str) -> bytes:
    """PNG of the share of parameters kept per (layer, type)."""
    return keep_heatmap({f"{b}.{t}": budget.keep(f"{b}.{t}", ranks) for b in range(n_blocks) for t in types},
                        types, n_blocks, title)


class Objective:
    """apply -> evaluate a trial's rank map; per-trial user attrs and an allocation heat map artifact."""

    def __init__(self, ws, comp, space: SearchSpace, artifacts: str | None = ARTIFACT_DIR):
        self.ws, self.comp, self.space = ws, comp, space
        self.store, self.artifact_dir = None, artifacts
        if artifacts:
            from optuna.artifacts import FileSystemArtifactStore
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            self.store = FileSystemArtifactStore(artifacts)
        self.objective = ws.study.search.objective
        self.kl_weight = ws.study.search.kl_weight
        # dense log-probs of the search split, once, for the KL term (the model is dense here)
        self.reference = (perplexity.log_probs(ws.model, ws.data["search"], ws.study.batch_size)
                          if self.objective != "ppl" else None)

    def value(self, nll: float, kl: float | None) -> float:
        if self.objective == "ppl":
            return nll
        assert kl is not None, "a KL objective evaluates against the dense reference"
        return kl if self.objective == "kl" else nll + self.kl_weight * kl

    def __call__(self, trial: optuna.Trial, ranks: RankMap) -> tuple[float, dict]:
        """(objective value, the user attrs it recorded)."""
        try:
            t = time.perf_counter()
            search = self.ws.study.search
            if search.refit:   # closed-loop refit per trial (about two passes of its calibration sequences)
                self.comp.apply(ranks, self.ws.refit(self.comp, ranks, cache=False, progress=False,
                                                     sequences=search.refit_sequences))
            else:
                self.comp.apply(ranks)
            applied = time.perf_counter() - t

            def report(step, ppl):
                trial.report(float(torch.tensor(ppl).log()), step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            result = perplexity.perplexity(self.ws.model, self.ws.data["search"], self.ws.study.batch_size,
                                           desc=f"trial {trial.number}", on_chunk=report, reference=self.reference)
            budget = self.comp.budget
            params = budget.params(ranks)
            attrs = {"params": params, "compression": 1 - params / budget.decomposable, "search_ppl": result.ppl,
                     "search_nll": result.nll, "search_kl": result.kl, "seconds_apply": round(applied, 3),
                     "seconds_eval": round(result.seconds, 3)}
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            if self.store is not None:
                self._upload_heatmap(trial, budget, ranks, result.ppl)
            return self.value(result.nll, result.kl), attrs
        finally:
            self.comp.restore()

    def _upload_heatmap(self, trial, budget, ranks, ppl):
        from optuna.artifacts import upload_artifact
        png = allocation_heatmap(budget, ranks, self.ws.adapter.types, self.ws.adapter.n_blocks,
                                 f"trial {trial.number}: search ppl {ppl:.2f}")
        path = Path(self.artifact_dir) / f".heatmap-{os.getpid()}-{trial.number}.png"
        path.write_bytes(png)
        upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial,
                        mimetype="image/png")
        path.unlink()


class _Heartbeat:
    """Records a heartbeat every HEARTBEAT_SECONDS for the trials this worker holds (current and prefetched)."""

    def __init__(self, storage: RDBStorage):
        self.storage = storage
        self.trials: set[int] = set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def hold(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)
        with self._lock:
            self.trials.add(trial_id)

    def release(self, trial_id: int) -> None:
        with self._lock:
            self.trials.discard(trial_id)

    def _loop(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                held = list(self.trials)
            for tid in held:
                self.storage.record_heartbeat(tid)

    def stop(self):
        self._stop.set()
        # bounded: after a Ctrl-C the thread may be inside a storage call; it is a daemon and dies with the process
        self._thread.join(timeout=HEARTBEAT_SECONDS)


def finished(opt: optuna.Study) -> int:
    return len(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


class Worker:
    """One process's share of a study: propose (ask + sample + record), evaluate, tell."""

    def __init__(self, opt: optuna.Study, space: SearchSpace, sampler: BudgetSampler, objective: Objective,
                 storage: RDBStorage):
        self.opt, self.space, self.sampler, self.objective = opt, space, sampler, objective
        self.heart = _Heartbeat(storage)
        self.who = f"{socket.gethostname()}:{os.getpid()}"

    def propose(self) -> tuple[optuna.Trial, RankMap, dict]:
        """A new trial with its parameters and rank map recorded; never one whose rank map is already stored."""
        for _ in range(5):
            t = time.perf_counter()
            trial = self.opt.ask()
            self.heart.hold(trial._trial_id)
            point = {n: trial.suggest_float(n, self.space.r_min, 1.0) for n in self.space.names}
            ranks = self.space.ranks(point)
            info = self.sampler.proposals.pop(trial.number, None)
            # fixed parameters: the enqueued uniform trial, or a retry (it carries the failed trial's attrs)
            if info is None:
                retry = "ranks" in trial.user_attrs
                info = {"proposal": "retry" if retry else trial.user_attrs.get("proposal", "enqueued"),
                        "seconds_sampling": round(time.perf_counter() - t, 3)}
            for k, v in {**info, "ranks": ranks, "worker": self.who}.items():
                trial.set_user_attr(k, v)
            twin = self._twin(trial, ranks) if info["proposal"] not in ("retry", "uniform") else None
            if twin is None:
                return trial, ranks, info
            # a map already stored or being evaluated (two workers proposed it at the same moment): give way
            trial.set_user_attr("duplicate_of", twin)
            self.opt.tell(trial, state=TrialState.FAIL)
            self.heart.release(trial._trial_id)
        raise BolacoError("five proposals in a row duplicated stored trials: the search space is exhausted "
                          "at this rank multiple; lower decompose.rank_multiple or search more variables")

    def _twin(self, trial, ranks) -> int | None:
        """Another live or finished trial with this rank map. Every worker records its ranks before it looks, so
        of two workers proposing one map at the same moment the one that looks second sees the other (both may:
        then both give way). Looking only at lower-numbered trials is not enough: the lower number may record its
        ranks after the higher one has looked."""
        key = _ranks_key(ranks)
        for other in self.opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                  TrialState.RUNNING)):
            if other.number != trial.number and "ranks" in other.user_attrs \
                    and _ranks_key(other.user_attrs["ranks"]) == key:
                return other.number
        return None

    def evaluate(self, trial: optuna.Trial, ranks: RankMap, info: dict) -> None:
        state, value, a = TrialState.FAIL, None, cast(dict, {})
        try:
            value, a = self.objective(trial, ranks)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        finally:
            self.opt.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            self.heart.release(trial._trial_id)
        ppl = f"search ppl {a['search_ppl']:.3f}" if "search_ppl" in a else state.name.lower()
        log.info(f"trial {trial.number}: {ppl}, removed {a.get('compression', 0):.2%}, {info['proposal']}; seconds: "
                    f"sampling {info['seconds_sampling']:.2f}, apply {a.get('seconds_apply', 0):.2f}, "
                    f"eval {a.get('seconds_eval', 0):.1f}")

    def work(self, target: int, prefetch: bool) -> None:
        pool = ThreadPoolExecutor(1) if prefetch else None
        ahead = None
        threads = torch.get_num_threads()
        try:
            while True:
                optuna.storages.fail_stale_trials(self.opt)
                if finished(self.opt) >= target:
                    break
                if ahead is not None:
                    proposal = ahead.result()
                else:
                    torch.set_num_threads(1)   # the sampler's small algebra; evaluation gets every core back
                    proposal = self.propose()
                    torch.set_num_threads(threads)
                ahead = pool.submit(self.propose) if pool and finished(self.opt) + 1 < target else None
                self.evaluate(*proposal)
        finally:
            if ahead is not None:   # a proposal nobody will evaluate (target reached, or interrupted)
                trial = ahead.result()[0]
                trial.set_user_attr("unused", "proposed ahead; the study ended before it was evaluated")
                self.opt.tell(trial, state=TrialState.FAIL)
            if pool:
                pool.shutdown()
            torch.set_num_threads(threads)
            self.heart.stop()


def summary(opt: optuna.Study) -> dict:
    """Counts of how the trials were proposed (fallbacks included) and of their states."""
    trials = opt.get_trials(deepcopy=False)
    return {"states": dict(Counter(t.state.name for t in trials)),
            "proposals": dict(Counter(t.user_attrs.get("proposal", "?") for t in trials
                                      if t.state in (TrialState.COMPLETE, TrialState.PRUNED)))}


def run(ws, comp, create: bool, trials: int | None = None, artifacts: str | None = ARTIFACT_DIR,
        prefetch: bool | None = None) -> optuna.Study:
    """Create or join the study and work until it has `trials` finished trials (all workers together).
    prefetch: propose the next trial while the current one evaluates (default: the study file's `prefetch`,
    whose `auto` means on a GPU only)."""
    study = ws.study
    cfg = study.search
    space = SearchSpace.from_study(study, ws.adapter, comp.budget)
    sampler = BudgetSampler(space, cfg.sampler, cfg.seed, cfg.startup, cfg.coarse_trials)
    opt, storage = open_optuna_study(study, space, create, sampler)
    target = trials or cfg.trials
    if prefetch is None:
        prefetch = cfg.prefetch is True or (cfg.prefetch == "auto" and
                                            next(ws.model.parameters()).device.type == "cuda")
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # bolaco prints one short line per trial
    done = finished(opt)
    log.info(f"study {opt.study_name} in {masked_url(study.storage)}: {space.dim} variables ({cfg.space}), objective "
             f"{cfg.objective}, {min(done, target)} of {target} trials finished, sampler {cfg.sampler}"
             + (", proposing ahead" if prefetch else ""))
    if done < target:
        worker = Worker(opt, space, sampler, Objective(ws, comp, space, artifacts), storage)
        worker.work(target, prefetch)
        s = summary(opt)
        log.info("proposals: " + ", ".join(f"{k} {v}" for k, v in sorted(s["proposals"].items())))
    return opt


def best_ranks(study: Study) -> tuple[RankMap, optuna.trial.FrozenTrial]:
    storage = open_storage(study.storage)
    name = study_name(study)
    try:
        opt = optuna.load_study(study_name=name, storage=storage)
        best = opt.best_trial
    except (KeyError, ValueError):
        raise BolacoError(f"study '{name}' in {masked_url(study.storage)} has no finished trial yet: "
                          "run `make study` first")
    return {k: int(v) for k, v in best.user_attrs["ranks"].items()}, best
