"""btrm.errors: one line per expected error, printed once, logged, exit status 2; everything else untouched."""

import json

import pytest

from btrm import errors
from btrm.schema import PreflightError


def test_error_line_says_where_a_foreign_error_came_from():
    assert errors.error_line(PreflightError("x=1: expected\n  more")) == "error: x=1: expected more"
    try:
        json.loads("{")
    except ValueError as error:
        line = errors.error_line(error)
    assert (
        line.startswith("error: Expecting property name")
        and "(JSONDecodeError in decoder.py:" in line
        and "BT_DEBUG=1" in line
    )


def test_an_expected_error_on_rank_0_is_one_line_logged_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    run_log: list[str] = []
    reported = errors.errors_reported_once((ValueError,), log_dir=lambda: str(tmp_path), run_log=run_log.append)
    with pytest.raises(SystemExit) as exit_status, reported:
        raise PreflightError("data.max_length=0: expected an integer >= 2")
    line = "error: data.max_length=0: expected an integer >= 2"
    assert exit_status.value.code == errors.EXIT_REPORTED == 2
    err = capsys.readouterr().err  # one line, no traceback (raised here, outside the project: it says where)
    assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err
    logged = (tmp_path / "errors.log").read_text()
    assert logged.count("\n") == 1 and logged.rstrip().endswith(err.rstrip()) and run_log == [err.rstrip()]
    assert json.loads((tmp_path / "error.json").read_text())["message"] == err.rstrip()  # for the launcher


def test_an_unexpected_error_keeps_its_traceback(tmp_path):
    with pytest.raises(KeyError), errors.errors_reported_once((ValueError,), log_dir=lambda: str(tmp_path)):
        raise KeyError("a bug")
    assert not (tmp_path / "errors.log").exists()
