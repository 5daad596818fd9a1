"""Finding checkpoint files: a local folder, or a hub id through huggingface_hub and its cache.

huggingface_hub honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE itself; nothing here reimplements it.
"""

from __future__ import annotations

import os
from pathlib import Path

# What a model folder may need; pickle weights are fetched only when the caller allows them.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json"]


def demo_model_path() -> Path:
    """The folder of the demo checkpoint bundled with the package (a small StableLM trained on Shakespeare)."""
    return Path(__file__).resolve().parents[1] / "demo"


def resolve_folder(name_or_path: str | os.PathLike, *, revision: str | None = None,
                   local_files_only: bool = False, allow_pickle: bool = False, cache_dir: str | None = None,
                   token: str | bool | None = None) -> Path:
    """Return a local folder holding the checkpoint: `name_or_path` itself, or the hub snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise ValueError(f"{name}: expected a checkpoint folder, found a file")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name:
        raise FileNotFoundError(f"{name}: no such checkpoint folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = MODEL_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns, cache_dir=cache_dir,
                                      local_files_only=local_files_only, token=token))
    except LocalEntryNotFoundError as e:
        if local_files_only or os.environ.get("HF_HUB_OFFLINE"):
            why = "offline mode: local_files_only or HF_HUB_OFFLINE is set"
        else:
            why = f"download failed: {download_cause(e)}"
        raise FileNotFoundError(f"{name}: not a local folder, and not in the hub cache ({why})") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{name}: could not fetch from the hub ({download_cause(e)})") from None


def download_cause(error: BaseException) -> str:
    """Why a hub download failed, in words: no network, no such repository, needs a token, or the raw error."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, GatedRepoError):
            return "the repository is gated: accept its terms on the hub and pass token= (or log in)"
        if isinstance(e, RepositoryNotFoundError):
            return "no such repository on the hub, or it is private (pass token= or log in)"
        if isinstance(e, RevisionNotFoundError):
            return "no such revision in the repository"
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return f"the hub refused access (HTTP {status}): pass token= or log in"
    for e in chain:
        text = f"{type(e).__name__}: {e}"
        if any(word in text for word in ("ConnectError", "ConnectionError", "Name or service not known",
                                         "Temporary failure in name resolution", "Network is unreachable",
                                         "timed out", "Timeout")):
            return f"cannot reach the hub, no network? ({text.splitlines()[0][:200]})"
    last = chain[-1]
    return f"{type(last).__name__}: {str(last).splitlines()[0][:200] if str(last) else ''}"


def resolve_file(name_or_path: str | os.PathLike, filename: str, *, required: bool = True, **hub_kwargs) -> Path | None:
    """Path of one file of a checkpoint folder (local or hub); None when absent and not required."""
    folder = resolve_folder(name_or_path, **hub_kwargs)
    path = folder / filename
    if path.is_file():
        return path
    if required:
        raise FileNotFoundError(f"{folder}: no {filename}")
    return None
