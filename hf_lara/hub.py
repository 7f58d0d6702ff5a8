"""Publishing converted models to the Hugging Face Hub in one commit, model card included.

`PreTrainedModel.push_to_hub` writes its own README.md over ours, so we do not use it. Instead everything (weights
as safetensors, config, tokenizer or processor files, the card) goes up in a single `create_commit`: the Hub applies
a commit entirely or not at all, so a failed push leaves nothing half-written. After the commit we list the files of
the new revision and only report success when every file is there.

Errors are raised before anything is sent when possible: a malformed repository id, no token, offline mode, a
folder that is not a converted model. Network and HTTP failures become `HubError` with the endpoint and a fix.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, PreTrainedModel

from .cards import build_card, is_hf_lara_card, load_folder_card, update_card

#: Files a converted checkpoint needs besides its weights.
REQUIRED_FILES = ("config.json",)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class HubError(RuntimeError):
    """Publishing failed; nothing was reported as pushed."""


@dataclass
class PushResult:
    """What a successful push created.

    Attributes:
        repo_id (`str`): the full repository id (namespace included).
        commit_oid (`str`): the commit holding the files.
        commit_url (`str`): its URL.
        pr_url (`str`, *optional*): the pull request, with `create_pr=True`.
        revision (`str`): the branch pushed to (or the PR's base branch).
        files (`list[str]`): the files uploaded, all verified present at `commit_oid`.
    """

    repo_id: str
    commit_oid: str
    commit_url: str
    pr_url: str | None
    revision: str
    files: list[str] = field(default_factory=list)


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid model repository id (`name` or `namespace/name`), else a `ValueError`."""
    if not isinstance(repo_id, str) or repo_id.count("/") > 1:
        raise ValueError(f"`repo_id` must be 'name' or 'namespace/name', got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`repo_id` {repo_id!r} is not a valid Hub repository id: {error}") from None
    return repo_id


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        import httpx2

        errors.append(httpx2.TransportError)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def _resolve_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise HubError(
            "No Hugging Face token: pass `token=` (CLI: `--token`), set the `HF_TOKEN` environment variable, or log in "
            "with `hf auth login`. Pushing needs a token with write access."
        )
    return token


def _check_folder(folder: Path) -> list[Path]:
    """The files to upload from a converted checkpoint folder (README.md excepted); raises if it is not one."""
    if not folder.is_dir():
        raise ValueError(
            f"`{folder}` is not a folder. Pass a folder written by `save_pretrained` or `hf-lara convert`."
        )
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise ValueError(f"`{folder}` has no {name}: it is not a saved model folder.")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"`{folder}` has no safetensors weights ({' or '.join(WEIGHT_FILES)}).")
    config = json.loads((folder / "config.json").read_text())
    if "lara_method" not in config:
        raise ValueError(
            f"`{folder}` holds a `{config.get('model_type')}` model that was not converted by hf_lara. Convert it first "
            "(`hf-lara convert SRC OUT --method NAME`)."
        )
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return [p for p in files if p.relative_to(folder).as_posix() != "README.md" and ".git" not in p.parts]


def folder_card(folder: Path, repo_id: str | None) -> ModelCard:
    """The card to publish with `folder`: ours re-rendered for `repo_id`, a user's card as is, or a fresh one."""
    card = load_folder_card(folder)
    config = AutoConfig.from_pretrained(folder)
    if card is None:
        return build_card(config, repo_id=repo_id)
    if is_hf_lara_card(card):
        return update_card(card, config, repo_id=repo_id)
    return card


