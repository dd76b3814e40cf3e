"""The `bolaco` command: one subcommand per stage, each reading a study file; flags override the file.

This module imports only the standard library at the top: a Ctrl-C while torch is still importing ends in the
same one line as any other."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from ._version import __version__
from .errors import BolacoError, mask_secrets

log = logging.getLogger("bolaco")


def _study(args):
    from .study import load_study
    from .workspace import check_names
    study = load_study(args.study, args.set or [])
    # the storage URL may hold a password: $BOLACO_STORAGE keeps it off command lines (`ps` shows those to all)
    storage = args.storage or os.environ.get("BOLACO_STORAGE")
    changes = {k: v for k, v in {"model__path": args.model, "data__dir": args.data_dir, "cache_dir": args.cache_dir,
                                 "storage": storage}.items() if v is not None}
    study = study.override(**changes) if changes else study
    check_names(study)
    return study


def _workspace(args, study=None):
    from .workspace import Workspace
    return Workspace.open(study or _study(args), device=args.device)


def cmd_collect(args) -> None:
    ws = _workspace(args)
    t = time.perf_counter()
    cache = ws.covariances()
    print(f"covariance cache complete: {cache.store.root} ({time.perf_counter() - t:.0f} s)")


def cmd_compress(args) -> None:
    from .search import DESIGNS, SearchSpace
    study = _study(args)
    design = DESIGNS.get(args.design, "--design")
    ws = _workspace(args, study)
    comp = ws.compressor()
    space = SearchSpace.from_study(study, comp.decomposition)
    levels = space.levels(design(ws, comp, space))
    ws.export(comp, levels, args.out or f"out/{study.name}-{args.design}", {"allocation": f"design {args.design}"})


def cmd_speed(args) -> None:
    from . import model as model_io
    from .arch import adapter_for
    from .decompose import Decomposition
    from .evaluate.speed import time_types
    study = _study(args)
    model, _ = model_io.load(study.model.path, dtype=study.model.dtype)       # for the shapes only
    adapter = adapter_for(model)
    dec = study.decompose
    decomposition = Decomposition(adapter, dec.method, (), dec.rank_multiple)
    levels = decomposition.budget.uniform(study.budget.remove, study.search.dense)
    records = {r: {lid.split(".")[1]: (adapter.linears[lid].d_in, adapter.linears[lid].d_out, levels[lid])
                   for lid in lids if lid in levels} for r, lids in adapter.block_records(0).items()}
    device = args.device or "cpu"
    timings = time_types({r: s for r, s in records.items() if s}, args.batch_size, device,
                         model_io.torch_dtype(study.model.dtype))
    print(f"block 0 at the uniform allocation of {study.budget.remove:.0%} removed (per-matrix factors), batch "
          f"{args.batch_size}, one token per row, {device}; microseconds per step of the projections that read one "
          "input:")
    print(f"{'type':>8} {'rank':>6} {'all factorised':>15} {'this one dense':>15}  faster")
    for t in timings:
        print(f"{t.type:>8} {t.rank:>6} {t.factorised_us:>15.1f} {t.dense_us:>15.1f}  "
              f"{'dense' if t.keep_dense else 'factorised'}")
    dense = sorted(set(study.search.dense) | {t.type for t in timings if t.keep_dense}, key=adapter.types.index)
    if dense == sorted(study.search.dense, key=adapter.types.index):
        print("every searched type is at least as fast factorised: nothing to change")
    else:
        print(f"keep dense for serving at batch {args.batch_size} here (the budget goes to the other types): "
              f"--set 'search.dense=[{', '.join(dense)}]', or `dense: [{', '.join(dense)}]` in the study file")


def cmd_export(args) -> None:
    from .search import best_levels, load_optuna_study, select, study_name
    study = _study(args)
    refitted = None
    extra: dict[str, object]
    if args.levels:
        try:
            levels = {str(k): int(v) for k, v in json.loads(Path(args.levels).read_text()).items()}
        except (OSError, ValueError, AttributeError, UnicodeDecodeError) as exc:
            raise BolacoError(f"cannot read the level map {args.levels}: {exc}")
        extra = {"allocation": f"level map {args.levels}"}
        ws = _workspace(args, study)
        comp = ws.compressor()
    else:   # the best trial so far (workers may still be running), or the winner of the selection split
        levels, best = best_levels(study)
        ws = _workspace(args, study)
        comp = ws.compressor()
        extra = {"allocation": f"best trial {best.number} of study {study_name(study)}",
                 "search_ppl_at_search_time": best.search_ppl}
        if study.search.select_top:
            levels, refitted, selection = select(ws, comp, load_optuna_study(study), study.search.select_top)
            extra = {"allocation": f"trial {selection['trial']} of study {study_name(study)}, selected on "
                                   f"{len(selection['candidates'])} candidates", "selection": selection}
    ws.export(comp, levels, args.out or f"out/{study.name}", extra, refitted)


def _search(args, create: bool) -> None:
    from . import search
    study = _study(args)
    search.open_storage(study.storage, create=create)   # fail fast on a bad URL, before loading the model
    ws = _workspace(args, study)
    opt = search.run(ws, ws.compressor(), create=create, trials=args.trials)
    ranked = search.ranked_trials(opt)
    if ranked:
        best = ranked[0]
        print(f"best trial {best.number}: search ppl {best.search_ppl:.3f} (objective {study.search.objective} "
              f"{best.value:.4f}), removed {best.removed:.2%} of the decomposable parameters")


def cmd_search(args) -> None:
    _search(args, create=True)


def cmd_worker(args) -> None:
    _search(args, create=False)


def cmd_surgical(args) -> None:
    from .search import surgical
    study = _study(args)
    ws = _workspace(args, study)
    comp = ws.compressor()
    t = time.perf_counter()
    levels, summary = surgical.run(ws, comp)
    summary["seconds"] = round(time.perf_counter() - t, 1)
    print(f"surgical: {summary['evaluations']} evaluations, {summary['seconds']:.0f} s, removed "
          f"{summary['removed']:.2%} of the decomposable parameters"
          + ("" if summary["reached_budget"] else f" (the metric forbids more; budget was {study.budget.remove:.0%})"))
    ws.export(comp, levels, args.out or f"out/{study.name}-surgical",
              {"allocation": "surgical (SFSD)", "surgical": summary})


def cmd_dashboard(args) -> None:
    # served from this process: the storage URL (and its password) never appears on a command line `ps` shows
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi
    from .search import artifact_dir, masked_url, open_storage

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *_args):   # no line per HTTP request
            pass

    study = _study(args)
    storage = open_storage(study.storage, create=False)
    artifacts = Path(args.artifact_dir) if args.artifact_dir else artifact_dir(study)
    artifacts.mkdir(parents=True, exist_ok=True)
    app = wsgi(storage, artifact_store=FileSystemArtifactStore(str(artifacts)))
    try:
        server = make_server(args.host, args.port, app, handler_class=QuietHandler)
    except OSError as exc:
        raise BolacoError(f"the dashboard cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): "
                          "choose another port with --port (make dashboard PORT=...)")
    print(f"optuna-dashboard for {masked_url(study.storage)} on http://{args.host}:{args.port} (Ctrl-C stops it)",
          flush=True)
    with server:
        server.serve_forever()


def cmd_finetune(args) -> None:
    from .commands.finetune import finetune
    study = _study(args)
    finetune(study, Path(args.source or f"out/{study.name}"), args.out, args.device)


def cmd_eval(args) -> None:
    from .commands.evaluate import evaluate_model
    evaluate_model(args)


def cmd_report(args) -> None:
    from . import model as model_io
    from .arch import adapter_for
    from .decompose import Decomposition
    from .report import build
    from .study import load_study
    study = _study(args)
    compare = [load_study(p) for p in args.compare]
    model, _ = model_io.load(study.model.path)       # for the layer shapes the budget counts
    dec = study.decompose
    decomposition = Decomposition(adapter_for(model), dec.method, dec.modules, dec.rank_multiple)
    path = build(study, decomposition, args.out or f"out/{study.name}-report", compare)
    print(f"wrote {path} and its pictures")


def cmd_plan(args) -> None:
    import torch
    from .plan import check, plan
    study = _study(args)
    device = torch.device(args.device or "cpu")
    p = plan(study, device=str(device))
    print(p.table())
    check(p, device)


def cmd_config(args) -> None:
    from .study import describe_config
    rows = describe_config()
    width = max(len(k) for k, _, _ in rows)
    for key, default, text in rows:
        print(f"{key:<{width}}  {default:<14}  {text}")


def cmd_families(args) -> None:
    from .arch import ADAPTERS
    for a in ADAPTERS:
        print(f"{a.name}\n  model_type: {', '.join(a.model_types)}\n  compressed: {', '.join(a.paths)}"
              + (f"\n  structured modules: {', '.join(a.modules)}" if a.modules else "")
              + (f"\n  dense: {a.dense_note}" if a.dense_note else ""))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1 to 65535)")
    return value


def _add_verbosity(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug messages of bolaco")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="warnings and errors only: no progress bars, no per-trial lines")


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as bolaco's: one line that says what to do, exit 2."""

    def error(self, message: str):
        print(f"bolaco: error: {self.prog}: {mask_secrets(message)} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _study_arguments(s: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every command that runs a study file takes."""
    s.add_argument("--study", required=True, help="study file (YAML) in studies/")
    s.add_argument("--model", help="override the study's model (HF id, directory, .gguf file or 'default')")
    s.add_argument("--data-dir", help="folder with the corpora that are not shipped (default ../shared/data)")
    s.add_argument("--cache-dir", help="override the cache folder (default storage/cache)")
    s.add_argument("--storage", help="override the study storage URL (e.g. postgresql+psycopg://...); "
                                     "or set $BOLACO_STORAGE, which keeps a password off the command line")
    s.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override any study-file setting, checked like the file, e.g. --set budget.remove=0.3 "
                        "--set search.sampler=tpe --set finetune.steps=200 (repeatable; `bolaco config` lists "
                        "every key)")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bolaco", description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    p.add_argument("--version", action="version", version=f"bolaco {__version__}")
    _add_verbosity(p, False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, help_, func):
        s = sub.add_parser(name, help=help_)
        _add_verbosity(s, argparse.SUPPRESS)     # -v / -q also after the subcommand
        s.set_defaults(func=func)
        return s

    def study_command(name, help_, func):
        return _study_arguments(command(name, help_, func))

    study_command("collect", "collect pooled covariances of every decomposable linear (cached, resumable)",
                  cmd_collect)
    c = study_command("compress", "compress with a designed allocation (no search) at the study's budget and export "
                                  "it", cmd_compress)
    c.add_argument("--design", default="uniform", help="uniform (the same keep ratio for every unit), importance "
                                                       "(MoDeGPT's per-block rule) or sensitivity")
    c.add_argument("--out", help="output folder (default out/<study>-<design>)")
    v = study_command("speed", "time each projection type dense vs factorised at a serving batch size on this "
                               "device, and name the types to keep dense (search.dense)", cmd_speed)
    v.add_argument("--batch-size", type=_positive, default=1, help="rows per decoding step when serving (default 1)")
    x = study_command("export", "write the compressed model of the study's best (or selected) trial, or of a level "
                                "map", cmd_export)
    x.add_argument("--levels", help="JSON file with a level map {\"block.unit\": level} instead of the best trial")
    x.add_argument("--out", help="output folder (default out/<study>)")
    for name, func, help_ in (("search", cmd_search, "create or resume the BO study and run its trials"),
                              ("worker", cmd_worker, "join an existing study (any machine) and run trials")):
        w = study_command(name, help_, func)
        w.add_argument("--trials", type=_positive, help="total finished trials to reach (default: the study file's)")
    g = study_command("surgical", "SFSD greedy search (search perplexity or a zero-shot task's accuracy), then export",
                      cmd_surgical)
    g.add_argument("--out", help="output folder (default out/<study>-surgical)")
    f = study_command("finetune", "post-train an exported model inside its compressed layers and merge it",
                      cmd_finetune)
    f.add_argument("--from", dest="source", help="exported model folder (default out/<study>, see make export)")
    f.add_argument("--out", help="output folder (default <from>-ft-<variant>)")
    d = study_command("dashboard", "optuna-dashboard on the study storage", cmd_dashboard)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=_port, default=8080)
    d.add_argument("--artifact-dir", help="trial heat maps (default: beside the study storage or the cache)")
    r = study_command("report", "Markdown report with pictures: search curves, allocation heat map, evaluation tables",
                      cmd_report)
    r.add_argument("--compare", nargs="*", default=[], help="other study files to draw next to this one")
    r.add_argument("--out", help="output folder (default out/<study>-report)")
    study_command("plan", "what the study will cost on this machine (disk, memory, time per stage), from the "
                               "model's configuration alone and a few seconds of measurement", cmd_plan)
    from_eval = command("eval", "evaluation suite: perplexity, zero-shot tasks (lm-eval), StereoSet; everything "
                                "unless --ppl/--tasks/--stereoset pick some", cmd_eval)
    _eval_arguments(from_eval)
    command("config", "every key of a study file with its default and help", cmd_config)
    command("families", "the model families bolaco compresses, and which projections in each", cmd_families)
    return p


