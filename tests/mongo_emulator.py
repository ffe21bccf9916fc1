"""A MongoDB replica-set primary for tests: a mockupdb server answered by an in-memory
emulator (``FakeMongo``).

The emulator evaluates the update pipelines and queries the store sends with MongoDB's
documented semantics (about fifty expression, update and query operators, written here
after the documentation), so writes can be read back; tests inject failures per command.
It proves what the store sends and what it makes of each reply, not that a real server
evaluates the same pipelines identically (README: "Where the suite runs").

One server serves the whole test session (``mongo_wire`` in conftest.py, reset for every
test): stopping a mockupdb server waits for its accept loop's one-second poll, which a
server per test paid again and again.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import bson
from bson.int64 import Int64
from mockupdb import MockupDB

# --------------------------------------------------------------------------- expressions

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()
_TYPE_ORDER = {type(None): 1, int: 2, float: 2, Int64: 2, str: 3, dict: 4, list: 5,
               bytes: 6, bool: 8, datetime: 9}


def _canon(value: Any) -> Any:
    """Plain dicts and aware-free datetimes, as the emulator keeps values."""
    if isinstance(value, dict):
        return {k: _canon(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canon(v) for v in value]
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _bson_key(value: Any) -> tuple[int, Any]:
    """Sort key in BSON comparison order (null and missing lowest)."""
    if value is MISSING or value is None:
        return (1, 0)
    rank = _TYPE_ORDER.get(type(value), 7)
    if isinstance(value, dict):
        return (rank, [(k, _bson_key(v)) for k, v in value.items()])
    if isinstance(value, list):
        return (rank, [_bson_key(v) for v in value])
    if isinstance(value, datetime):
        return (rank, _canon(value))
    return (rank, value)


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, dict):
            doc = doc.get(part, MISSING)
        elif isinstance(doc, list):
            doc = [_get(d, part) for d in doc if isinstance(d, dict)]
        else:
            return MISSING
    return doc


def _type(value: Any) -> str:
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "double", str: "string", dict: "object",
            list: "array", datetime: "date"}.get(type(value), "unknown")


def evaluate(expr: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    """An aggregation expression's value (the subset of operators the store uses)."""
    if isinstance(expr, str):
        if expr.startswith("$$"):
            name, _, rest = expr[2:].partition(".")
            base = root if name in ("ROOT", "CURRENT") else names[name]
            return _get(base, rest) if rest else base
        if expr.startswith("$"):
            return _get(root, expr[1:])
        return expr
    if isinstance(expr, list):
        return [None if (v := evaluate(e, root, names)) is MISSING else v for e in expr]
    if not isinstance(expr, dict):
        return expr
    if len(expr) == 1 and next(iter(expr)).startswith("$"):
        op, arg = next(iter(expr.items()))
        return _OPERATORS[op](arg, root, names)
    out = {}
    for key, value in expr.items():
        assert not key.startswith("$"), f"bad field name {key!r}"
        assert "." not in key, f"bad field name {key!r}"
        got = evaluate(value, root, names)
        if got is not MISSING:
            out[key] = got
    return out


