"""A SQLite URL that carries a user and password (`sqlite+pwtest://user:password@/abs/path.db`), for the
tests that a storage URL's password is never printed nor written (tests/test_pruning_unit.py): SQLite
itself refuses credentials, so this dialect drops them and opens the file.

`python -c "import tests.sqlite_password as m; m.main()" ARGS` is `python -m sd3exp ARGS` with it registered."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite


class Dialect(SQLiteDialect_pysqlite):
    supports_statement_cache = True

    def create_connect_args(self, url: Any) -> Any:
        return super().create_connect_args(url._replace(username=None, password=None))  # URL.set leaves None unset


def register() -> None:
    registry.register("sqlite.pwtest", __name__, "Dialect")


def main() -> None:
    register()
    from sd3exp.cli import main as cli

    cli()