def _eval_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--model", default="default",
                   help="HF id, model directory, exported bolaco directory, .gguf file or 'default'")
    e.add_argument("--ppl", action="store_true", help="perplexity on --corpus")
    e.add_argument("--tasks", nargs="*", help="zero-shot tasks through lm-eval (no names: bolaco's seven, read "
                                              "from the data directory; any other lm-eval task name runs from "
                                              "lm-eval's own registry)")
    e.add_argument("--num-fewshot", type=int, help="few-shot examples per task (lm-eval's num_fewshot)")
    e.add_argument("--stereoset", action="store_true", help="StereoSet LMS / SS / ICAT")
    e.add_argument("--corpus", nargs="+", help="perplexity corpora (default wikitext2-test ptb-test c4-valid)")
    e.add_argument("--seq-len", type=_positive, default=256)
    e.add_argument("--sequences", type=_positive, default=64, help="perplexity on the first N sequences of each")
    e.add_argument("--limit", type=_positive, default=200, help="rows per zero-shot task")
    e.add_argument("--stereoset-limit", type=_positive, default=1000, help="first N StereoSet examples")
    e.add_argument("--full", action="store_true", help="whole corpora, every task row, all of StereoSet")
    e.add_argument("--batch-size", type=_positive, default=8)
    e.add_argument("--dtype", help="float32, bfloat16 or float16 (default: an export's stored dtype, else float32)")
    e.add_argument("--device-map", help="'auto' spreads the model over the GPUs of a node (accelerate)")
    e.add_argument("--data-dir", help="folder with PTB, C4, the tasks and StereoSet (default ../shared/data)")
    e.add_argument("--cache-dir", help="keep tokenized corpora here (e.g. a study's storage/cache)")
    e.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    e.add_argument("--results", help="results JSON (default: next to the model, or storage/eval/)")
    e.add_argument("--force", action="store_true", help="recompute results that are cached")
    e.add_argument("--json", action="store_true", help="also print the results as JSON")


