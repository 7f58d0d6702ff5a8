"""The `hf-lara` command line: the convert -> fidelity -> push -> load chain through real subprocesses, `--help`
everywhere, and exit code 2 with one line on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import hf_lara
from hf_lara.cli import build_parser, main

from . import tiny
from .hub_server import LocalHub, closed_endpoint

COMMANDS = ["convert", "distill", "fidelity", "bench", "push", "demo"]


def hf_lara_cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The installed console script when there is one, else the module."""
    exe = shutil.which("hf-lara")
    cmd = [exe] if exe else [sys.executable, "-m", "hf_lara.cli"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny.save_bert(tmp_path_factory.mktemp("src") / "tiny-bert")


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_chain_convert_fidelity_push_load(src, tmp_path):
    out = tmp_path / "converted"
    proc = hf_lara_cli("convert", str(src), str(out), "--method", "rfa", "--hparam", "num_features=8",
                       "--base-model", "org/tiny-bert")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "with `rfa`" in proc.stdout and (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["lara_method"] == "rfa" and config["lara_hparams"] == {"num_features": 8}

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(tiny.TEXTS) + "\n\n")
    proc = hf_lara_cli("fidelity", str(out), "--text-file", str(texts), "--json", str(tmp_path / "f.json"),
                       "--plot", str(tmp_path / "f.png"), "--update-card")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["num_sequences"] == 3 and len(report["attention_error"]) == 2
    assert f"{report['mean_attention_error']:.4g}" in proc.stdout and "embedding_cosine" in proc.stdout
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert "| attention rel. MSE |" in card and "base_model: org/tiny-bert" in card

    unreachable = closed_endpoint()
    with LocalHub(lifetime=900) as hub:  # fresh interpreters: on a loaded machine well past the 300 s default
        env = hub.env(HF_HOME=str(tmp_path / "hf_home"))
        proc = hf_lara_cli("push", str(out), "tester/tiny-rfa", "--private", env=env)
        assert proc.returncode == 0, proc.stderr
        assert "files to tester/tiny-rfa@main" in proc.stdout and proc.stdout.startswith("Pushed ")
        readme = hub.files("tester/tiny-rfa")["README.md"].decode()
        assert "| attention rel. MSE |" in readme and 'from_pretrained("tester/tiny-rfa")' in readme

        # one more fresh interpreter (each costs an import of torch and transformers): load the pushed model back,
        # then push through `main` twice, to a Hub refusing the commit and to an endpoint nobody listens on
        hub.fail.add("commit:tester/refused")
        proc = tiny.run_python(LOAD_THEN_FAIL.format(texts=tiny.TEXTS, out=str(out), unreachable=unreachable), env)
        assert "SAME True LaraBertForMaskedLM" in proc.stdout, proc.stderr[-2000:]
        assert set(hub.files("tester/refused")) == {".gitattributes"}  # nothing on the Hub
    refused, unreached = (block.strip().splitlines()[-1] for block in proc.stderr.split("END")[:2])
    # exit code 1, one line, no success reported
    assert "EXIT refused 1" in proc.stdout and "EXIT unreachable 1" in proc.stdout and "Pushed" not in proc.stdout
    assert refused.startswith("hf-lara push: error: The Hub at "), proc.stderr[-2000:]
    assert unreached.startswith("hf-lara push: error: Could not reach the Hub"), proc.stderr[-2000:]


# in the Hub's environment: the pushed model equals the local one; a refused and an unreachable push exit with 1
LOAD_THEN_FAIL = textwrap.dedent("""
    import sys, torch, transformers, hf_lara
    from hf_lara.cli import main
    tok = transformers.AutoTokenizer.from_pretrained("tester/tiny-rfa")
    batch = tok({texts!r}, padding=True, return_tensors="pt")
    remote = transformers.AutoModelForMaskedLM.from_pretrained("tester/tiny-rfa").eval()
    local = transformers.AutoModelForMaskedLM.from_pretrained({out!r}).eval()
    with torch.no_grad():
        print("SAME", torch.equal(remote(**batch).logits, local(**batch).logits), type(remote).__name__)
    for name, extra in (("refused", []), ("unreachable", ["--endpoint", {unreachable!r}])):
        print("EXIT", name, main(["push", {out!r}, "tester/" + name, *extra]), flush=True)
        print("END", file=sys.stderr, flush=True)
""")


def test_converted_output_matches_the_library(src, tmp_path, capsys):
    code, out, _ = run_main(["convert", str(src), str(tmp_path / "o"), "--method", "eva", "--layers", "1",
                             "--hparam", "window_size=2", "--hparam", "chunk_size=1"], capsys)  # fmt: skip
    assert code == 0, out
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "o").eval()
    reference = hf_lara.convert(transformers.AutoModelForMaskedLM.from_pretrained(src), "eva", layers=[1],
                                window_size=2, chunk_size=1).eval()  # fmt: skip
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert sorted(loaded.lara_estimators()) == [1]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    code, out, _ = run_main([command, "--help"] if command else ["--help"], capsys)
    assert code == 0 and "usage: hf-lara" in out


