"""`hf_lara.hub` against a local Hub server (tests/hub_server.py) with the real `huggingface_hub` client.

`huggingface_hub` reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` once, at import, and this test session runs offline, so
everything that talks to the server runs in a fresh interpreter whose environment points at it.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import hf_lara
from hf_lara.cards import build_card, validate_card
from hf_lara.hub import HubError, check_repo_id, push_to_hub

from . import tiny
from .hub_server import LocalHub, closed_endpoint


@pytest.fixture(scope="module")
def hub():
    with LocalHub(lifetime=600) as server:
        yield server


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A converted tiny BERT saved with its tokenizer and an hf_lara card, like `hf-lara convert` writes."""
    path = tmp_path_factory.mktemp("converted")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**tiny.BERT)).eval()
    hf_lara.convert(model, "rfa", num_features=8)
    model.save_pretrained(path)
    tiny.tokenizer(path).save_pretrained(path)
    build_card(model, base_model="org/tiny-bert").save(path / "README.md")
    return path


PUSH_AND_LOAD = """
import json, sys, torch, transformers, hf_lara
from hf_lara.hub import HubError, push_to_hub
folder, pushes = sys.argv[1], json.loads(sys.argv[2])
local = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
for repo_id, options in pushes:
    try:
        result = push_to_hub(folder, repo_id, **options)
    except HubError as error:
        print(json.dumps({"error": str(error)}))
        continue
    revision = options.get("revision") or ("refs/pr/1" if options.get("create_pr") else None)
    remote = transformers.AutoModelForMaskedLM.from_pretrained(result.repo_id, revision=revision).eval()
    tok = transformers.AutoTokenizer.from_pretrained(result.repo_id, revision=revision)
    batch = tok(["the cat sat on the mat", "a dog ran"], padding=True, return_tensors="pt")
    with torch.no_grad():
        same = torch.equal(local(**batch).logits, remote(**batch).logits)
    print(json.dumps({"result": result.__dict__, "same": same, "class": type(remote).__name__}))
"""


