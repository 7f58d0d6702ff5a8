"""`hf_lara.io`: staged folders and atomic files leave the target as it was on failure and never follow links."""

from __future__ import annotations

import os

import pytest

from hf_lara.io import atomic_write_text, check_output_file, check_output_folder, files_inside, staged_folder


def test_staged_folder_replaces_the_target_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(target) as folder:
            (folder / "new.txt").write_text("half")
            raise RuntimeError("failed while writing")
    assert sorted(os.listdir(target)) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    with staged_folder(target) as folder:
        assert folder.parent == target.parent and not (folder / "old.txt").exists()
        (folder / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    # permissions of a normal mkdir, not mkdtemp's private 0o700
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask


def test_atomic_write_replaces_a_link_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    link = tmp_path / "folder" / "README.md"
    link.parent.mkdir()
    link.symlink_to(victim)
    atomic_write_text(link, "card")
    assert victim.read_text() == "keep" and not link.is_symlink() and link.read_text() == "card"
    assert sorted(os.listdir(link.parent)) == ["README.md"]


def test_output_checks(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a folder"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_file(a_file / "r.json", "--json")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        check_output_folder(a_file, "OUT")
    (tmp_path / "link").symlink_to(tmp_path / "d", target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        check_output_folder(tmp_path / "link", "OUT")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(ValueError, match="pass --overwrite"):
        check_output_folder(tmp_path / "d", "OUT", overwrite=False)
    with pytest.raises(ValueError, match="no config.json"):
        check_output_folder(tmp_path / "d", "OUT", overwrite=True)
    assert check_output_folder(tmp_path / "d", "OUT") == tmp_path / "d"  # written into: other files kept


def test_files_inside_reports_links_leaving_the_folder(tmp_path):
    (tmp_path / "secret").write_text("s")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / "inside").symlink_to(folder / "a.txt")
    (folder / "outside").symlink_to(tmp_path / "secret")
    (folder / "up").symlink_to(tmp_path, target_is_directory=True)
    files, outside = files_inside(folder)
    assert [p.relative_to(folder).as_posix() for p in files] == ["a.txt", "inside", "sub/b.txt"]
    assert sorted(o.split(" -> ")[0] for o in outside) == ["outside", "up"]
