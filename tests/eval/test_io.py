"""Atomic writes and line-numbered reading."""

import json
import os

import pytest

from mmattn.eval.io import EvalInputError, read_json, read_jsonl, read_records, write_json_atomic, write_text_atomic


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "out" / "summary.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert os.listdir(target.parent) == ["summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def refuse(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_jsonl_errors_carry_line_numbers(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\r\n\r\n{"a": 2}\r\n{"a": \r\n')
    with pytest.raises(EvalInputError, match=r"x.jsonl:4: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_read_records_accepts_arrays_and_bom(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('\ufeff[{"a": 1}, {"a": 2}]', encoding="utf-8")
    assert read_records(path) == [(1, {"a": 1}), (2, {"a": 2})]
    path.write_text('[{"a": 1}, 3]')
    with pytest.raises(EvalInputError, match="element 2: expected a JSON object"):
        read_records(path)


def test_missing_and_directory_inputs(tmp_path):
    with pytest.raises(EvalInputError, match="no such file"):
        read_json(tmp_path / "nope.json")
    with pytest.raises(EvalInputError, match="is a directory"):
        read_jsonl(tmp_path)


def test_directory_replaced_on_success(tmp_path):
    from mmattn.eval.io import directory_replaced_on_success

    target = tmp_path / "model"
    with directory_replaced_on_success(target) as folder:
        (folder / "weights").write_text("first")
    assert (target / "weights").read_text() == "first"
    with pytest.raises(RuntimeError):
        with directory_replaced_on_success(target) as folder:
            (folder / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "first"  # the complete old folder survives a failed write
    with directory_replaced_on_success(target) as folder:
        (folder / "weights").write_text("second")
    assert (target / "weights").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or previous folder left
