"""What a study will cost on this machine, before any work (`bolaco plan`; docs/design.md, "Planning").

From the model's configuration alone (a skeleton on the meta device: no weight is read) the plan knows every
shape: parameters, the covariance cache and the bases on disk, the memory each stage holds. Times come from a few
seconds of measurement on the execution device: bolaco's own collect, bases, apply and evaluation code run on a
one-block model of the same width with random weights, scaled by depth and by the study's token counts. A stage
that cannot fit (disk, host or device memory) is refused in one line before anything starts.

Memory per stage = the model's weights + what the stage adds; every addition except the search's bases is
per block or per batch, so it does not grow with depth (block streaming, docs/design.md "Collect")."""

from __future__ import annotations

import copy
import itertools
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from . import model as model_io
from .arch import adapter_for
from .calibrate import cache_bytes, check_disk, collect
from .decompose import Compressor, Decomposition, build_bases, refit
from .errors import BolacoError
from .evaluate.perplexity import kl_terms, perplexity
from .search import OBJECTIVES
from .study import Study

GB = 1e9
READ = 200e6        # bytes per second assumed for reading weights and bases from disk
GGUF = 7e6          # parameters per second transformers de-quantises a GGUF file at (SmolLM2-135M: 20 s on 2 cores)


@dataclass
class Stage:
    name: str
    seconds: float
    host: float            # peak bytes of host memory (weights included when the model lives there)
    device: float = 0.0    # peak bytes of accelerator memory
    disk: float = 0.0      # bytes the stage leaves on disk
    note: str = ""


@dataclass
class Plan:
    study: str
    model: str
    device: str
    params: int
    blocks: int
    stages: list[Stage] = field(default_factory=list)
    trial_seconds: float = 0.0     # one search trial: apply + evaluation of the search split
    refit_seconds: float = 0.0     # one closed-loop refit of a level map (0 when the study does not refit)
    job: tuple[str, ...] = ("load", "collect", "bases", "search", "export")   # `make study && make export`

    @property
    def job_seconds(self) -> float:
        return sum(s.seconds for s in self.stages if s.name in self.job)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def table(self) -> str:
        rows = [f"plan for study '{self.study}': {self.model}, {self.params / 1e9:.2f} B parameters, {self.blocks} "
                f"blocks, on {self.device}",
                f"{'stage':<10} {'minutes':>8} {'host GB':>8} {'device GB':>9} {'disk GB':>8}  what"]
        for s in self.stages:
            rows.append(f"{s.name:<10} {s.seconds / 60:>8.1f} {s.host / GB:>8.2f} {s.device / GB:>9.2f} "
                        f"{s.disk / GB:>8.2f}  {s.note}")
        rows.append(f"the default job ({' + '.join(self.job)}): about {self.job_seconds / 60:.0f} minutes; "
                    "memory is the peak of each stage, weights included")
        return "\n".join(rows)


def skeleton(study: Study) -> torch.nn.Module:
    """The study's model with every tensor on the meta device: shapes without weights."""
    src = model_io.resolve(study.model.path)
    try:
        config = AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file)
    except Exception as exc:   # transformers and gguf raise many types for a file they cannot read
        raise BolacoError(f"could not read the configuration of '{src.label}': {str(exc).splitlines()[0][:300]}") \
            from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=model_io.torch_dtype(study.model.dtype))


