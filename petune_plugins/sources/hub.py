"""A Hugging Face Hub id: ``google/gemma-3-270m``, optionally pinned: ``org/name@revision``.

A snapshot already in the Hugging Face cache is used as it is, with no network call (runs
stay fast and reproducible; ``huggingface-cli download ID`` refreshes it). Otherwise the
model is downloaded, unless the machine is offline (``HF_HUB_OFFLINE=1``) or the Hub does
not answer within a few seconds: then the error says what to do, at once, instead of
retrying. Only the files a transformers model needs are fetched (config, tokenizer,
safetensors weights; ``pytorch_model*.bin`` only when the repo has no safetensors).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from petune import hookimpl
from petune.api import ModelSource
from petune.errors import UserError
from petune_plugins.sources.local import check_model_folder, looks_like_path

#: ``org/name`` or ``org/name@revision``, with the characters Hub repo names allow.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
#: How long the Hub may take to answer before petune treats the machine as offline.
PROBE_TIMEOUT_S = 3.0
_CONFIG_AND_TOKENIZER = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(var, "").strip().lower() for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    # constants.HF_HUB_OFFLINE is read when huggingface_hub is imported; the variable may have changed since
    return any(flag in {"1", "true", "yes", "on"} for flag in flags) or bool(constants.HF_HUB_OFFLINE)


def _hub_answers() -> bool:
    """One short request, so a closed network costs seconds, not a retry loop per file."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 -- any failure (DNS, refused, timeout, proxy) means "cannot use the Hub now"
        return False
    return True


def _not_available(repo_id: str, why: str) -> UserError:
    return UserError(
        f"Hub model {repo_id!r} is not in the local Hugging Face cache and {why}",
        where="model.name",
        hint=f"download it on a machine with network: `huggingface-cli download {repo_id}` (then copy "
             "~/.cache/huggingface here), or point model.name at a local folder",
    )


class HubSource(ModelSource):
    name = "hub"
    description = "a Hugging Face Hub id (org/name[@revision]); the local HF cache is used first"
    priority = 90  # last: a local folder or packaged name that looks like org/name wins

    def claims(self, name: str) -> bool:
        return not looks_like_path(name) and not name.lower().endswith(".gguf") and HUB_ID.fullmatch(name) is not None

    def resolve(self, name: str) -> Path:
        match = HUB_ID.fullmatch(name)
        if match is None:
            raise UserError(f"{name!r} is not a Hub id", where="model.name", hint="write it as org/name")
        repo_id, revision = match["repo"], match["revision"]
        cached = self._cached(repo_id, revision)
        if cached is not None:
            return check_model_folder(cached, name=name)
        if _offline():
            raise _not_available(repo_id, "the Hub is switched off here (HF_HUB_OFFLINE=1)")
        if not _hub_answers():
            raise _not_available(repo_id, "the Hub cannot be reached from this machine")
        return check_model_folder(self._download(repo_id, revision), name=name)

    @staticmethod
    def _cached(repo_id: str, revision: str | None) -> Path | None:
        """The cached snapshot, if it holds a whole model (a lone config.json fetched by
        some other tool does not count)."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            # the same file patterns as _download, or a snapshot we fetched would count as incomplete
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                            allow_patterns=_CONFIG_AND_TOKENIZER + ["*.safetensors"]))
        except (LocalEntryNotFoundError, OSError, ValueError):
            return None
        try:
            return check_model_folder(folder)
        except UserError:
            return None

    @staticmethod
    def _download(repo_id: str, revision: str | None) -> Path:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
            weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_CONFIG_AND_TOKENIZER + weights))
        except GatedRepoError as exc:  # before RepositoryNotFoundError: it is a subclass
            raise UserError(f"Hub model {repo_id!r} is gated: accept its licence on huggingface.co first",
                            where="model.name", hint="then log in here with `huggingface-cli login`") from exc
        except RepositoryNotFoundError as exc:
            raise UserError(f"Hub model {repo_id!r} does not exist (or is private)", where="model.name",
                            hint="check the spelling; for a private repo log in with `huggingface-cli login`") from exc
        except RevisionNotFoundError as exc:
            raise UserError(f"Hub model {repo_id!r} has no revision {revision!r}", where="model.name",
                            hint="use a branch, tag or commit that exists, or drop @revision") from exc
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise UserError(f"downloading Hub model {repo_id!r} failed: {exc}", where="model.name",
                            hint="retry, or download it with `huggingface-cli download "
                                 f"{repo_id}` and run again") from exc


@hookimpl
def register_model_sources(register):
    register(HubSource)
