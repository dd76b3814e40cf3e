"""One line for each user-caused failure, secrets never shown, clamped settings reported (docs/reliability.md)."""

import socket

import pytest

from bolaco.cli import main
from bolaco.search import masked_url
from test_search import space_of, tiny_workspace

SECRET = "s3cret-pw"


def _study(tmp_path, text="name: e\n"):
    path = tmp_path / "e.yaml"
    path.write_text(text)
    return str(path)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bolaco: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_storage_that_cannot_be_created_is_one_line(tmp_path, capsys):
    assert main(["search", "--study", _study(tmp_path), "--storage", "sqlite:////proc/nope/x.db"]) == 2
    assert "cannot open the study storage sqlite:////proc/nope/x.db" in _one_line_error(capsys)


def test_a_storage_password_is_never_shown(tmp_path, capsys):
    url = f"postgresql+psycopg://bolaco:{SECRET}@127.0.0.1:1/nowhere"
    assert masked_url(url) == "postgresql+psycopg://bolaco:***@127.0.0.1:1/nowhere"
    for command in ("search", "dashboard"):
        assert main([command, "--study", _study(tmp_path), "--storage", url]) == 2
        err = _one_line_error(capsys)
        assert "cannot open the study storage postgresql+psycopg://bolaco:***@" in err and SECRET not in err


def test_the_dashboard_reports_a_bad_url_and_a_port_in_use_on_one_line(tmp_path, capsys):
    assert main(["dashboard", "--study", _study(tmp_path), "--storage", "nonsense://x"]) == 2
    assert "cannot open the study storage nonsense://x" in _one_line_error(capsys)
    from bolaco.search import open_storage
    open_storage(f"sqlite:///{tmp_path}/d.db")          # a study store that exists
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["dashboard", "--study", _study(tmp_path), "--storage", f"sqlite:///{tmp_path}/d.db",
                     "--port", str(port), "--artifact-dir", str(tmp_path / "a")]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in _one_line_error(capsys)


@pytest.mark.parametrize("text, where", [
    ("name: x\nbudget: {remove: 0.2\n", "line 3, column 1"),
    ("name: x\nsearch:\n  trials: 3\n   sampler: gp\n", "line 4, column 11"),
    ("name: [x\n", "line 2, column 1"),
])
def test_invalid_yaml_keeps_its_line_column_and_reason(tmp_path, capsys, text, where):
    assert main(["collect", "--study", _study(tmp_path, text)]) == 2
    err = _one_line_error(capsys)
    assert f"is not valid YAML: {where}: " in err and len(err.split(f"{where}: ")[1]) > 5


def test_a_clamped_group_count_is_reported(tmp_path, caplog):
    ws, comp = tiny_workspace(tmp_path, groups=1000)
    with caplog.at_level("WARNING", logger="bolaco"):
        space = space_of(ws, comp)
    assert "search.groups 1000 is more than the model's 4 blocks: using 4" in caplog.text
    assert len(space.names) == 4 * len(ws.adapter.types)


def test_set_overrides_any_setting_and_is_checked_like_the_file(tmp_path, capsys):
    from bolaco.study import load_study
    path = _study(tmp_path, "name: e\nbudget: {remove: 0.2}\nsearch: {trials: 5}\n")
    study = load_study(path, ["budget.remove=0.3", "search.sampler=tpe", "search.tie=[[q, k]]", "seq_len=64",
                              "data.calibration={corpus: c4-valid, sequences: 8}"])
    assert (study.budget.remove, study.search.sampler, study.search.tie, study.seq_len) == (0.3, "tpe", (("q", "k"),),
                                                                                            64)
    assert study.search.trials == 5 and study.data.calibration[0].corpus == "c4-valid"
    for bad, message in (("budget.typo=1", r"unknown key 'budget.typo' \(allowed there: remove\)"),
                         ("search.sampler=nope", "search.sampler: unknown sampler 'nope'; choose from random, "
                                                 "botorch, gp, tpe"),
                         ("budget.remove", "write section.key=value"),
                         ("finetune.ce=0", "finetune.distill is 0.0: .*finetune.ce is 0 too, so nothing would be "
                                           "trained: set one of them above 0"),
                         ("name.x=1", "'name' in study file .* is not a section")):
        assert main(["collect", "--study", path, "--set", bad]) == 2
        err = _one_line_error(capsys)
        assert __import__("re").search(message, err), (bad, err)