def _args(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> list[Any]:
    items = arg if isinstance(arg, list) else [arg]
    return [evaluate(a, root, names) for a in items]


def _nullish(value: Any) -> bool:
    return value is None or value is MISSING


def _op_min_max(pick: Callable[..., Any]) -> Callable[..., Any]:
    def run(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
        values = [v for v in _args(arg, root, names) if not _nullish(v)]
        return pick(values, key=_bson_key) if values else None
    return run


def _cmp(test: Callable[[Any, Any], bool]) -> Callable[..., Any]:
    def run(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> bool:
        a, b = (evaluate(x, root, names) for x in arg)
        return test(_bson_key(a), _bson_key(b))
    return run


def _let(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    scope = dict(names)
    for name, value in arg["vars"].items():
        scope[name] = evaluate(value, root, names)
    return evaluate(arg["in"], root, scope)


def _map(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    items = evaluate(arg["input"], root, names)
    if _nullish(items):
        return None
    name = arg.get("as", "this")
    return [evaluate(arg["in"], root, {**names, name: item}) for item in items]


def _filter(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    items = evaluate(arg["input"], root, names)
    if _nullish(items):
        return None
    name = arg.get("as", "this")
    return [i for i in items if evaluate(arg["cond"], root, {**names, name: i}) is True]


def _reduce(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    value = evaluate(arg["initialValue"], root, names)
    for item in evaluate(arg["input"], root, names) or []:
        value = evaluate(arg["in"], root, {**names, "value": value, "this": item})
    return value


def _set_union(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    out: list[Any] = []
    for values in _args(arg, root, names):
        if _nullish(values):
            return None
        for v in values:
            if v not in out:
                out.append(v)
    # MongoDB gives no order: hand it back shuffled so nothing relies on one.
    random.Random(len(out)).shuffle(out)
    return out


def _switch(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    for branch in arg["branches"]:
        if evaluate(branch["case"], root, names) is True:
            return evaluate(branch["then"], root, names)
    return evaluate(arg["default"], root, names)


def _cond(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    test, yes, no = arg if isinstance(arg, list) else (arg["if"], arg["then"], arg["else"])
    return evaluate(yes if evaluate(test, root, names) is True else no, root, names)


def _merge_objects(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    out: dict[str, Any] = {}
    for value in _args(arg, root, names):
        if not _nullish(value):
            out.update(value)
    return out


def _object_to_array(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    value = evaluate(arg, root, names)
    return None if _nullish(value) else [{"k": k, "v": v} for k, v in value.items()]


def _sort_array(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    assert arg["sortBy"] in (1, -1)
    values = evaluate(arg["input"], root, names)
    return None if _nullish(values) else sorted(values, key=_bson_key,
                                                reverse=arg["sortBy"] == -1)


def _sum(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    values = _args(arg, root, names)
    if not isinstance(arg, list) and isinstance(values[0], list):
        values = values[0]
    return sum(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))


def _if_null(arg: Any, root: dict[str, Any], names: dict[str, Any]) -> Any:
    *firsts, last = arg
    for expr in firsts:
        value = evaluate(expr, root, names)
        if not _nullish(value):
            return value
    return evaluate(last, root, names)


_OPERATORS: dict[str, Callable[..., Any]] = {
    "$literal": lambda arg, root, names: arg,
    "$ifNull": _if_null,
    "$min": _op_min_max(min),
    "$max": _op_min_max(max),
    "$eq": _cmp(lambda a, b: a == b),
    "$gt": _cmp(lambda a, b: a > b),
    "$ne": _cmp(lambda a, b: a != b),
    "$in": lambda arg, root, names: any(
        _bson_key(evaluate(arg[0], root, names)) == _bson_key(v)
        for v in evaluate(arg[1], root, names)),
    "$or": lambda arg, root, names: any(v is True for v in _args(arg, root, names)),
    "$and": lambda arg, root, names: all(v is True for v in _args(arg, root, names)),
    "$type": lambda arg, root, names: _type(evaluate(arg, root, names)),
    "$switch": _switch,
    "$cond": _cond,
    "$let": _let,
    "$map": _map,
    "$filter": _filter,
    "$reduce": _reduce,
    "$size": lambda arg, root, names: len(evaluate(arg, root, names)),
    "$setUnion": _set_union,
    "$sortArray": _sort_array,
    "$concatArrays": lambda arg, root, names: list(itertools.chain(*_args(arg, root, names))),
    "$sum": _sum,
    "$mergeObjects": _merge_objects,
    "$objectToArray": _object_to_array,
}


def apply_pipeline(doc: dict[str, Any], pipeline: list[dict[str, Any]]) -> dict[str, Any]:
    """An update pipeline applied to one document ($set and $replaceWith stages)."""
    for stage in pipeline:
        (name, spec), = stage.items()
        if name in ("$set", "$addFields"):
            out = dict(doc)
            for field, expr in spec.items():
                assert not field.startswith("$"), field
                assert "." not in field, field
                value = evaluate(expr, doc, {})
                plain_object = isinstance(expr, dict) and not any(
                    k.startswith("$") for k in expr)
                if plain_object and isinstance(doc.get(field), dict):
                    value = {**doc[field], **value}  # $set merges an object literal
                if value is MISSING:
                    out.pop(field, None)
                else:
                    out[field] = value
            doc = out
        elif name in ("$replaceWith", "$replaceRoot"):
            new = evaluate(spec if name == "$replaceWith" else spec["newRoot"], doc, {})
            assert isinstance(new, dict), new
            if "_id" in doc:
                assert new.get("_id", doc["_id"]) == doc["_id"], "_id is immutable"
                new = {"_id": doc["_id"], **new}
            doc = new
        else:
            raise AssertionError(f"stage {name} is not emulated")
    return doc


def apply_operators(doc: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A classic update document ($set and $unset of top-level fields)."""
    out = dict(doc)
    for op, changes in update.items():
        for field, value in changes.items():
            assert "." not in field, "only top-level fields are emulated"
            if op == "$set":
                out[field] = value
            elif op == "$unset":
                out.pop(field, None)
            else:
                raise AssertionError(f"update operator {op} is not emulated")
    return out


# --------------------------------------------------------------------------- queries


def matches(doc: dict[str, Any], filt: dict[str, Any]) -> bool:
    for key, cond in filt.items():
        if key == "$or":
            if not any(matches(doc, part) for part in cond):
                return False
            continue
        if key == "$and":
            if not all(matches(doc, part) for part in cond):
                return False
            continue
        value = _get(doc, key)
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            for op, arg in cond.items():
                if not _query_op(op, value, arg):
                    return False
        elif not _equal(value, cond):
            return False
    return True


def _equal(value: Any, cond: Any) -> bool:
    if cond is None:
        return _nullish(value)
    if isinstance(value, list) and not isinstance(cond, list):
        return any(_bson_key(v) == _bson_key(cond) for v in value)
    return value is not MISSING and _bson_key(value) == _bson_key(_canon(cond))


def _query_op(op: str, value: Any, arg: Any) -> bool:
    if op == "$in":
        return any(_equal(value, a) for a in arg)
    if op == "$ne":
        return not _equal(value, arg)
    if op == "$exists":
        return (value is not MISSING) == bool(arg)
    if op == "$eq":
        return _equal(value, arg)
    if _nullish(value):
        return False
    key, bound = _bson_key(value), _bson_key(_canon(arg))
    if key[0] != bound[0]:
        return False
    return {"$gte": key >= bound, "$gt": key > bound, "$lt": key < bound,
            "$lte": key <= bound}[op]


def _project(doc: dict[str, Any], projection: dict[str, Any] | None) -> dict[str, Any]:
    if not projection:
        return doc
    keep = {k for k, v in projection.items() if v}
    return {k: v for k, v in doc.items() if k in keep or k == "_id"}


class FakeMongo:
    """An in-memory replica-set primary behind mockupdb: commands in, replies out."""

    def __init__(self, server: MockupDB) -> None:
        self.server = server
        self.lock = threading.Lock()
        self.data: dict[str, dict[str, dict[bytes, dict[str, Any]]]] = {}
        self.indexes: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.commands: list[dict[str, Any]] = []
        self.faults: list[tuple[str, Callable[[Any], bool]]] = []
        self.version = [7, 0, 2, 0]
        self.hello = {
            "ismaster": True, "isWritablePrimary": True, "helloOk": True, "setName": "rs0",
            "hosts": [server.address_string], "me": server.address_string,
            "secondary": False, "maxWireVersion": 21, "minWireVersion": 0, "setVersion": 1,
            "logicalSessionTimeoutMinutes": 30, "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000, "maxWriteBatchSize": 100_000,
        }

    # ---- plumbing

    def reset(self) -> None:
        """Forget every database, index, command and fault (a fresh server, as a test sees it)."""
        with self.lock:
            self.data.clear()
            self.indexes.clear()
            self.commands.clear()
            self.faults.clear()
            self.version = [7, 0, 2, 0]


    def fail_next(self, command: str, reply: Callable[[Any], bool], times: int = 1) -> None:
        """Answer the next ``times`` ``command`` requests with ``reply`` instead."""
        with self.lock:
            self.faults.extend([(command, reply)] * times)

    def sent(self, command: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.commands if next(iter(c)) == command]

    def handle(self, request: Any) -> bool:
        name = request.command_name
        if name in ("ismaster", "isMaster", "hello"):
            return bool(request.ok(**self.hello))
        doc = _canon(dict(request.doc))
        with self.lock:
            self.commands.append(doc)
            for i, (command, reply) in enumerate(self.faults):
                if command == name:
                    del self.faults[i]
                    return reply(request)
            handler = getattr(self, "do_" + name, None)
            if handler is None:
                return bool(request.ok())
            return bool(request.ok(**handler(doc)))

    def coll(self, db: str, name: str) -> dict[bytes, dict[str, Any]]:
        return self.data.setdefault(db, {}).setdefault(name, {})

    @staticmethod
    def key(_id: Any) -> bytes:
        return bson.encode({"k": _id})

    def docs(self, db: str, name: str) -> list[dict[str, Any]]:
        return list(self.data.get(db, {}).get(name, {}).values())

    # ---- commands

    def do_buildInfo(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {"version": ".".join(map(str, self.version[:3])), "versionArray": self.version}

    def do_ping(self, doc: dict[str, Any]) -> dict[str, Any]:
        return {}

    def do_listDatabases(self, doc: dict[str, Any]) -> dict[str, Any]:
        names = sorted(db for db, colls in self.data.items() if colls)
        return {"databases": [{"name": n} for n in names], "totalSize": 0}

    def do_createIndexes(self, doc: dict[str, Any]) -> dict[str, Any]:
        self.coll(doc["$db"], doc["createIndexes"])
        have = self.indexes.setdefault((doc["$db"], doc["createIndexes"]), [])
        for spec in doc["indexes"]:
            if spec["name"] not in {i["name"] for i in have}:
                have.append(spec)
        return {"numIndexesBefore": 1, "numIndexesAfter": 1 + len(have)}

    def do_listIndexes(self, doc: dict[str, Any]) -> dict[str, Any]:
        specs = self.indexes.get((doc["$db"], doc["listIndexes"]), [])
        ident = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
        return self._cursor(doc["$db"], doc["listIndexes"], [ident, *specs])

    def do_dropDatabase(self, doc: dict[str, Any]) -> dict[str, Any]:
        self.data.pop(doc["$db"], None)
        for key in [k for k in self.indexes if k[0] == doc["$db"]]:
            del self.indexes[key]
        return {}

    def do_update(self, doc: dict[str, Any]) -> dict[str, Any]:
        coll = self.coll(doc["$db"], doc["update"])
        n = modified = 0
        upserted: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for index, op in enumerate(doc["updates"]):
            _id = op["q"].get("_id")
            if list(op["q"]) == ["_id"] and not (isinstance(_id, dict)
                                                and any(k.startswith("$") for k in _id)):
                targets = [(self.key(_id), coll.get(self.key(_id)))]
            else:
                assert not op.get("upsert"), "upserts are keyed by _id"
                targets = [(k, d) for k, d in coll.items() if matches(d, op["q"])]
                if not op.get("multi"):
                    targets = targets[:1]
            for key, old in targets:
                if old is None and not op.get("upsert"):
                    continue
                base = old if old is not None else {"_id": _id}
                new = (apply_pipeline(base, op["u"]) if isinstance(op["u"], list)
                       else apply_operators(base, op["u"]))
                if len(bson.encode(new)) > 16 * 1024 * 1024:
                    errors.append({"index": index, "code": 17419, "errmsg": "Resulting "
                                   "document after update is larger than 16777216"})
                    continue
                coll[key] = new
                n += 1
                if old is None:
                    upserted.append({"index": index, "_id": _id})
                elif new != old:
                    modified += 1
        # A server names upserted documents only when there are some: pymongo's
        # update_one/update_many read ``upserted[0]`` whenever the field is present.
        reply: dict[str, Any] = {"n": n, "nModified": modified}
        if upserted:
            reply["upserted"] = upserted
        return reply | ({"writeErrors": errors} if errors else {})

    def do_insert(self, doc: dict[str, Any]) -> dict[str, Any]:
        coll = self.coll(doc["$db"], doc["insert"])
        errors = []
        for index, item in enumerate(doc["documents"]):
            if self.key(item["_id"]) in coll:
                errors.append({"index": index, "code": 11000, "errmsg": "E11000 duplicate key"})
            else:
                coll[self.key(item["_id"])] = item
        reply: dict[str, Any] = {"n": len(doc["documents"]) - len(errors)}
        if errors:
            reply["writeErrors"] = errors
        return reply

    def do_find(self, doc: dict[str, Any]) -> dict[str, Any]:
        found = [d for d in self.docs(doc["$db"], doc["find"])
                 if matches(d, doc.get("filter") or {})]
        for field, direction in reversed(list((doc.get("sort") or {}).items())):
            found.sort(key=lambda d: _bson_key(_get(d, field)), reverse=direction == -1)
        if doc.get("limit"):
            found = found[: doc["limit"]]
        found = [_project(d, doc.get("projection")) for d in found]
        return self._cursor(doc["$db"], doc["find"], found)

    def do_distinct(self, doc: dict[str, Any]) -> dict[str, Any]:
        values: list[Any] = []
        for d in self.docs(doc["$db"], doc["distinct"]):
            value = _get(d, doc["key"])
            if matches(d, doc.get("query") or {}) and value is not MISSING \
                    and value not in values:
                values.append(value)
        return {"values": values}

    def do_delete(self, doc: dict[str, Any]) -> dict[str, Any]:
        coll = self.coll(doc["$db"], doc["delete"])
        n = 0
        for op in doc["deletes"]:
            for key, item in list(coll.items()):
                if matches(item, op["q"]):
                    del coll[key]
                    n += 1
                    if op.get("limit") == 1:
                        break
        return {"n": n}

    @staticmethod
    def _cursor(db: str, coll: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"cursor": {"id": Int64(0), "ns": f"{db}.{coll}", "firstBatch": docs}}


def url_of(fake: FakeMongo, path: str = "", **query: Any) -> str:
    params = {"replicaSet": "rs0", "serverSelectionTimeoutMS": 1500,
              "connectTimeoutMS": 1000, "socketTimeoutMS": 30000, **query}
    qs = "&".join(f"{k}={v}" for k, v in params.items())
    return f"mongodb://{fake.server.address_string}/{path}?{qs}"


def start_emulator() -> FakeMongo:
    """A mockupdb server answered by a fresh :class:`FakeMongo` (stop it with ``.server``)."""
    server = MockupDB(auto_ismaster=False, request_timeout=5)
    server.run()
    fake = FakeMongo(server)
    server.autoresponds(fake.handle)
    return fake
