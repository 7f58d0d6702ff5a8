"""Security and failure model of the CLI and the Hub client: no code run from files, no writes or uploads through
links, atomic outputs (Ctrl-C leaves OUT as it was), pushes verified by hash, user errors before any work."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from . import tiny
from .hub_server import LocalHub
from .test_cli import hf_lara_cli, run_main


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny.save_bert(tmp_path_factory.mktemp("src") / "tiny-bert")


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` (links as their target text, not followed), to compare before/after."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = path.read_bytes()
    return out


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old"))]


class Planted:
    """A pickle that creates `marker` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


PICKLE_NAMES = ("pytorch_model.bin", "training_args.bin", "custom_checkpoint_0.pkl", "optimizer.pt", "rng_state.pth")


# ------------------------------------------------------------------------------------------------ 11.1: no pickle
def test_planted_pickles_never_run(src, tmp_path, capsys):
    """Pickle files planted in a source, a converted folder or a folder without safetensors are never unpickled."""
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(Planted(marker))
    planted = tmp_path / "planted"
    shutil.copytree(src, planted)
    for name in PICKLE_NAMES:
        (planted / name).write_bytes(payload)
    out = tmp_path / "out"
    # in process: anything unpickled here would create the marker as well
    code, _, err = run_main(
        ["convert", str(planted), str(out), "--method", "rfa", "--hparam", "num_features=8"], capsys
    )
    assert code == 0, err
    for name in PICKLE_NAMES:
        (out / name).write_bytes(payload)
    code, _, err = run_main(["fidelity", str(out), "--num-samples", "3"], capsys)
    assert code == 0, err
    with LocalHub() as hub:
        proc = hf_lara_cli("push", str(out), "tester/planted", env=hub.env(HF_HOME=str(tmp_path / "hf")))
        assert proc.returncode == 0, proc.stderr
        assert hub.files("tester/planted")["custom_checkpoint_0.pkl"] == payload  # uploaded as bytes, never loaded
    # only pickled weights: refused with one line, still nothing unpickled
    (planted / "model.safetensors").unlink()
    code, _, err = run_main(["convert", str(planted), str(tmp_path / "out2"), "--method", "rfa"], capsys)
    assert code == 2 and "never pickle files" in err.strip().splitlines()[-1]
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ 11.2: no writes through links
def test_overwrite_replaces_links_and_stale_files(src, tmp_path, capsys):
    victim = tmp_path / "victim.md"
    victim.write_text("not yours\n")
    out = tmp_path / "out"
    assert run_main(["convert", str(src), str(out), "--method", "rfa"], capsys)[0] == 0
    (out / "README.md").unlink()
    (out / "README.md").symlink_to(victim)
    (out / "model.safetensors.index.json").write_text("{}")  # a stale shard index from an earlier sharded save
    code, _, err = run_main(["convert", str(src), str(out), "--method", "eva", "--overwrite"], capsys)
    assert code == 0, err
    assert victim.read_text() == "not yours\n"
    assert not (out / "README.md").is_symlink() and "eva" in (out / "README.md").read_text()
    assert (
        not (out / "model.safetensors.index.json").exists()
        and json.loads((out / "config.json").read_text())["lara_method"] == "eva"
    )
    assert leftovers(tmp_path) == []
    # fidelity --update-card replaces a planted link too, instead of writing through it
    (out / "README.md").unlink()
    (out / "README.md").symlink_to(victim)
    code, _, err = run_main(["fidelity", str(out), "--num-samples", "2", "--update-card"], capsys)
    assert code == 0, err
    assert victim.read_text() == "not yours\n" and not (out / "README.md").is_symlink()
    assert "| attention rel. MSE |" in (out / "README.md").read_text()


def test_overwrite_refuses_folders_that_are_not_model_outputs(src, tmp_path, capsys):
    keep = tmp_path / "documents"
    keep.mkdir()
    (keep / "thesis.tex").write_text("precious")
    code, _, err = run_main(["convert", str(src), str(keep), "--method", "rfa", "--overwrite"], capsys)
    assert code == 2 and "no config.json" in err and (keep / "thesis.tex").read_text() == "precious"


