"""Commands that replace output (merge, export; run's own guard is in test_reliability.py) delete
only what petune wrote, never the run they read, the current folder, a parent, home or a folder
holding inputs; every output path is checked before anything is written, and a failure leaves
no partial file behind (issue 33, items 2 and 12)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import tiny_classification_recipe

from petune import artifacts
from petune.cli import main


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def said(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed 2-step classification run (data, recipe and run in one folder)."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = tiny_classification_recipe(folder, folder / "run", max_steps=2, save_steps=2)
    assert main(["run", str(recipe)]) == 0
    return folder


@pytest.fixture
def project(finished, tmp_path):
    """A copy of the finished run's folder, with the run's recipe pointing at the copy."""
    shutil.copytree(finished, tmp_path / "project")
    for name in ("recipe.toml", "run/recipe.toml"):
        path = tmp_path / "project" / name
        path.write_text(path.read_text().replace(str(finished), str(tmp_path / "project")))
    return tmp_path / "project"


# -- merge --overwrite ------------------------------------------------------------------------
def test_merge_overwrite_never_deletes_the_run_it_reads(project, capsys):
    before = files_of(project)
    assert main(["merge", str(project / "run"), "--out", str(project / "run"), "--overwrite"]) == 2
    assert "which the merge reads" in said(capsys)
    assert main(["merge", str(project / "run"), "--out", str(project), "--overwrite"]) == 2  # a parent of the run
    assert "nothing was deleted" in said(capsys)
    assert files_of(project) == before


def test_merge_overwrite_refuses_the_current_folder_and_its_parents(project, monkeypatch, capsys):
    work = project / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "todo.txt").write_text("keep me")
    monkeypatch.chdir(work / "notes")
    before = files_of(project)
    for out in (".", "..", str(Path.home())):
        assert main(["merge", str(project / "run"), "--out", out, "--overwrite"]) == 2, out
        message = said(capsys)
        assert "--overwrite refused" in message and "empty name" not in message, message
    assert files_of(project) == before


def test_merge_overwrite_refuses_a_folder_it_did_not_write(project, tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    assert main(["merge", str(project / "run"), "--out", str(precious), "--overwrite"]) == 2
    assert "not a folder petune merge wrote" in said(capsys)
    assert (precious / "chapter1.tex").read_text() == "years of work"
    link = tmp_path / "link"
    link.symlink_to(precious)
    assert main(["merge", str(project / "run"), "--out", str(link), "--overwrite"]) == 2
    assert "symbolic link" in said(capsys)
    assert (precious / "chapter1.tex").read_text() == "years of work"


def test_merge_overwrite_replaces_its_own_folder(project, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(project / "run"), "--out", str(out)]) == 0
    assert json.loads((out / "petune_merge.json").read_text())["run"] == str((project / "run").resolve())
    (out / "stale.txt").write_text("from an older merge")
    assert main(["merge", str(project / "run"), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert main(["merge", str(project / "run"), "--out", str(out), "--verify-only"]) == 0


def test_merge_out_that_is_a_file_or_unwritable_is_refused_before_loading(project, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["merge", str(project / "run"), "--out", str(tmp_path / "file")]) == 2
    assert "--out is a file" in said(capsys)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert main(["merge", str(project / "run"), "--out", str(locked / "merged")]) == 2
        assert "cannot write" in said(capsys)
    finally:
        locked.chmod(0o700)


def test_verify_only_against_another_models_folder_is_a_user_error(project, tiny_llama_path, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_path, other)
    assert main(["merge", str(project / "run"), "--out", str(other), "--verify-only"]) == 2
    message = said(capsys)
    assert "holds another model" in message and "model_type 'llama'" in message


# -- export: every output path first ---------------------------------------------------------
def test_export_refuses_a_folder_in_the_way_before_writing_anything(project, tmp_path, capsys):
    (tmp_path / "x.gguf").mkdir()
    (tmp_path / "x.gguf" / "keep.txt").write_text("x")
    assert main(["export", str(project / "run"), "--out", str(tmp_path / "x.gguf"), "--overwrite"]) == 2
    assert "folder is in the way" in said(capsys)
    out = tmp_path / "out"
    (out / "Modelfile").mkdir(parents=True)
    assert main(["export", str(project / "run"), "--format", "ollama", "--out", str(out / "m.gguf")]) == 2
    assert "folder is in the way" in said(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile"]  # no GGUF, no partial file
    assert (tmp_path / "x.gguf" / "keep.txt").exists()


def test_export_overwrite_replaces_only_gguf_files_and_its_own_modelfile(project, tmp_path, capsys):
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    assert main(["export", str(project / "run"), "--out", str(notes), "--overwrite"]) == 2
    assert "not a GGUF file" in said(capsys)
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(20))
    (tmp_path / "Modelfile").write_text("FROM llama3\n# my own\n")
    assert main(["export", str(project / "run"), "--format", "ollama", "--out", str(tmp_path / "m.gguf"),
                 "--overwrite"]) == 2
    assert "not a Modelfile petune export wrote" in said(capsys)
    assert (tmp_path / "Modelfile").read_text() == "FROM llama3\n# my own\n"


def test_export_refuses_to_replace_an_input_of_the_run(project, capsys):
    data = project / "data.gguf"
    data.write_bytes(b"GGUF" + bytes(20))
    recipe = project / "run" / "recipe.toml"
    recipe.write_text(recipe.read_text().replace(str(project / "train.csv"), str(data)))
    assert main(["export", str(project / "run"), "--out", str(data), "--overwrite"]) == 2
    assert "which the export reads" in said(capsys)
    assert data.read_bytes() == b"GGUF" + bytes(20)


def test_why_not_replaceable_is_shared_and_refuses_inside_an_input_folder(tmp_path):
    inputs = tmp_path / "data"
    inputs.mkdir()
    assert "inside" in artifacts.why_not_replaceable(inputs / "out", [inputs], lambda p: None)
    assert "holds" in artifacts.why_not_replaceable(tmp_path, [inputs / "train.csv"], lambda p: None)
    assert artifacts.why_not_replaceable(tmp_path / "elsewhere", [inputs], lambda p: None) is None