def push_many(hub, folder, pushes: list[tuple[str, dict]]) -> list[dict]:
    """Push `folder` to each `(repo_id, options)` in one fresh interpreter; load each success back and compare."""
    code = f"import sys; sys.argv = ['x', {str(folder)!r}, {json.dumps(pushes)!r}]\n" + PUSH_AND_LOAD
    proc = tiny.run_python(code, hub.env(HF_HOME=str(folder.parent / "hf_home")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(pushes), proc.stdout
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def pushed(hub, folder) -> dict[str, dict]:
    """Every push the tests below check, in one fresh interpreter (each costs an import of torch and transformers
    otherwise), in this order: a first push, a pull request, a branch, failures injected for one repository each
    (`lfs:`, `commit:`), a wrong token, a foreign namespace, an endpoint nobody listens on."""
    closed = closed_endpoint()
    pushes = {
        "first": ("tester/tiny-rfa", {"commit_message": "first push"}),
        "pr": ("tiny-pr", {"create_pr": True, "private": True}),
        "branch": ("tester/tiny-branch", {"revision": "dev"}),
        "broken-lfs": ("tester/broken-lfs", {}),
        "broken-commit": ("tester/broken-commit", {}),
        "wrong-token": ("tester/x", {"token": "hf_wrong"}),
        "foreign": ("someone-else/x", {}),
        "unreachable": ("tester/unreachable", {"endpoint": closed}),
    }
    hub.fail.update({"lfs:tester/broken-lfs", "commit:tester/broken-commit"})
    try:
        outputs = push_many(hub, folder, list(pushes.values()))
    finally:
        hub.fail.clear()
    return {"closed": closed, **dict(zip(pushes, outputs))}


def test_push_then_load_back_identical(hub, folder, pushed):
    out = pushed["first"]
    assert out["same"] and out["class"] == "LaraBertForMaskedLM"
    result = out["result"]
    assert result["repo_id"] == "tester/tiny-rfa" and result["pr_url"] is None
    files = hub.files("tester/tiny-rfa")
    expected = {"config.json", "model.safetensors", "README.md", "tokenizer_config.json", "vocab.txt"}
    assert expected <= set(files) and set(result["files"]) <= set(files)
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    # the card is ours, re-rendered for the repository, and it was validated by the server on commit
    readme = files["README.md"].decode()
    validate_card(readme)
    assert 'from_pretrained("tester/tiny-rfa")' in readme and "base_model: org/tiny-bert" in readme
    assert "POST /api/validate-yaml" in hub.state.requests
    # one commit on top of the repository's creation: nothing was pushed piecemeal
    assert len(hub.state.repos["tester/tiny-rfa"].commits) == 2


def test_pull_request_and_branch(hub, pushed):
    out, branch = pushed["pr"], pushed["branch"]
    assert out["same"] and out["result"]["repo_id"] == "tester/tiny-pr"
    assert out["result"]["pr_url"].endswith("/tester/tiny-pr/discussions/1")
    assert set(hub.files("tester/tiny-pr")) == {".gitattributes"}  # main untouched
    assert "config.json" in hub.files("tester/tiny-pr", "refs/pr/1")
    # the card names the repository with the namespace the Hub gave it
    assert 'from_pretrained("tester/tiny-pr")' in hub.files("tester/tiny-pr", "refs/pr/1")["README.md"].decode()
    assert hub.state.repos["tester/tiny-pr"].private

    assert branch["same"] and branch["result"]["revision"] == "dev"
    assert "model.safetensors" in hub.files("tester/tiny-branch", "dev")
    assert "model.safetensors" not in hub.files("tester/tiny-branch", "main")


@pytest.mark.parametrize("stage", ["lfs", "commit"])
def test_failed_push_leaves_nothing_and_is_not_success(hub, pushed, stage):
    # the first push stored these weights: a server failing LFS for the repository asks for them again and fails
    out = pushed[f"broken-{stage}"]
    assert "result" not in out and "507" in out["error"]
    assert set(hub.files(f"tester/broken-{stage}")) == {".gitattributes"}


def test_wrong_token_and_foreign_namespace(hub, pushed):
    wrong, foreign = pushed["wrong-token"], pushed["foreign"]
    assert "401" in wrong["error"] and "token was refused" in wrong["error"]
    assert "403" in foreign["error"]
    assert "tester/x" not in hub.state.repos


def test_unreachable_endpoint(pushed):
    assert pushed["unreachable"]["error"].startswith("Could not reach the Hub at " + pushed["closed"])


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad id", "-leading/dash", "x" * 100, "ok/--double"])
def test_bad_repo_id_fails_before_network(folder, repo_id):
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(folder, repo_id, token="t", endpoint="http://127.0.0.1:9")
    with pytest.raises(ValueError):
        check_repo_id(repo_id)


def test_missing_token(folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    from huggingface_hub import get_token

    if get_token() is not None:
        pytest.skip("a Hugging Face token is stored on this machine")
    with pytest.raises(HubError, match="No Hugging Face token"):
        push_to_hub(folder, "tester/x")


def test_offline_mode_is_refused(folder):
    from huggingface_hub import constants

    if not constants.is_offline_mode():
        pytest.skip("this session is online")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(folder, "tester/x", token="t")


def test_folder_checks(tmp_path, folder):
    with pytest.raises(ValueError, match="not a folder"):
        push_to_hub(tmp_path / "missing", "tester/x", token="t")
    with pytest.raises(ValueError, match="no config.json"):
        push_to_hub(tmp_path, "tester/x", token="t")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**tiny.BERT)).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not converted"):
        push_to_hub(tmp_path / "plain", "tester/x", token="t")
    with pytest.raises(ValueError, match="in-memory"):
        push_to_hub(folder, "tester/x", token="t", tokenizer=object())