# ------------------------------------------------------------------------------------------------ 11.3: no uploads through links
def test_push_refuses_links_outside_the_folder(src, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("token=hf_secret")
    out = tmp_path / "out"
    assert run_main(["convert", str(src), str(out), "--method", "rfa"], capsys)[0] == 0
    # refused before anything is sent (the endpoint is a closed port: a request would fail differently)
    push = ["push", str(out), "tester/linked", "--token", "t", "--endpoint", "http://127.0.0.1:9"]
    (out / "notes.txt").symlink_to(secret)
    code, out_text, err = run_main(push, capsys)
    assert code == 2 and "Pushed" not in out_text
    assert "notes.txt -> " in err and "resolve outside" in err and len(err.strip().splitlines()) == 1
    # a linked README.md (the card) and a linked folder are refused the same way
    (out / "notes.txt").unlink()
    (out / "README.md").unlink()
    (out / "README.md").symlink_to(secret)
    (out / "extra").symlink_to(tmp_path, target_is_directory=True)
    code, _, err = run_main(push, capsys)
    assert code == 2 and "README.md -> " in err and "extra -> " in err
    # links that stay inside the folder are uploaded as the file they point to
    (out / "README.md").unlink()
    (out / "extra").unlink()
    (out / "config-link.json").symlink_to(out / "config.json")
    with LocalHub() as hub:
        proc = hf_lara_cli("push", str(out), "tester/linked", env=hub.env(HF_HOME=str(tmp_path / "hf")))
        assert proc.returncode == 0, proc.stderr
        assert hub.files("tester/linked")["config-link.json"] == (out / "config.json").read_bytes()


# both pushes in one fresh interpreter (each costs an import of torch and transformers): the folder of "checked" is
# swapped right after it was checked, the folder of "opened" once its checked files are open, just before the commit
SWAP_DURING_PUSH = """
import json, sys
from pathlib import Path
import hf_lara.hub as hub

folders, secret = {when: Path(path) for when, path in json.loads(sys.argv[1]).items()}, Path(sys.argv[2])


def swap(folder):
    for name in ("notes.txt", "README.md"):
        (folder / name).unlink()
        (folder / name).symlink_to(secret)


check_folder, commit = hub._check_folder, hub._commit


def check_then_swap(folder):
    files = check_folder(folder)
    if Path(folder) == folders["checked"]:
        swap(folder)
    return files


def swap_then_commit(endpoint, token, repo_id, *args, **kwargs):
    if repo_id == "tester/swap-opened":
        swap(folders["opened"])
    return commit(endpoint, token, repo_id, *args, **kwargs)


hub._check_folder, hub._commit = check_then_swap, swap_then_commit
for when, folder in folders.items():
    try:
        print(when, "PUSHED", hub.push_to_hub(folder, "tester/swap-" + when).files, flush=True)
    except ValueError as error:
        print(when, "REFUSED", error, flush=True)
"""


@pytest.fixture(scope="module")
def swapped(src, tmp_path_factory) -> dict:
    """Two converted folders with notes, each pushed while a file is swapped for a link to a secret."""
    from hf_lara.cli import main

    root = tmp_path_factory.mktemp("swap")
    secret = root / "secret.txt"
    secret.write_text("token=hf_secret_value")
    folders = {when: root / when for when in ("checked", "opened")}
    for folder in folders.values():
        assert main(["convert", str(src), str(folder), "--method", "rfa"]) == 0
        (folder / "notes.txt").write_text("harmless notes")
    with LocalHub() as hub:
        argv = [json.dumps({when: str(folder) for when, folder in folders.items()}), str(secret)]
        proc = tiny.run_python(
            f"import sys; sys.argv = ['x', *{argv!r}]\n" + SWAP_DURING_PUSH, hub.env(HF_HOME=str(root / "hf"))
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        uploaded = {when: hub.files(f"tester/swap-{when}") for when in folders}
        requests = b"".join(r.encode() for r in hub.state.requests)
    stdout = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.splitlines() if " " in line}
    return {"folders": folders, "stdout": stdout, "uploaded": uploaded, "requests": requests}


@pytest.mark.parametrize("when", ["checked", "opened"])
def test_push_uploads_what_was_checked(when, swapped):
    """A file swapped for a link to a secret between the check and the upload: the secret never reaches the Hub.

    Swapped right after the check, the push is refused (the file now resolves outside the folder); swapped once the
    checked files are open, the checked content is uploaded.
    """
    out, stdout, uploaded = swapped["folders"][when], swapped["stdout"][when], swapped["uploaded"][when]
    assert (out / "notes.txt").is_symlink()  # the swap did happen
    assert not any(b"hf_secret_value" in content for content in uploaded.values())
    assert b"hf_secret_value" not in swapped["requests"]
    if when == "checked":
        assert stdout.startswith("REFUSED") and "notes.txt" in stdout and uploaded == {}
    else:
        assert stdout.startswith("PUSHED")
        assert uploaded["notes.txt"] == b"harmless notes" and b"hf-lara" in uploaded["README.md"]


# ------------------------------------------------------------------------------------------------ 11.4: atomic convert
def test_interrupted_convert_leaves_out_as_it_was(src, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the weights are written (while the tokenizer is saved): exit 130, one line, OUT unchanged."""
    out = tmp_path / "out"
    assert run_main(["convert", str(src), str(out), "--method", "rfa"], capsys)[0] == 0
    before = snapshot(out)

    def interrupt(path):
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_lara.cli.load_preprocessor", interrupt)
    code, _, err = run_main(["convert", str(src), str(out), "--method", "eva", "--overwrite"], capsys)
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert code == 130 and len(lines) == 1 and lines[0].startswith("hf-lara convert: error: interrupted")
    assert snapshot(out) == before and leftovers(tmp_path) == []
    code, _, _ = run_main(["convert", str(src), str(tmp_path / "new"), "--method", "eva"], capsys)
    assert code == 130 and not (tmp_path / "new").exists() and leftovers(tmp_path) == []


# `hf-lara convert ARGS` whose `save_pretrained` says "written" once the weights are in the temporary folder, then
# waits there (for the test's SIGINT)
SLOW_SAVE = """
import signal, sys, time
import transformers
from hf_lara.cli import main

# a shell without job control starts background jobs with SIGINT ignored; a user's Ctrl-C is what is tested here
signal.signal(signal.SIGINT, signal.default_int_handler)

save = transformers.PreTrainedModel.save_pretrained

def save_then_wait(self, *args, **kwargs):
    save(self, *args, **kwargs)
    print("written", flush=True)
    time.sleep(60)

transformers.PreTrainedModel.save_pretrained = save_then_wait
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_during_convert(tmp_path):
    """A real SIGINT to `hf-lara convert` while it writes: exit 130, one line, OUT as it was, no temporary folder.

    The signal is sent once the weights are written into the temporary folder beside OUT: the converting process
    (`SLOW_SAVE`) then waits inside `save_pretrained`, so the signal always lands mid-write, whatever the machine's
    speed (racing a fast conversion made this test flaky).
    """
    src = tmp_path / "src"
    big = dict(tiny.BERT, hidden_size=256, num_hidden_layers=6, intermediate_size=1024, num_attention_heads=4)
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(**big)).save_pretrained(src)
    tiny.tokenizer(src).save_pretrained(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier output, replaced only by a complete conversion
    before = snapshot(out)
    cmd = [sys.executable, "-c", SLOW_SAVE, "convert", str(src), str(out), "--method", "rfa", "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written", proc.communicate(timeout=120)
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    assert proc.returncode == 130 and len(lines) == 1, stderr
    assert lines[0].startswith("hf-lara convert: error: interrupted") and "Traceback" not in stderr
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ 11.6: verified pushes
PUSH_TWICE = """
import sys
from hf_lara.cli import main
for repo_id in ("tester/damaged-truncate", "tester/damaged-corrupt"):
    print("EXIT", repo_id, main(["push", sys.argv[1], repo_id]), flush=True)
    print("END", file=sys.stderr, flush=True)
"""


def test_push_of_a_damaged_commit_is_reported_as_landed(src, tmp_path, capsys):
    """The Hub stores the files cut in half, or with one byte flipped: exit 1, "landed ... does not match"."""
    out = tmp_path / "out"
    assert run_main(["convert", str(src), str(out), "--method", "rfa"], capsys)[0] == 0
    with LocalHub() as hub:
        hub.fail.update({"truncate:tester/damaged-truncate", "corrupt:tester/damaged-corrupt"})
        code = f"import sys; sys.argv = ['x', {str(out)!r}]" + PUSH_TWICE
        proc = tiny.run_python(code, hub.env(HF_HOME=str(tmp_path / "hf")))
        for damage in ("truncate", "corrupt"):
            assert len(hub.state.repos[f"tester/damaged-{damage}"].commits) == 2  # the commit landed
    assert proc.stdout.count(" 1\n") == 2 and "Pushed" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
    lines = [block.strip().splitlines()[-1] for block in proc.stderr.split("END")[:2]]
    for damage, line in zip(("truncate", "corrupt"), lines, strict=True):
        assert line.startswith("hf-lara push: error: The commit ") and f"landed on 'tester/damaged-{damage}'" in line
        assert "refused" not in line and "model.safetensors has" in line and "config.json has" in line
    size = (out / "model.safetensors").stat().st_size
    assert f"model.safetensors has {size // 2} bytes on the Hub, {size} were sent" in lines[0]
    # same sizes: caught by the sha256 (LFS files) and the git blob sha (regular files)
    assert "model.safetensors has sha256" in lines[1] and "config.json has git blob" in lines[1]


# ------------------------------------------------------------------------------------------------ 11.7: user errors
def user_errors(src, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir(exist_ok=True)
    tokenizer_only = tmp_path / "tokenizer_only"
    tokenizer_only.mkdir(exist_ok=True)
    (tokenizer_only / "config.json").write_text(json.dumps({"do_lower_case": True}))
    unsupported = tmp_path / "t5"
    unsupported.mkdir(exist_ok=True)
    (unsupported / "config.json").write_text(json.dumps({"model_type": "t5"}))
    listed = tmp_path / "listed"
    listed.mkdir(exist_ok=True)
    (listed / "config.json").write_text("[1, 2]")
    conv = ["convert", str(src)]
    fid = ["fidelity", str(src)]
    return {
        "convert: OUT is a file": ([*conv, str(a_file), "--method", "rfa"], "is a file"),
        "convert: OUT under a file": ([*conv, str(a_file / "sub"), "--method", "rfa"], "is a file, not a folder"),
        "convert: config of no model": (["convert", str(tokenizer_only), str(tmp_path / "o"), "--method", "rfa"], ""),
        "convert: unsupported model": (["convert", str(unsupported), str(tmp_path / "o"), "--method", "rfa"], "t5"),
        "convert: config is a list": (["convert", str(listed), str(tmp_path / "o"), "--method", "rfa"], ""),
        "convert: OUT is SRC": (["convert", str(src), str(src), "--method", "rfa", "--overwrite"], "hold it"),
        "fidelity: --json folder": ([*fid, "--json", str(a_dir)], "--json"),
        "fidelity: --plot folder": ([*fid, "--plot", str(a_dir)], "--plot"),
        "fidelity: --json under a file": ([*fid, "--json", str(a_file / "r.json")], "--json"),
        "fidelity: --num-samples 0": ([*fid, "--num-samples", "0"], "--num-samples"),
        "fidelity: --num-samples -1": ([*fid, "--num-samples", "-1"], "--num-samples"),
        "fidelity: --max-length 0": ([*fid, "--max-length", "0"], "--max-length"),
        "fidelity: --batch-size 0": ([*fid, "--batch-size", "0"], "--batch-size"),
        "fidelity: config of no model": (["fidelity", str(tokenizer_only)], ""),
        "bench: --json folder": (["bench", "--json", str(a_dir)], "--json"),
        "bench: --repeats 0": (["bench", "--repeats", "0"], "--repeats"),
        "bench: --threads 0": (["bench", "--threads", "0"], "--threads"),
        "bench: --lengths 0": (["bench", "--lengths", "0"], "--lengths"),
        "push: config is a list": (["push", str(listed), "tester/x", "--token", "t"], ""),
        "demo: --output-dir file": (["demo", "--output-dir", str(a_file)], "--output-dir"),
        "demo: --output-dir under a file": (["demo", "--output-dir", str(a_file / "d")], "--output-dir"),
        "demo: --json folder": (["demo", "--json", str(a_dir)], "--json"),
        "demo: --repeats 0": (["demo", "--repeats", "0"], "--repeats"),
        "demo: --threads 0": (["demo", "--threads", "0"], "--threads"),
        "demo: --length -5": (["demo", "--length", "-5"], "--length"),
    }


def test_user_errors_exit_2_with_one_line_before_any_work(src, tmp_path, capsys, monkeypatch):
    """Each user error is one line, exit 2, and is found before any weights are loaded."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_loading))
    for name, (argv, needle) in user_errors(src, tmp_path).items():
        code, _, err = run_main(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (name, code, err)
        assert lines[0].startswith(f"hf-lara {argv[0]}: error: ") and needle in lines[0], (name, err)
    assert not any(p.name.startswith("o") and p.is_dir() for p in tmp_path.iterdir())
