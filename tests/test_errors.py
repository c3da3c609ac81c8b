"""One error hierarchy: what a user can fix is a StudyError, printed as one line; nothing else is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from study import errors
from study.cli import main
from study.tasks import map_in_process

PACKAGE = Path(__file__).resolve().parents[1] / "study"


def test_every_error_class_lives_in_one_module_and_derives_from_the_base():
    elsewhere = [
        f"{path.relative_to(PACKAGE.parent)}:{node.name}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "errors.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases)
    ]
    assert not elsewhere, f"define these in study/errors.py: {elsewhere}"
    kinds = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(kinds) == 11 and all(issubclass(kind, errors.StudyError) for kind in kinds)
    # the builtin a library caller would catch
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.WriteError, OSError)
    assert issubclass(errors.ModelNotFoundError, LookupError) and issubclass(errors.LayoutError, errors.CohortError)


def test_the_command_line_prints_what_a_user_can_fix_as_one_line_and_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere")], tasks=map_in_process) == 2
    err = capsys.readouterr().err
    assert err == f"error: cohort root is not a directory: {tmp_path / 'nowhere'}; set cohort.root\n"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from study import commands

    def broken(*_):
        raise KeyError("a bug, not the user's input")

    monkeypatch.setattr(commands, "validate", broken)
    with pytest.raises(KeyError):
        main(["validate", str(tmp_path)], tasks=map_in_process)
