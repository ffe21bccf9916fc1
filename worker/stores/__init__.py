"""Store backends behind one protocol: MongoDB, PostgreSQL, SQLite and null."""

from .base import (
    NodeQuery,
    NodeVersion,
    Rejection,
    RunQuery,
    RunVersion,
    Store,
    WriteResult,
)
from .factory import open_store

__all__ = ["NodeQuery", "NodeVersion", "Rejection", "RunQuery", "RunVersion", "Store",
           "WriteResult", "open_store"]
