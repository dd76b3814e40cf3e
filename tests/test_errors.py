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
                         ("name.x=1", "'name' in study file .* is not a section")):
        assert main(["collect", "--study", path, "--set", bad]) == 2
        err = _one_line_error(capsys)
        assert __import__("re").search(message, err), (bad, err)
