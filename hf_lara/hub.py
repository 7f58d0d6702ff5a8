"""Publishing converted models to the Hugging Face Hub in one commit, model card included.

`PreTrainedModel.push_to_hub` writes its own README.md over ours, so we do not use it. Instead everything (weights
as safetensors, config, tokenizer or processor files, the card) goes up in a single `create_commit`: the Hub applies
a commit entirely or not at all, so a failed push leaves nothing half-written. After the commit we list the files of
the new revision and only report success when every file is there with the size and hash that was sent (sha256 for
LFS files, the git blob sha1 for the others, as the Hub reports them); a commit that landed but does not match is
reported as such (`HubVerificationError`), never as a refused push. Symbolic links that resolve outside the folder
are refused before anything is sent, and what is sent is what was checked: every file is copied into a private
staging folder through a file opened following no link (`hf_lara.io.open_inside`) and uploaded from that copy, so a
link planted after the check is never read.

Errors are raised before anything is sent when possible: a malformed repository id, no token, offline mode, a
folder that is not a converted model. Network and HTTP failures become `HubError` with the endpoint and a fix.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, RepoFile, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from .cards import build_card, is_hf_lara_card, update_card
from .integration.sentence_transformers import transformer_model
from .io import files_inside, open_inside

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
    """The files to upload from a converted checkpoint folder (README.md excepted); raises if it is not one.

    Nothing that resolves outside `folder` (a symbolic link to a file or folder elsewhere) is read or uploaded:
    such a folder is refused as a whole, before anything is sent.
    """
    if not folder.is_dir():
        raise ValueError(
            f"`{folder}` is not a folder. Pass a folder written by `save_pretrained` or `hf-lara convert`."
        )
    files, outside = files_inside(folder)
    if outside:
        raise ValueError(
            f"`{folder}` holds symbolic links that resolve outside it ({'; '.join(outside)}); refusing to upload "
            "files from outside the folder. Replace the links by copies of the files, or remove them."
        )
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise ValueError(f"`{folder}` has no {name}: it is not a saved model folder.")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"`{folder}` has no safetensors weights ({' or '.join(WEIGHT_FILES)}).")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"`{folder}/config.json` is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"`{folder}/config.json` must hold a JSON object, got {type(config).__name__}.")
    if "lara_method" not in config:
        raise ValueError(
            f"`{folder}` holds a `{config.get('model_type')}` model that was not converted by hf_lara. Convert it first "
            "(`hf-lara convert SRC OUT --method NAME`)."
        )
    return [p for p in files if p.relative_to(folder).as_posix() != "README.md" and ".git" not in p.parts]


def folder_card(config: PretrainedConfig, card: ModelCard | None, repo_id: str | None) -> ModelCard:
    """The card to publish with a folder: ours re-rendered for `repo_id`, a user's card as is, or a fresh one.

    Args:
        config (`PretrainedConfig`): the folder's config.
        card (`ModelCard`, *optional*): the folder's README.md, if any.
        repo_id (`str`, *optional*): the repository pushed to.
    """
    if card is None:
        return build_card(config, repo_id=repo_id)
    if is_hf_lara_card(card):
        return update_card(card, config, repo_id=repo_id)
    return card


def _copy_checked(folder: Path, files: list[Path], target: Path) -> Path:
    """Copy `files` of `folder` into `target` through `open_inside`: a file swapped for a link since it was checked
    is refused (or read as the file it was), never followed."""
    for path in files:
        destination = target / path.relative_to(folder)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open_inside(folder, path) as source, open(destination, "wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
    return target


def _checked_card(folder: Path) -> ModelCard | None:
    """`folder/README.md` as a card, read following no link (a README.md that is a link is ignored, as by
    `load_folder_card`); None without one."""
    path = folder / "README.md"
    if path.is_symlink() or not path.is_file():
        return None
    with open_inside(folder, path) as handle:
        return ModelCard(handle.read().decode("utf-8"))


def push_to_hub(
    model_or_folder: PreTrainedModel | nn.Module | str | Path,
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
        model_or_folder (`PreTrainedModel`, `SentenceTransformer`, `str` or `Path`): a converted model, a
            `SentenceTransformer` converted with `convert_sentence_transformer` (saved with its own `save`, modules
            included), or a folder either was saved to (`save_pretrained`, `hf-lara convert`), uploaded as it is.
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
        A `PushResult`, only once every file is verified in the new revision (size, and sha256 or git blob sha).

    Raises:
        `ValueError` for a bad `repo_id`, a folder that is not a converted model or one with links resolving outside
        it; `HubError` for a missing token, offline mode, an unreachable endpoint or a refused request;
        `HubVerificationError` (a `HubError`) for a commit that landed but does not hold what was sent.
    """
    check_repo_id(repo_id)
    token = _resolve_token(token)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="hf_lara_push_") as staging:
        folder, in_memory, tags = _stage(model_or_folder, tokenizer, Path(staging) / "model")
        files = _check_folder(folder)
        names = [p.relative_to(folder).as_posix() for p in files]
        # upload what was checked: a user's folder is copied into the private staging folder through files opened
        # following no link, and everything below reads that copy (an in-memory model was saved there already)
        upload = folder if in_memory is not None else _copy_checked(folder, files, Path(staging) / "upload")
        operations = [CommitOperationAdd(name, str(upload / name)) for name in names]
        config = json.loads((upload / "config.json").read_text())
        message = commit_message or f"Upload {config['lara_method']} model converted by hf-lara"
        if in_memory is None:
            checked_config = AutoConfig.from_pretrained(upload)
            checked_card = _checked_card(folder)

        def readme(full_repo_id: str) -> CommitOperationAdd:
            # rendered once the repository exists, so the snippet names it with its namespace
            if card is not None:
                text = str(card)
            elif in_memory is not None:
                text = str(build_card(in_memory, repo_id=full_repo_id, tags=tags))
            else:
                text = str(folder_card(checked_config, checked_card, full_repo_id))
            return CommitOperationAdd("README.md", text.encode())

        return _commit(endpoint, token, repo_id, operations, readme, message, private, revision, create_pr)


