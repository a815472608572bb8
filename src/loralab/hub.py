"""The Hugging Face hub: fail at once when it cannot be reached, and push folders to it.

huggingface_hub retries a dead connection for up to a minute before it gives up; a quick
connect probe tells the user the same thing in a fraction of a second.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import LoralabError

_TRUE = {"1", "true", "yes", "on"}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(
        os.environ.get(k, "").strip().lower() in _TRUE
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


@functools.lru_cache(maxsize=4)
def _probe(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds (cached).

    Behind a proxy a direct connection proves nothing: the libraries are left to try.
    """
    if any(os.environ.get(k) for k in _PROXY_VARS):
        return True
    url = urlparse(endpoint())
    port = url.port or (80 if url.scheme == "http" else 443)
    return _probe(url.hostname or "huggingface.co", port, timeout)


def model_in_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds `repo_id`'s config.json."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id for the cache layout: certainly not cached
        return False
    return isinstance(found, str)


def require_model(repo_id: str, builtin_names: str) -> None:
    """Raise at once when hub model `repo_id` can neither be downloaded nor found in the cache."""
    if model_in_cache(repo_id):
        return
    if offline():
        why = "offline mode is on (HF_HUB_OFFLINE) and it is not in the local Hugging Face cache"
    elif not reachable():
        why = f"the hub ({endpoint()}) cannot be reached from here and it is not in the local cache"
    else:
        return
    raise LoralabError(
        f"Model '{repo_id}' is not a built-in model, not a local folder, and {why}. Use a "
        f"built-in model ({builtin_names}), a folder written by save_pretrained, or a hub id "
        "on a machine with hub access."
    )


def require_dataset(dataset_id: str, local_hint: str) -> None:
    """Raise at once when hub dataset `dataset_id` would have to be downloaded but cannot be.

    In offline mode datasets reads its own cache (quickly), so nothing is checked then.
    """
    if offline() or reachable():
        return
    raise LoralabError(
        f"The dataset {dataset_id} comes from the Hugging Face hub, which cannot be reached "
        f"from here ({endpoint()}). {local_hint} (A copy already in the local Hugging Face "
        "cache is used with HF_HUB_OFFLINE=1.)"
    )


def check_push(repo: str, what: str = "The hub repository") -> None:
    """A bad push target fails before any training, not after it; `what` names it in the error
    (the CLI passes its flag, "--push-to-hub")."""
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise LoralabError(
            f"{what} needs a repository id of the form 'user/name' or 'org/name', got '{repo}'."
        )
    if offline():
        raise LoralabError(f"{what} {repo}: offline mode is on (HF_HUB_OFFLINE); unset it to push.")
    from huggingface_hub import get_token  # HF_TOKEN, else the token `hf auth login` saved

    if not get_token():
        raise LoralabError(
            f"{what} {repo}: no Hugging Face token found, and pushing needs one with write access: "
            "log in with `hf auth login`, or set HF_TOKEN."
        )


def push_folder(folder: str | Path, repo: str, what: str, private: bool = False) -> str:
    """Upload `folder` to hub repo `repo` (created if needed); returns the repo URL.

    The token comes from the environment (HF_TOKEN) or the user's huggingface-cli login; it is
    passed through to the client and never written anywhere by loralab.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise LoralabError(f"Nothing to push: {what} folder '{folder}' does not exist.")
    check_push(repo)
    token = os.environ.get("HF_TOKEN") or None
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id=repo, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo,
            commit_message=f"loralab: upload {what}",
            ignore_patterns=[".*", "**/.*"],
        )
    except Exception as e:  # auth, network, permissions: the user has to act on each
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoralabError(
            f"Could not push the {what} to the hub repository '{repo}' ({first}). Set HF_TOKEN "
            "to a token with write access (or log in with `hf auth login`) and check that the "
            f"hub is reachable; the local copy in '{folder}' is complete."
        ) from None
    return f"{endpoint().rstrip('/')}/{repo}"
