"""What the `sluice` command groups share: their consoles, one way to fail, and settings whose
audit store is migrated or found ready."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from workers.settings import ConfigurationError, Settings, settings_from_env

console = Console(stderr=True)
out = Console()


def writable_folder(path: Path, what: str) -> Path:
    """`path`, made if missing, as a folder this process may write `what` into; exits 1 with
    one line when it cannot be, before any work is done for it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot write {what} to {path}: {exc.strerror or exc}")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"cannot write {what} to {path}: permission denied")
    return path


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `message` on one line (markup in it shown as text) and exit with `code`."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """The settings from the environment; a bad one exits 2 naming its variable (its value
    is not shown: it may be a secret)."""
    try:
        return settings_from_env()
    except ConfigurationError as exc:
        console.print(f"[red]configuration error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def ready_settings() -> Settings:
    """Settings whose audit store exists, is reachable and is migrated, for the commands that
    read or change what is in it."""
    return _settings_with_store(migrate=False)


def prepared_settings() -> Settings:
    """Settings with the store migrated (cheap when already at head), for the commands that
    create what they need."""
    return _settings_with_store(migrate=True)


def _settings_with_store(migrate: bool) -> Settings:
    """The settings, once their store is migrated (`migrate`) or found ready; otherwise a
    message that says what to do, not a traceback."""
    from workers.store.migrate import StoreNotReady, check_ready, upgrade_store

    settings = load_settings()
    try:
        (upgrade_store if migrate else check_ready)(settings.database_url)
    except StoreNotReady as exc:
        fail(str(exc))
    return settings
