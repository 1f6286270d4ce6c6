"""Infrastructure: engine, transactions, shared column types, migrations."""

from whenthen.storage.database import Database, Dialect
from whenthen.storage.metadata import metadata

__all__ = ["Database", "Dialect", "metadata"]
