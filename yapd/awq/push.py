"""Upload a finished AWQ cache entry to the Hugging Face Hub (opt-in: HF_AWQ_PUSH).

Settings are checked before any quantizing starts (:func:`check`), so a missing token
or repo costs seconds, not the hour a 12B model takes. The token is read from the
config or HF_TOKEN and handed to ``huggingface_hub`` only; every message this module
produces goes through :func:`yapd.awq.scrub`, so it never reaches a log or yapctl.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yapd.awq import AwqError, AwqSettingsError, scrub

log = logging.getLogger("yapd.awq.push")

REPO_ENV = {"chat": "HF_AWQ_CHAT_REPO", "tool": "HF_AWQ_TOOL_REPO"}


@dataclass(frozen=True)
class PushSettings:
    repo: str
    token: str
    branch: str = "main"
    private: bool = True
    allow_create: bool = False
    commit_message: str = "yapd: AWQ W4A16 model"
    endpoint: str = ""  # "" = HF_ENDPOINT or the public Hub

    def __repr__(self) -> str:  # the dataclass default would print the token
        return f"PushSettings(repo={self.repo!r}, branch={self.branch!r}, endpoint={self.endpoint!r})"


def check(role: str, repo: str, token: str) -> None:
    """Raise :class:`AwqError` with what to set when a push cannot even start."""
    if not token:
        raise AwqSettingsError("Hub push is on (HF_AWQ_PUSH) but no token is set: set HF_TOKEN (or awq.hf_token) "
                               "to a write token, or turn the push off")
    if not repo:
        raise AwqSettingsError(f"Hub push is on (HF_AWQ_PUSH) but no repo is set for the {role} model: set "
                       f"{REPO_ENV.get(role, 'the repo')} (awq.{role}_repo), e.g. your-name/model-AWQ")
    if repo.count("/") != 1 or repo.startswith("/") or repo.endswith("/"):
        raise AwqSettingsError(f"{REPO_ENV.get(role, 'repo')}={repo!r} is not a Hub repo id (namespace/name)")


def push(folder: Path, s: PushSettings) -> dict[str, Any]:
    """Create the repo (if allowed) and branch (if needed), then upload ``folder`` in one
    commit. Returns {repo, branch, commit, url}."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(endpoint=s.endpoint or None, token=s.token)
    try:
        if not api.repo_exists(s.repo, repo_type="model"):
            if not s.allow_create:
                raise AwqError(f"Hub repo {s.repo} does not exist (or the token cannot see it); create it, or set "
                               "HF_AWQ_ALLOW_CREATE=1 to let yapd create it")
            log.info("creating Hub repo %s private=%s", s.repo, s.private)
            api.create_repo(s.repo, repo_type="model", private=s.private, exist_ok=True)
        if s.branch and s.branch != "main":
            api.create_branch(s.repo, branch=s.branch, repo_type="model", exist_ok=True)
        log.info("uploading %s to %s@%s", folder, s.repo, s.branch or "main")
        info = api.upload_folder(folder_path=str(folder), repo_id=s.repo, repo_type="model",
                                 revision=s.branch or None, commit_message=s.commit_message)
    except AwqError:
        raise
    except RepositoryNotFoundError as exc:
        raise AwqError(scrub(f"Hub push to {s.repo} failed: repository not found or not writable with this "
                             f"token ({_brief(exc)})", s.token)) from None
    except HfHubHTTPError as exc:
        raise AwqError(scrub(f"Hub push to {s.repo} failed: {_brief(exc)}", s.token)) from None
    except Exception as exc:
        raise AwqError(scrub(f"Hub push to {s.repo} failed: {type(exc).__name__}: {_brief(exc)}",
                             s.token)) from None
    return {"repo": s.repo, "branch": s.branch or "main", "commit": getattr(info, "oid", None),
            "url": getattr(info, "commit_url", None)}


def _brief(exc: BaseException) -> str:
    """The first lines of a Hub error (status, then the server's reason), on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(exc).__name__