def _one_block(config, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A random-init model of the study's width with one block and a token vocabulary of 1,024 (the real
    output layer is timed apart)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers, config.vocab_size = 1, 1024
    for key in ("layer_types", "mlp_only_layers"):          # per-layer lists follow the depth
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, getattr(config, key)[:1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():      # small weights: finite activations
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


@dataclass
class BlockCosts:
    """Measured on the one-block model: seconds per calibration token of one block and per block (files, set-up)
    for collect and refit, seconds per evaluated token of one block (dense, and compressed to the study's budget:
    a trial evaluates the compressed model), seconds per block for bases and apply, seconds per token of the real
    output layer."""
    collect_token: float
    collect_block: float
    bases_block: float
    apply_block: float
    eval_token: float
    head_token: float
    refit_token: float = 0.0
    refit_block: float = 0.0
    bases_bytes: float = 0.0        # measured peak the bases of one block add (0: the formula of added_memory)
    refit_bytes: float = 0.0        # measured peak a refit adds: fixed part (the block's solves) ...
    refit_token_bytes: float = 0.0  # ... and per calibration token (the streams and the records' inputs)
    collect_bytes: float = 0.0      # measured peak collect adds: fixed (the block's sums; 0: the formula) ...
    collect_token_bytes: float = 0.0   # ... and per calibration token (the hidden states)
    trial_token: float = 0.0        # evaluation per token of one block at the study's budget (0: eval_token)
    kl_token: float = 0.0           # per token, the KL to the dense log-probs that a KL objective adds

    def collect(self, tokens: int, blocks: int) -> float:
        return blocks * (self.collect_block + self.collect_token * tokens)

    def refit(self, tokens: int, blocks: int) -> float:
        return blocks * (self.refit_block + self.refit_token * tokens)


def _line(costs: list[float], tokens: list[int]) -> tuple[float, float]:
    """(cost per token, fixed cost) through two runs of `tokens` (seconds or bytes); neither below zero."""
    slope = max(costs[1] - costs[0], 0.0) / (tokens[1] - tokens[0])
    return slope, max(costs[0] - slope * tokens[0], 0.0)


def _time_line(seconds: list[float], tokens: list[int]) -> tuple[float, float]:
    """`_line` of times; when noise makes the larger run no slower, all of its time counts per token (an
    estimate on the high side: the work grows with the tokens, and a zero slope would plan no time for them)."""
    return (seconds[1] / tokens[1], 0.0) if seconds[1] <= seconds[0] else _line(seconds, tokens)


def _repeated(fn, device: torch.device, within: float = 2.0, most: int = 5) -> list[tuple[float, float]]:
    """`_measured` of `fn` called at least twice (the first also warms kernels and caches up) and again while
    the calls so far took under `within` seconds, at most `most` times: short runs are noisy on a busy CPU."""
    out = [_measured(fn, device) for _ in range(2)]
    while len(out) < most and sum(t for t, _ in out) < within:
        out.append(_measured(fn, device))
    return out


def _fastest(fn, device: torch.device) -> float:
    return min(t for t, _ in _repeated(fn, device))


def measure(study: Study, config, device: torch.device) -> BlockCosts:
    """Per-token costs are slopes between runs of one and three batches, each of the size the stage uses
    (collect.batch_size for collect and the refit, evaluate.batch_size for evaluations), so the fixed costs of a run
    (files, fingerprints, set-up) do not pass for per-token costs; they are counted per block (the scale bench
    found collect's files and the refit's solves to be most of the time at 1 B width)."""
    dtype = model_io.torch_dtype(study.model.dtype)
    model = _one_block(config, dtype, device)
    sequences, batch = study.collect.batch_size, study.evaluate.batch_size
    runs, eval_runs = ([torch.randint(0, 1024, (k * n, study.seq_len), generator=torch.Generator().manual_seed(k))
                        for k in (1, 3)] for n in (sequences, batch))
    evaluate = lambda ids: lambda: perplexity(model, ids, batch, progress=False)    # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="bolaco-plan-"))
    folders = (root / str(i) for i in itertools.count())
    try:
        collect_s: list[float] = []
        collect_peak: list[float] = []
        for ids in runs:
            calls = _repeated(lambda: collect(model, ids, next(folders), batch_size=sequences, progress=False,
                                              device=device), device)
            collect_s.append(min(t for t, _ in calls))
            collect_peak.append(max(b for _, b in calls))
        eval_s = [_fastest(evaluate(ids), device) for ids in eval_runs]
        cov = collect(model, runs[-1], next(folders), batch_size=sequences, progress=False, device=device)
        dec = study.decompose
        decomposition = Decomposition(adapter_for(model), dec.method, dec.modules, dec.rank_multiple)
        # the first call builds (later ones read the cache): its time and its memory
        bases_s, bases_bytes = _measured(lambda: build_bases(decomposition, cov, progress=False, device=device), device)
        comp = Compressor(decomposition, build_bases(decomposition, cov, progress=False, device=device))
        comp.bases.load(device)
        budget = decomposition.budget
        levels = budget.fit({u: 1 - study.budget.remove for u in budget.units}, budget.target(study.budget.remove))
        apply_s = _fastest(lambda: comp.apply(levels), device)
        trial_s = [_fastest(evaluate(ids), device) for ids in eval_runs]
        comp.restore()
        run_refit = lambda ids: refit(comp, levels, ids, batch_size=sequences, progress=False,  # noqa: E731
                                      device=device, holdout=0)
        refit_s: list[float] = []
        refit_peak: list[float] = []
        for k, ids in enumerate(runs):     # the small run twice: its first call warms up
            both = [_measured(lambda: run_refit(ids), device) for _ in range(2 if k == 0 else 1)]
            refit_s.append(min(t for t, _ in both))
            refit_peak.append(max(b for _, b in both))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tokens, eval_tokens = ([r.numel() for r in rs] for rs in (runs, eval_runs))
    hidden, vocab = config.hidden_size, config.vocab_size
    chunk = min(vocab, 8192)
    h = torch.randn(tokens[0], hidden, dtype=dtype, device=device)
    w = torch.randn(chunk, hidden, dtype=dtype, device=device)
    target = torch.randint(0, chunk, (tokens[0],), device=device)
    head_s = _fastest(lambda: F.cross_entropy(F.linear(h, w).float(), target), device) * vocab / chunk
    logits = F.linear(h, w).float()
    ref = torch.log_softmax(logits, -1)
    kl_s = _fastest(lambda: kl_terms(logits, ref), device) * vocab / chunk
    collect_token, collect_block = _time_line(collect_s, tokens)
    refit_token, refit_block = _time_line(refit_s, tokens)
    refit_token_bytes, refit_bytes = _line(refit_peak, tokens)
    collect_token_bytes, collect_bytes = _line(collect_peak, tokens)
    return BlockCosts(collect_token, collect_block, bases_s, apply_s, _time_line(eval_s, eval_tokens)[0],
                      head_s / tokens[0], refit_token, refit_block, bases_bytes, refit_bytes, refit_token_bytes,
                      collect_bytes, collect_token_bytes, trial_token=_time_line(trial_s, eval_tokens)[0],
                      kl_token=kl_s / tokens[0])


def reset_peak(device: torch.device) -> None:
    """Start a new peak: this process's VmHWM (Linux; elsewhere the peak since start stays) and the device's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _status_bytes(key: str) -> float | None:
    """A memory figure of /proc/self/status (Linux) in bytes; None elsewhere."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return float(status[key].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def peak(device: torch.device) -> tuple[float, float]:
    """(peak host bytes of this process since reset_peak, peak device bytes)."""
    host = _status_bytes("VmHWM")
    if host is None:
        host = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return host, float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0


def _measured(fn, device: torch.device) -> tuple[float, float]:
    """(seconds, bytes `fn` adds at its peak on the execution device: host memory on a CPU) of one call."""
    before = float(torch.cuda.memory_allocated(device)) if device.type == "cuda" else resident()
    reset_peak(device)
    seconds = _seconds(fn, device)
    host, dev = peak(device)
    return seconds, max((dev if device.type == "cuda" else host) - before, 0.0)


def resident() -> float:
    """Bytes of host memory this process holds now."""
    return _status_bytes("VmRSS") or 0.0


def available_host() -> float:
    """Bytes of host memory available now (free pages plus reclaimable cache, as `free` counts them)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return float(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def added_memory(study: Study, adapter, config, calib_tokens: int, bases: float,
                 costs: BlockCosts) -> dict[str, float]:
    """Bytes each stage holds beside the weights: the calibration hidden states (in and out of the block in hand)
    and the float64 sums of collect (measured on one block, per token and fixed; or counted); the work of one
    block's bases (measured, or four float64 matrices of the widest record); the bases and one batch's activations
    and float32 logits (with their log-softmax) in search and export, and in export the refit's work (measured on
    one block, per calibration token and fixed)."""
    act = torch.finfo(model_io.torch_dtype(study.model.dtype)).bits // 8
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    batch = study.evaluate.batch_size * study.seq_len
    batch_bytes = batch * (4 * inter + 8 * hidden) * 4 + batch * config.vocab_size * 4 * 2
    accumulators = sum(2 * adapter.record_dim(r) ** 2 * 8 for r in adapter.record_names)
    widest = max(adapter.record_dim(r) for r in adapter.record_names)
    refit = costs.refit_bytes + costs.refit_token_bytes * calib_tokens if study.decompose.refit else 0.0
    collect = costs.collect_bytes + costs.collect_token_bytes * calib_tokens if costs.collect_bytes else \
        2 * calib_tokens * hidden * act + accumulators + batch_bytes
    return {"collect": collect,
            "bases": costs.bases_bytes or 4 * widest ** 2 * 8, "search": bases + batch_bytes,
            "export": bases + max(batch_bytes, refit), "finetune": 3 * batch_bytes}


def plan(study: Study, device: str = "cpu", costs: BlockCosts | None = None, process: float | None = None) -> Plan:
    """The plan of `study` on `device`; `costs` skips the measurement (tests, or a plan for another machine);
    `process`: the bytes of the interpreter and its libraries (default: what this process holds now)."""
    process = resident() if process is None else process
    meta = skeleton(study)
    config = meta.config
    adapter = adapter_for(meta)
    dec = study.decompose
    decomposition = Decomposition(adapter, dec.method, dec.modules, dec.rank_multiple)
    dev = torch.device(device)
    cache = float(cache_bytes(adapter, study.collect.partitions))
    bases = float(sum(m.prepared_bytes() for m in decomposition.methods))
    check_disk(Path(study.cache_dir), int(cache + bases), "cache (covariances and bases)")   # before measuring
    costs = costs or measure(study, config, dev)
    dtype = model_io.torch_dtype(study.model.dtype)
    act = torch.finfo(dtype).bits // 8
    params = sum(p.numel() for p in meta.parameters())
    weights = float(params * act)
    n = adapter.n_blocks
    roles = {r: sum(s.sequences or 0 for s in spec) * study.seq_len for r, spec in study.data.roles().items()}
    calib, search_tok, select_tok, test_tok = (roles.get(r, 0) for r in ("calibration", "search", "selection", "test"))
    extra = added_memory(study, adapter, config, calib, bases, costs)
    on_gpu = dev.type == "cuda"

    def place(extra: float) -> tuple[float, float]:
        """(host, device) peaks of a stage that adds `extra` bytes beside the weights."""
        return (process, weights + extra) if on_gpu else (process + weights + extra, 0.0)

    eval_s = lambda tok, block=costs.eval_token: tok * (block * n + costs.head_token)    # noqa: E731
    compressed_s = lambda tok: eval_s(tok, costs.trial_token or costs.eval_token)      # noqa: E731
    # dense evaluations beside the trials: the sensitivity design's reference and one pass per unit type, and the
    # dense log-probs of a KL objective
    reference = OBJECTIVES.get(study.search.objective, "search.objective").reference
    dense_passes = ("sensitivity" in study.search.design) * (1 + len({u.type for u in decomposition.units.values()}))
    trial_s = costs.apply_block * n + compressed_s(search_tok) + reference * costs.kl_token * search_tok
    kept = params - decomposition.budget.decomposable * study.budget.remove
    src = model_io.resolve(study.model.path)
    load_s = params / GGUF if src.gguf_file else weights / READ
    p = Plan(study.name, src.label, str(dev), params, n)
    p.trial_seconds = trial_s
    p.stages.append(Stage("load", load_s, process + weights, weights if on_gpu else 0.0,
                          note="de-quantise the GGUF weights" if src.gguf_file else
                          "read the weights (at about 200 MB/s)"))
    p.stages.append(Stage("collect", costs.collect(calib, n), *place(extra["collect"]), disk=cache,
                          note=f"{calib:,} calibration tokens, hidden states of the block in hand"))
    p.stages.append(Stage("bases", costs.bases_block * n, *place(extra["bases"]), disk=bases,
                          note="per-block eigen/Cholesky work in float64"))
    p.stages.append(Stage("search", bases / READ + trial_s * study.search.trials
                          + (dense_passes + reference) * eval_s(search_tok), *place(extra["search"]),
                          note=f"{study.search.trials} trials of {trial_s:.1f} s ({search_tok:,} tokens each); "
                               "bases read into memory"))
    # selection measures the best few open-loop and, when the study refits, refitted (the winner's refit is cached)
    p.refit_seconds = costs.refit(calib, n) if dec.refit else 0.0
    candidate = costs.apply_block * n + compressed_s(select_tok) + reference * costs.kl_token * select_tok
    # its own load of the model, the selection, the winner's search and test perplexity, the bases and the writes
    p.stages.append(Stage("export", load_s + study.search.select_top * ((1 + dec.refit) * candidate + p.refit_seconds)
                          + reference * eval_s(select_tok) + compressed_s(search_tok + test_tok)
                          + (bases + kept * act) / READ, *place(extra["export"]), disk=kept * act,
                          note=f"best {study.search.select_top} measured on {select_tok:,} selection tokens"
                               + (", closed-loop refit" if dec.refit else "") + ", then search and test perplexity"))
    if study.data.train is not None:
        ft = study.finetune
        tokens = ft.steps * ft.batch_size * study.seq_len
        p.stages.append(Stage("finetune", 3 * eval_s(tokens), *place(weights + extra["finetune"]),
                              note=f"optional (make finetune): {tokens:,} tokens, teacher included"))
    return p


def check(p: Plan, device: torch.device) -> None:
    """Refuse in one line what cannot fit in memory (the disk is checked before the measurement)."""
    host = max(s.host for s in p.stages if s.name in p.job)
    if device.type != "cuda" and host > available_host():
        raise BolacoError(f"the job needs {host / GB:.1f} GB of memory at its peak but {available_host() / GB:.1f} GB "
                          "are available: use a GPU (--device cuda), model.dtype bfloat16, or a smaller "
                          "evaluate.batch_size")
    if device.type == "cuda":
        free_dev = torch.cuda.mem_get_info(device)[0]
        peak = max(s.device for s in p.stages if s.name in p.job)
        if peak > free_dev:
            raise BolacoError(f"the job needs {peak / GB:.1f} GB of GPU memory but {free_dev / GB:.1f} GB are free: "
                              "set model.device_map: auto to spread it, or model.dtype bfloat16")