def bad_inputs(src, tmp_path):
    missing = str(tmp_path / "missing")
    return {
        "no command": [],
        "unknown command": ["frobnicate"],
        "convert: unknown method": ["convert", str(src), str(tmp_path / "o1"), "--method", "nope"],
        "convert: missing source": ["convert", missing, str(tmp_path / "o2"), "--method", "rfa"],
        "convert: no method": ["convert", str(src), str(tmp_path / "o3")],
        "convert: hparam syntax": ["convert", str(src), str(tmp_path / "o4"), "--method", "rfa", "--hparam", "x"],
        "convert: bad hparam value": [
            "convert",
            str(src),
            str(tmp_path / "o5"),
            "--method",
            "rfa",
            "--hparam",
            "num_features=-3",
        ],  # fmt: skip
        "convert: unknown hparam": [
            "convert",
            str(src),
            str(tmp_path / "o6"),
            "--method",
            "rfa",
            "--hparam",
            "colour=1",
        ],  # fmt: skip
        "convert: layer out of range": [
            "convert",
            str(src),
            str(tmp_path / "o7"),
            "--method",
            "rfa",
            "--layers",
            "0,9",
        ],
        "convert: non-empty output": ["convert", str(src), str(src), "--method", "rfa"],
        "fidelity: not converted": ["fidelity", str(src)],
        "fidelity: missing model": ["fidelity", missing],
        "bench: lengths": ["bench", "--lengths", "a,b"],
        "bench: method": ["bench", "--method", "zzz"],
        "bench: mode": ["bench", "--modes", "sideways", "--lengths", "8"],
        "bench: heads": ["bench", "--heads", "0"],
        "bench: int": ["bench", "--repeats", "two"],
        "push: repo id": ["push", str(src), "bad repo id!"],
        "push: missing folder": ["push", missing, "tester/x"],
        "push: not converted": ["push", str(src), "tester/x", "--token", "t"],
        "demo: method": ["demo", "--method", "zzz"],
        "demo: length": ["demo", "--length", "0"],
    }


def test_bad_input_exits_2_with_one_line(src, tmp_path, capsys):
    for name, argv in bad_inputs(src, tmp_path).items():
        code, out, err = run_main(argv, capsys)
        # progress bars (loading weights) may precede the message
        lines = [line for line in err.strip().splitlines() if "%|" not in line]
        assert code == 2, (name, code, err)
        assert len(lines) == 1 and lines[0].startswith("hf-lara") and "error:" in lines[0], (name, err)


def test_bad_input_through_the_console_script(tmp_path):
    proc = hf_lara_cli("bench", "--method", "zzz")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "hf-lara bench: error: unknown method(s) zzz; valid: " + ", ".join(hf_lara.available_methods())
    )


def test_fidelity_reads_texts_from_a_dataset(src, tmp_path, capsys):
    code, _, _ = run_main(["convert", str(src), str(tmp_path / "o"), "--method", "rfa"], capsys)
    assert code == 0
    (tmp_path / "ds").mkdir()
    rows = [{"sentence": t, "label": i} for i, t in enumerate(tiny.TEXTS)]
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["fidelity", str(tmp_path / "o"), "--dataset", str(tmp_path / "ds"), "--split", "train"]
    code, _, _ = run_main([*base, "--column", "sentence", "--num-samples", "2", "--json", str(tmp_path / "r.json")],
                          capsys)  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["num_sequences"] == 2
    for extra, needle in ((["--column", "text"], "no column 'text'"), (["--text-file", "x"], "not both")):
        code, _, err = run_main([*base, *extra], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_parser_lists_every_command():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert sorted(sub.choices) == sorted(COMMANDS)


def test_convert_takes_hyper_parameters_as_flags(src, tmp_path, capsys):
    """`--window_size 16 --adaptive=false` is the same as `--hparam window_size=16 --hparam adaptive=false`."""
    out = tmp_path / "eva"
    code, _, err = run_main(["convert", str(src), str(out), "--method", "eva", "--window_size", "16",
                             "--num-chunks=4", "--adaptive", "false", "--sink_tokens", "2"], capsys)  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["lara_hparams"] == {"window_size": 16, "num_chunks": 4, "adaptive": False, "sink_tokens": 2}
    code, _, err = run_main(["convert", str(src), str(tmp_path / "x"), "--method", "eva", "--window_size"], capsys)
    assert code == 2 and "needs a value" in err
    code, _, err = run_main(["bench", "--window_size", "16"], capsys)
    assert code == 2 and "unrecognized arguments" in err
