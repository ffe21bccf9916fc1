"""Store backends behind one protocol: MongoDB, PostgreSQL, SQLite and null."""

from .base import NodeQuery, Rejection, RunQuery, Store, WriteResult, open_store

__all__ = ["NodeQuery", "Rejection", "RunQuery", "Store", "WriteResult", "open_store"]