def push_to_hub(
    model_or_folder: PreTrainedModel | str | Path,
    repo_id: str,
    *,
    tokenizer=None,
    card: ModelCard | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Push a converted model, its tokenizer/processor and its model card to a Hub repository, in one commit.

    Args:
        model_or_folder (`PreTrainedModel`, `str` or `Path`): a converted model, or a folder it was saved to
            (`save_pretrained`, `hf-lara convert`), whose files are uploaded as they are.
        repo_id (`str`): `namespace/name`, or `name` for the token owner's namespace; created if missing.
        tokenizer (*optional*): a tokenizer or processor saved alongside (in-memory models only).
        card (`ModelCard`, *optional*): the card; by default the folder's README.md (an hf_lara card is
            re-rendered with the repository id), or a fresh `hf_lara.cards.build_card`.
        private (`bool`, *optional*): visibility of a repository created now (an existing one keeps its own).
        revision (`str`, *optional*): branch to push to, created from `main` if missing (default `main`).
        create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing directly.
        token (`str`, *optional*): Hub token with write access (default: `HF_TOKEN` or the stored login).
        commit_message (`str`, *optional*): defaults to "Upload <method> model converted by hf-lara".
        endpoint (`str`, *optional*): Hub endpoint (default: `HF_ENDPOINT`, else huggingface.co).

    Returns:
        A `PushResult`, only once every file is verified present in the new revision.

    Raises:
        `ValueError` for a bad `repo_id` or a folder that is not a converted model, `HubError` for a missing
        token, offline mode, an unreachable endpoint or a refused request.
    """
    check_repo_id(repo_id)
    token = _resolve_token(token)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="hf_lara_push_") as staging:
        if isinstance(model_or_folder, PreTrainedModel):
            if getattr(model_or_folder.config, "lara_method", None) is None:
                raise ValueError("`model` was not converted by hf_lara; convert it with `hf_lara.convert` first.")
            folder = Path(staging)
            model_or_folder.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        else:
            folder = Path(model_or_folder)
            if tokenizer is not None:
                raise ValueError("`tokenizer` is only for in-memory models; save it into the folder instead.")
        files = _check_folder(folder)
        operations = [CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in files]
        config = json.loads((folder / "config.json").read_text())
        message = commit_message or f"Upload {config['lara_method']} model converted by hf-lara"

        def readme(full_repo_id: str) -> CommitOperationAdd:
            # rendered once the repository exists, so the snippet names it with its namespace
            if card is not None:
                text = str(card)
            elif isinstance(model_or_folder, PreTrainedModel):
                text = str(build_card(model_or_folder, repo_id=full_repo_id))
            else:
                text = str(folder_card(folder, full_repo_id))
            return CommitOperationAdd("README.md", text.encode())

        return _commit(endpoint, token, repo_id, operations, readme, message, private, revision, create_pr)


def _commit(endpoint, token, repo_id, operations, readme, message, private, revision, create_pr) -> PushResult:
    if constants.is_offline_mode():
        raise HubError("`HF_HUB_OFFLINE` is set, so the Hub cannot be reached. Unset it to push.")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        operations = [*operations, readme(repo_id)]
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)
        present = set(api.list_repo_files(repo_id, revision=info.oid))
    except OfflineModeIsEnabled as error:
        raise HubError(f"`HF_HUB_OFFLINE` is set, so the Hub cannot be reached: {error}") from None
    except RuntimeError as error:
        # huggingface_hub wraps failed LFS uploads: "Error while uploading 'x' to the Hub." from the HTTP error
        cause = error.__cause__
        if not isinstance(cause, (HfHubHTTPError, *_network_errors())):
            raise
        raise HubError(
            f"{error} {type(cause).__name__}: {str(cause).splitlines()[0]}. Nothing was committed."
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        hint = {401: "the token was refused", 403: "the token cannot write to this namespace"}.get(status, "")
        raise HubError(
            f"The Hub at {endpoint} refused the push to {repo_id!r} ({status}{': ' + hint if hint else ''}): "
            f"{str(error).splitlines()[0]}"
        ) from None
    except _network_errors() as error:
        raise HubError(
            f"Could not reach the Hub at {endpoint}: {type(error).__name__}: {error}. Check your connection and "
            "`HF_ENDPOINT`."
        ) from None
    expected = [op.path_in_repo for op in operations]
    missing = sorted(set(expected) - present)
    if missing:
        raise HubError(f"The commit {info.oid} on {repo_id!r} lacks {', '.join(missing)}; the push is incomplete.")
    return PushResult(
        repo_id=repo_id,
        commit_oid=info.oid,
        commit_url=info.commit_url,
        pr_url=info.pr_url,
        revision=revision or constants.DEFAULT_REVISION,
        files=expected,
    )
