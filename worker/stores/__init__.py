"""Store backends behind one protocol: MongoDB, PostgreSQL, SQLite and null."""

from .base import (
    Connection,
    NodeQuery,
    NodeVersion,
    QueryStore,
    Rejection,
    RetentionStore,
    RunQuery,
    RunVersion,
    Store,
    WriteResult,
    WriteStore,
)
from .factory import open_store

__all__ = ["Connection", "NodeQuery", "NodeVersion", "QueryStore", "Rejection", "RetentionStore",
           "RunQuery", "RunVersion", "Store", "WriteResult", "WriteStore", "open_store"]
