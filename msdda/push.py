"""``msdda push``: upload an adapter folder to the Hugging Face Hub (a thin wrapper over huggingface_hub)."""

from __future__ import annotations

import argparse
from pathlib import Path

from msdda.adapters import WEIGHTS_FILE, check_adapter_weights, load_adapter_metadata
from msdda.errors import InputNotFound, UserError

__all__ = ["push_adapter"]


def push_adapter(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload the adapter's weights, metadata and model card; returns the URL.

    Only msdda adapter folders are pushed, so what lands on the Hub is what ``MSDDAPipeline`` and stock
    diffusers' ``load_lora_weights`` read back.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise InputNotFound(f"{folder} has no {WEIGHTS_FILE}: push the final/ folder that msdda train wrote")
    check_adapter_weights(folder, str(folder))  # a truncated file is refused here, not half-uploaded
    load_adapter_metadata(folder)  # refuses a folder whose metadata is missing or malformed
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload msdda reward adapter",
                          allow_patterns=["*.safetensors", "*.json", "README.md"])
    except Exception as error:  # huggingface_hub raises many types (offline, auth, HTTP): one clear message
        raise UserError(f"could not push {folder} to {repo_id} ({type(error).__name__}: {error}); check the "
                           "network and that `huggingface-cli login` (or --token / HF_TOKEN) grants write access") \
            from error
    return str(url)


def _push(args: argparse.Namespace) -> int:
    url = push_adapter(args.folder, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.folder} to {url}")
    return 0


def add_push_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("push", help="upload an adapter folder to the Hugging Face Hub")
    parser.add_argument("folder", help="an adapter folder written by msdda train (e.g. runs/x/final)")
    parser.add_argument("repo_id", help="the Hub repo to create or update, e.g. user/world-aesthetic-lora")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None, help="a Hub token (default: the cached login or HF_TOKEN)")
    parser.set_defaults(handler=_push)