EXIT_CODES = "exit codes: 0 done, 2 a usage or input error (one line says what to do), 130 interrupted (Ctrl-C)"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests swap it between calls of main)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


_HANDLER = _StderrHandler()


def _configure_output(verbose: bool, quiet: bool) -> contextlib.AbstractContextManager:
    """bolaco's library modules log; the command shows them. -q: warnings only, no progress bars, Optuna quiet;
    -v: bolaco's debug lines too. Returns the scope of the progress-bar setting (one command, not the process:
    tests and notebooks call `main` many times)."""
    if _HANDLER not in log.handlers:
        _HANDLER.setFormatter(logging.Formatter("bolaco: %(message)s"))
        log.addHandler(_HANDLER)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for name in ("optuna", "transformers", "lm-eval", "lm_eval", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.WARNING)
    return _no_progress_bars() if quiet else contextlib.nullcontext()


@contextlib.contextmanager
def _no_progress_bars():
    """-q: every progress bar off while the command runs, bolaco's, transformers' and the hub's (tqdm reads its
    TQDM_DISABLE variable once, at import, so the variable cannot do it)."""
    import tqdm.std
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging
    init = tqdm.std.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)
    tqdm.std.tqdm.__init__ = quiet_init    # type: ignore[method-assign]
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = init      # type: ignore[method-assign]
        hf_logging.enable_progress_bar()
        enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:       # --help, --version, or a usage error already printed on one line
            return int(exc.code or 0)
        if _import_deferring_ctrl_c():
            raise KeyboardInterrupt
        if getattr(args, "device", "unset") is None:
            import torch
            args.device = "cuda" if torch.cuda.is_available() else None
        with _configure_output(getattr(args, "verbose", False), getattr(args, "quiet", False)), \
                _ctrl_c_never_dropped():
            args.func(args)
    except BolacoError as exc:
        print(f"bolaco: error: {mask_secrets(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:    # the machine refused: a read-only folder, a full disk, a missing or unreadable file
        where = f" {exc.filename}" if exc.filename else ""
        print(f"bolaco: error: {exc.strerror or exc}:{where} (check the path's permissions and free space)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bolaco: interrupted; finished work is cached and resumes on the next run", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _after_ctrl_c(exc):
            raise
        # a Ctrl-C inside an import (torch's take seconds) can surface as the importer's own error
        print("bolaco: interrupted; finished work is cached and resumes on the next run", file=sys.stderr)
        return 130
    return 0


def _import_deferring_ctrl_c() -> bool:
    """Import torch and transformers (seconds) with Ctrl-C held back until they are in: an interrupt inside their
    C++ import code aborts the process or surfaces as an unrelated import error. True if Ctrl-C came meanwhile."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return False
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(1))
    try:
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        import transformers.models.auto.modeling_auto  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    return bool(pressed)


@contextlib.contextmanager
def _ctrl_c_never_dropped():
    """Python cannot raise from some callbacks (weakref callbacks such as an import lock's or a WeakKeyDictionary's,
    a __del__): a Ctrl-C landing in one is printed as 'Exception ignored' and dropped, and a 500-trial search went
    on for minutes. Deliver it again a moment later from another thread (raised at once, it would be dropped inside
    this hook too)."""
    import _thread
    import threading
    previous, timers = sys.unraisablehook, []

    def hook(unraisable):
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            return previous(unraisable)
        timer = threading.Timer(0.05, _thread.interrupt_main)
        timer.daemon = True
        timer.start()
        timers.append(timer)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        for timer in timers:
            timer.cancel()


def _after_ctrl_c(exc: BaseException | None, seen: frozenset = frozenset()) -> bool:
    """Whether a KeyboardInterrupt is among the causes of `exc` (transformers' lazy imports wrap it)."""
    if exc is None or id(exc) in seen:
        return False
    return isinstance(exc, KeyboardInterrupt) or any(
        _after_ctrl_c(e, seen | {id(exc)}) for e in (exc.__cause__, exc.__context__))


def run() -> None:
    """The `bolaco` command (and `python -m bolaco`). After a Ctrl-C the process ends at once with code 130:
    libraries that were interrupted while importing can otherwise re-raise the signal at interpreter exit."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)
