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
from .factory import migrate, open_store, store_from

__all__ = ["Connection", "NodeQuery", "NodeVersion", "QueryStore", "Rejection", "RetentionStore",
           "RunQuery", "RunVersion", "Store", "WriteResult", "WriteStore", "migrate", "open_store",
           "store_from"]