GOOD = ("name: e\nseq_len: 16\ndata:\n  calibration: {corpus: wikitext2-valid, start: 0, sequences: 4}\n"
        "  search: {corpus: wikitext2-valid, start: -2, sequences: 2}\n")


@pytest.mark.parametrize("case, args, message", [
    ("non-UTF-8 study file", ["collect", "--study", "{bad_bytes}"], "is not UTF-8 text"),
    ("unreadable study file", ["collect", "--study", "{unreadable}"], "cannot read study file"),
    ("a start that is no number", ["collect", "--study", "{study}", "--set",
                                   "data.calibration={corpus: c4-valid, start: abc}"],
     r"data.calibration\[0\].start is 'abc': input should be a valid integer"),
    ("sequences as a list", ["collect", "--study", "{study}", "--set",
                             "data.calibration={corpus: c4-valid, sequences: [1]}"],
     r"data.calibration\[0\].sequences is \[1\]"),
    ("model: null", ["collect", "--study", "{study}", "--set", "model=null"],
     "model is None: value error, give a path, a Hugging Face id"),
    ("a tie that is no list", ["search", "--study", "{study}", "--set", "search.tie=qk"], "search.tie is 'qk'"),
    ("negative trials", ["search", "--study", "{study}", "--trials", "-5"], "-5 must be at least 1"),
    ("zero trials", ["search", "--study", "{study}", "--trials", "0"], "0 must be at least 1"),
    ("a port out of range", ["dashboard", "--study", "{study}", "--port", "80000"], "80000 is not a port"),
    ("a non-numeric port in the storage URL", ["search", "--study", "{study}", "--storage",
                                               "postgresql+psycopg://u:{secret}@localhost:abc/db"],
     "cannot open the study storage postgresql"),
    ("a truncated GGUF", ["collect", "--study", "{study}", "--model", "{gguf}"], "could not load model"),
    ("a model folder holding only a pickle", ["collect", "--study", "{study}", "--model", "{pickle_dir}"],
     "could not load model"),
    ("a read-only cache folder", ["collect", "--study", "{study}", "--model", "{tiny}", "--cache-dir",
                                 "{readonly}/cache"], "Permission denied|Read-only"),
    ("a worker on a mistyped store", ["worker", "--study", "{study}", "--storage", "sqlite:///{tmp}/typo.db"],
     "no study store at"),
])
def test_every_bad_input_is_one_line(case, args, message, tmp_path, capsys, tokenizer, monkeypatch):
    import os
    from conftest import tiny_model
    paths = {"tmp": tmp_path, "study": _study(tmp_path, GOOD), "secret": SECRET}
    paths["bad_bytes"] = tmp_path / "latin.yaml"
    paths["bad_bytes"].write_bytes("name: caf\xe9\n".encode("latin-1"))
    paths["unreadable"] = tmp_path / "locked.yaml"
    paths["unreadable"].write_text(GOOD)
    paths["gguf"] = tmp_path / "cut.gguf"
    paths["gguf"].write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    paths["pickle_dir"] = tmp_path / "pickled"
    paths["pickle_dir"].mkdir()
    (paths["pickle_dir"] / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    if "{tiny}" in args:
        paths["tiny"] = tmp_path / "tiny"
        tiny_model("llama", vocab_size=len(tokenizer), layers=2).save_pretrained(paths["tiny"])
        tokenizer.save_pretrained(paths["tiny"])
    paths["readonly"] = tmp_path / "ro"
    paths["readonly"].mkdir()
    if os.geteuid() == 0 and case in ("unreadable study file", "a read-only cache folder"):
        pytest.skip("root reads and writes through file modes")
    paths["unreadable"].chmod(0)
    paths["readonly"].chmod(0o500)
    try:
        def fill(a):
            for k, v in paths.items():
                a = a.replace("{" + k + "}", str(v))
            return a
        code = main([fill(a) for a in args])
    finally:
        paths["readonly"].chmod(0o700)
    assert code == 2, case
    err = _one_line_error(capsys)
    assert __import__("re").search(message, err), (case, err)
    assert SECRET not in err


def test_a_failing_run_never_shows_the_storage_password(tmp_path, capsys, monkeypatch):
    """The password reaches bolaco through --set, --storage and $BOLACO_STORAGE; every output of a failing run
    (usage errors, validation errors of another --set, storage errors) is searched for it."""
    url = f"postgresql+psycopg://bolaco:{SECRET}@127.0.0.1:1/nowhere"
    runs = [["search", "--study", _study(tmp_path, GOOD), "--set", f"storage={url}", "--set", "budget.remove=7"],
            ["search", "--study", _study(tmp_path, GOOD), "--set", f"storage={url}"],
            ["search", "--study", _study(tmp_path, GOOD), "--storage", url, "--set", "search.sampler=x"],
            ["search", "--study", _study(tmp_path, GOOD), "--set", f"storage={url}", "--bogus"],
            ["search", "--study", _study(tmp_path, GOOD), "--set", f"storage{url}"]]
    for argv in runs:
        assert main(argv) == 2
        out = capsys.readouterr()
        assert SECRET not in out.out + out.err and out.err.startswith("bolaco: error:"), (argv, out.err)
    monkeypatch.setenv("BOLACO_STORAGE", url)
    assert main(["search", "--study", _study(tmp_path, GOOD)]) == 2
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and "bolaco:***@" in out.err


def test_ctrl_c_in_the_first_seconds_is_one_line(tmp_path):
    """The first seconds go to importing torch and transformers, whose C++ import code aborts or fails oddly when
    interrupted: a Ctrl-C there ends like any other, whenever it lands."""
    import signal
    import subprocess
    import sys
    import time
    for delay in (0.3, 0.6, 1.2):
        proc = subprocess.Popen([sys.executable, "-m", "bolaco", "collect", "--study", _study(tmp_path, GOOD)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err, (delay, err)
        assert err.strip().splitlines()[-1].startswith("bolaco: interrupted"), (delay, err)


def test_a_ctrl_c_python_had_to_drop_still_ends_the_command(monkeypatch, capsys):
    """A Ctrl-C that lands in a callback Python cannot raise from (an import lock's weakref callback, here a __del__)
    is printed as 'Exception ignored' and dropped; the command must still end with the one line, not work on."""
    import bolaco.cli

    class DiesOnCtrlC:
        def __del__(self):
            raise KeyboardInterrupt

    def long_command(args):
        import time
        DiesOnCtrlC()
        end = time.monotonic() + 30
        while time.monotonic() < end:     # a long stage: Python checks for signals between its steps
            pass
        raise AssertionError("the dropped Ctrl-C was not delivered in 30 s")

    monkeypatch.setattr(bolaco.cli, "cmd_families", long_command)
    assert main(["families"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("bolaco: interrupted")


def test_heat_maps_go_beside_the_study_store_not_into_the_working_directory(tmp_path, monkeypatch):
    ws, comp = tiny_workspace(tmp_path, sampler="random")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    monkeypatch.chdir(readonly)
    from bolaco import search
    search.run(ws, comp, create=True, trials=2)
    assert not list(readonly.iterdir())
    assert len([p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]) == 2


def test_version_module_entry_and_help_config():
    import subprocess
    import sys
    from bolaco import __version__
    out = subprocess.run([sys.executable, "-m", "bolaco", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"bolaco {__version__}"
    from bolaco.study import describe_config
    rows = {k: (d, h) for k, d, h in describe_config()}
    assert rows["budget.remove"][0] == "0.2" and "decomposable parameters" in rows["budget.remove"][1]
    assert rows["search.design"][0] == "[uniform]" and rows["name"][0] == "(required)"
    assert [k for k, (d, h) in rows.items() if not h] == []           # every key has its help
