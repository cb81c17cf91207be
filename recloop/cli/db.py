"""``recloop db upgrade`` and ``recloop db snapshots``: the database behind storage.

Both use ``DATABASE_URL`` / ``RECLOOP_DATABASE_URL`` (a SQLite file under the recloop home
when unset) unless ``--url`` names another database.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from recloop import storage
from recloop.core.settings import Settings

db_app = typer.Typer(
    help="recloop's database: schema and recorded snapshots.", no_args_is_help=True
)

_URL_HELP = "SQLAlchemy URL; default: DATABASE_URL or the SQLite file under the recloop home."


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(db_app, name="db")


def _url(url: str | None) -> str:
    return url or Settings().resolved_database_url


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _engine(url: str, *, must_exist: bool = False) -> Engine:
    try:
        parsed = storage.normalise_url(url)
        database = parsed.database
        is_file = parsed.get_backend_name() == "sqlite" and database not in (None, "", ":memory:")
        if must_exist and is_file and not Path(str(database)).expanduser().exists():
            # Reading must not leave an empty database file (or directory) behind.
            Console().print(
                f"[red]no database file at {database}[/red]; run `recloop db upgrade` first"
            )
            raise typer.Exit(1)
        return storage.make_engine(parsed)
    except (ArgumentError, ValueError) as exc:
        raise typer.BadParameter(
            f"not a usable database URL {url!r}: {exc}", param_hint="--url"
        ) from None


@db_app.command("upgrade")
def upgrade(url: str | None = typer.Option(None, "--url", help=_URL_HELP)) -> None:
    """Create or upgrade the schema to the newest migration (safe to run repeatedly).

    Example: recloop db upgrade --url sqlite:///./recloop.db
    """
    console = Console()
    target = _url(url)
    engine = _engine(target)
    try:
        before = storage.current_revision(engine)
        after = storage.migrate(engine)
    except SQLAlchemyError as exc:
        console.print(f"[red]cannot upgrade {_shown(engine)}: {exc}[/red]")
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    change = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    console.print(f"{_shown(engine)}: {change} revision {after}")


@db_app.command("snapshots")
def snapshots(
    policy: str = typer.Option(..., "--policy", "-p", help="Policy name, e.g. slateq."),
    url: str | None = typer.Option(None, "--url", help=_URL_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List the snapshots recorded for a policy, oldest version first.

    Example: recloop db snapshots --policy slateq
    """
    console = Console()
    target = _url(url)
    engine = _engine(target, must_exist=True)
    try:
        revision = storage.current_revision(engine)
    except SQLAlchemyError as exc:
        console.print(f"[red]cannot read {_shown(engine)}: {exc}[/red]")
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    if revision != storage.head_revision():
        console.print(
            f"[red]{_shown(engine)} has schema revision {revision or 'none'}, not "
            f"{storage.head_revision()}[/red]; run `recloop db upgrade` first"
        )
        raise typer.Exit(1)
    with storage.Storage(target, migrate=False) as store:
        rows = store.list_snapshots(policy)
        known = [] if rows else store.snapshot_policies()
    if as_json:
        for row in rows:
            print(json.dumps(row, default=_json_default, sort_keys=True))
        return
    if not rows:
        others = ", ".join(known) or "none"
        console.print(f"no snapshots recorded for policy {policy!r} (policies with some: {others})")
        return
    console.print(_table(policy, rows))


def _table(policy: str, rows: list[dict]) -> Table:
    table = Table(title=f"snapshots of {policy}")
    for column in ("version", "algorithm", "created (UTC)", "transitions", "weights sha256"):
        table.add_column(column, no_wrap=True)
    table.add_column("path", overflow="fold")
    for row in rows:
        table.add_row(
            str(row["version"]),
            row["algorithm"],
            row["created"].strftime("%Y-%m-%d %H:%M:%S"),
            str(row["transitions_applied"]),
            row["weights_sha256"][:12],
            row["path"],
        )
    return table


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