def _is_sentence_transformer(obj) -> bool:
    return isinstance(obj, nn.Module) and not isinstance(obj, PreTrainedModel) and hasattr(obj, "encode")


def _stage(model_or_folder, tokenizer, staging: Path) -> tuple[Path, PreTrainedModel | None, tuple[str, ...]]:
    """The folder to upload, the in-memory model it was saved from (None for a folder) and extra card tags."""
    if isinstance(model_or_folder, PreTrainedModel) or _is_sentence_transformer(model_or_folder):
        sentence_transformer = _is_sentence_transformer(model_or_folder)
        model = transformer_model(model_or_folder) if sentence_transformer else model_or_folder
        if getattr(model.config, "lara_method", None) is None:
            raise ValueError("`model` was not converted by hf_lara; convert it with `hf_lara.convert` first.")
        if sentence_transformer:
            # sentence-transformers' own save keeps modules.json, pooling, normalisation, max_seq_length
            model_or_folder.save(str(staging), create_model_card=False)
        else:
            model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        return staging, model, ("sentence-transformers",) if sentence_transformer else ()
    if tokenizer is not None:
        raise ValueError("`tokenizer` is only for in-memory models; save it into the folder instead.")
    return Path(model_or_folder), None, ()


class HubVerificationError(HubError):
    """The commit landed on the Hub, but what the Hub holds does not match what was sent (or could not be read)."""


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
    verify_commit(api, repo_id, info.oid, operations)
    return PushResult(
        repo_id=repo_id,
        commit_oid=info.oid,
        commit_url=info.commit_url,
        pr_url=info.pr_url,
        revision=revision or constants.DEFAULT_REVISION,
        files=[op.path_in_repo for op in operations],
    )


def local_digests(operation: CommitOperationAdd) -> tuple[int, str, str]:
    """Size, sha256 and git blob sha1 of what `operation` uploads (read from its file or bytes once)."""
    size = operation.upload_info.size
    sha256, blob = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with operation.as_file() as file:
        while chunk := file.read(1 << 20):
            sha256.update(chunk)
            blob.update(chunk)
    return size, sha256.hexdigest(), blob.hexdigest()


def verify_commit(api: HfApi, repo_id: str, oid: str, operations: list[CommitOperationAdd]) -> None:
    """Check that commit `oid` holds every uploaded file with the size and hash that was sent.

    The Hub reports, per file, its size and git blob sha1, and for LFS files (weights) the sha256 of the content;
    each is compared with the local file. Raises `HubVerificationError`, saying that the commit landed, otherwise.
    """
    landed = f"The commit {oid} landed on {repo_id!r}"
    try:
        remote = {entry.path: entry for entry in api.list_repo_tree(repo_id, revision=oid, recursive=True)}
    except (HfHubHTTPError, *_network_errors()) as error:
        raise HubVerificationError(
            f"{landed} but could not be verified ({type(error).__name__}: {str(error).splitlines()[0]}). Check the "
            "files on the Hub, or push again."
        ) from None
    problems = []
    for operation in operations:
        path, entry = operation.path_in_repo, remote.get(operation.path_in_repo)
        size, sha256, blob = local_digests(operation)
        if not isinstance(entry, RepoFile):
            problems.append(f"{path} is missing")
        elif entry.size != size:
            problems.append(f"{path} has {entry.size} bytes on the Hub, {size} were sent")
        elif entry.lfs is not None and entry.lfs.sha256 != sha256:
            problems.append(f"{path} has sha256 {entry.lfs.sha256[:12]}... on the Hub, {sha256[:12]}... was sent")
        elif entry.lfs is None and entry.blob_id != blob:
            problems.append(f"{path} has git blob {entry.blob_id[:12]}... on the Hub, {blob[:12]}... was sent")
    if problems:
        raise HubVerificationError(
            f"{landed} but does not match what was sent: {'; '.join(problems)}. That revision on the Hub is "
            "damaged: push again, or revert the commit."
        )
