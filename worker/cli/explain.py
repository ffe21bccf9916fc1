"""``audit-fleet explain``: the decision chain of one run, for a terminal or as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..documents import action_name
from ..errors import AuditFleetError
from ..explain import (
    Explanation,
    Step,
    deep_documents,
    explain_archived,
    explain_run,
    find_workspace,
)
from ..queries import check_workspace, jsonable
from .common import add_store_flag, archive_master_key, opened_store
from .output import escape_lines, format_ms, format_time, print_json


def _clock(value: datetime | None) -> str:
    if value is None:
        return "?"
    return format_time(value)


def _compact(value: Any) -> str:
    return json.dumps(jsonable(value), ensure_ascii=False, sort_keys=True)


def _block(label: str, value: Any, indent: str) -> list[str]:
    """``label: value``; a long mapping is shown one key per line."""
    if isinstance(value, str):
        lines = value.splitlines() or [""]
        first = f"{indent}{label}: {lines[0]}"
        return [first] + [f"{indent}{' ' * (len(label) + 2)}{ln}" for ln in lines[1:]]
    text = _compact(value)
    if isinstance(value, Mapping) and len(text) > 80:
        out = [f"{indent}{label}:"]
        for key, item in sorted(value.items(), key=lambda kv: str(kv[0])):
            out.extend(_block(str(key), item, indent + "  "))
        return out
    return [f"{indent}{label}: {text}"]


def _error_text(error: Any) -> str:
    if not isinstance(error, Mapping):
        return str(error)
    parts = [str(error.get("type") or "error")]
    if error.get("message"):
        parts.append(str(error["message"]))
    text = ": ".join(parts)
    retries = error.get("retries")
    if isinstance(retries, int) and retries:
        text += f" (retried {retries}x)"
    return text


def _step_lines(st: Step) -> list[str]:
    """One step of an explanation: its head line, then its fields indented."""
    head = f"{st.position:>2}. {st.node_id}  [{st.type or '?'}]"
    if st.attempt != 1:
        head += f"  attempt {st.attempt}"
    head += f"  {st.status or '?'}"
    if st.started_at or st.completed_at:
        head += f"  {_clock(st.started_at)} -> {_clock(st.completed_at)}"
    if st.duration_ms is not None:
        head += f"  ({format_ms(st.duration_ms)})"
    if st.signed_by is not None:
        head += f"  signed by key {st.signed_by}"
    lines = [head]
    pad = "    "
    if st.model or st.tokens:
        tok = st.tokens or {}
        text = f"{pad}model: {st.model or '?'}"
        if st.tokens is not None:
            text += (f"   tokens: {tok.get('input', 0)} in / {tok.get('output', 0)} out"
                     f" = {tok.get('total', 0)}")
        lines.append(text)
    if st.input is not None:
        if isinstance(st.input, Mapping) and "prompt" in st.input:
            lines.extend(_block("prompt", st.input["prompt"], pad))
            rest = {k: v for k, v in sorted(st.input.items()) if k != "prompt"}
            if rest:
                lines.extend(_block("input", rest, pad))
        else:
            lines.extend(_block("input", st.input, pad))
    if st.output is not None:
        lines.extend(_block("output", st.output, pad))
    if st.evaluation is not None:
        lines.extend(_block("evaluation", st.evaluation, pad))
    if st.result is not None:
        lines.extend(_block("result", st.result, pad))
    if st.skipped_branches:
        lines.append(f"{pad}skipped branches: "
                     + ", ".join(str(b) for b in st.skipped_branches))
    if st.actions:
        names = [action_name(a) or _compact(a) for a in st.actions]
        lines.append(f"{pad}actions: " + ", ".join(names))
        for a in st.actions:
            if isinstance(a, Mapping) and set(a) - {"type"}:
                lines.append(f"{pad}  {_compact(a)}")
    if st.error is not None:
        lines.append(f"{pad}error: {_error_text(st.error)}")
    for key, value in st.extra.items():
        lines.extend(_block(key, value, pad))
    return lines


def render(ex: Explanation) -> str:
    """The human view of an explanation, for a terminal (mapping keys in sorted order, so
    every store renders the same text)."""
    lines = [
        f"Run {ex.run_id}   workflow {ex.workflow_id or '?'}   workspace {ex.workspace_id}",
        f"Status: {ex.status or '?'}   total duration: {format_ms(ex.total_duration_ms)}"
        f"   started {_clock(ex.started_at)}   completed {_clock(ex.completed_at)}",
    ]
    if ex.source != "store":
        lines.append(f"Read from: {ex.source}")
    trigger = ex.trigger if isinstance(ex.trigger, Mapping) else None
    if trigger is not None:
        lines.append(f"Trigger: {trigger.get('type') or '?'} from {trigger.get('source') or '?'}")
        for key, value in sorted(trigger.items(), key=lambda kv: str(kv[0])):
            if key not in ("type", "source"):
                lines.extend(_block(str(key), value, "  "))
    elif ex.trigger is not None:
        lines.append(f"Trigger: {_compact(ex.trigger)}")
    else:
        lines.append("Trigger: (not recorded)")
    s = ex.summary
    if s:
        actions = ", ".join(s.get("actionsPerformed") or []) or "none"
        lines.append(
            f"Summary: {s.get('nodesExecuted', '?')} nodes, {s.get('aiCallsMade', '?')} AI calls,"
            f" {s.get('totalTokens', '?')} tokens, actions: {actions}"
        )
    if ex.erasure is not None:
        raw = ex.erasure.get("fields")
        fields: dict[str, Any] = raw if isinstance(raw, dict) else {}
        names = [f"node {n}" for n in fields.get("node") or ()] + [
            f"run {n}" for n in fields.get("run") or ()]
        lines.append(
            f"Erased: {', '.join(names) or '?'} at {ex.erasure.get('at')} by "
            f"{ex.erasure.get('by')} (erasure record {ex.erasure.get('id')})")
    if ex.signatures:
        keys: dict[str, list[str]] = {}
        for sig in ex.signatures:
            keys.setdefault(sig["keyId"], []).append(sig["eventId"])
        lines.append("Signed: " + "; ".join(
            f"key {key} ({', '.join(ids)})" for key, ids in sorted(keys.items())))
    for key, value in ex.extra.items():
        lines.extend(_block(key, value, ""))
    lines.append("")
    if not ex.steps:
        lines.append("(no node traces stored)")
    for st in ex.steps:
        lines.extend(_step_lines(st))
    if ex.missing_nodes:
        lines.append("")
        lines.append(f"{len(ex.missing_nodes)} node execution(s) in the run index have no "
                     "stored trace (expired from hot storage; see explain --archive):")
        for m in ex.missing_nodes:
            lines.append(f"  - {m['nodeId']} [{m.get('type') or '?'}] attempt {m.get('attempt')}"
                         f" {m.get('status') or ''}".rstrip())
    retries = ex.retries()
    errors = ex.errors()
    lines.append("")
    if errors:
        lines.append(f"Errors ({len(errors)}):")
        for e in errors:
            where = e["nodeId"] or "run"
            lines.append(f"  - {where}: {_error_text(e)}")
    else:
        lines.append("Errors: none")
    if retries:
        lines.append("Retries:")
        for r in retries:
            lines.append(f"  - {r['nodeId']}: attempts {r['attempts']},"
                         f" reported retries {r['reportedRetries']}")
    lines.append(f"Outcome: {ex.status or '?'} after {format_ms(ex.total_duration_ms)}")
    if ex.redacted:
        lines.append("(prompts redacted and shortened; --show-prompts shows them in full)")
    return escape_lines(lines)


async def cmd_explain(args: argparse.Namespace) -> int:
    with deep_documents():  # whatever the store holds renders, however deeply nested
        return await _explain(args)


async def _explain(args: argparse.Namespace) -> int:
    run_id: str = args.run_id
    ex: Explanation | None
    if args.archive:
        from ..archive import Archive, OpenDoc
        from ..shredding import load_opener

        if not args.workspace:
            raise AuditFleetError("explain --archive needs --workspace")
        workspace = check_workspace(args.workspace)

        async def keys(run: str) -> OpenDoc:  # the run's data keys, from the store
            async with opened_store(args, read_only=True) as store:
                return (await load_opener(store, archive_master_key(), workspace,
                                          [run])).open

        ex = await explain_archived(Archive.at(args.archive), workspace, run_id,
                                    show_prompts=args.show_prompts, keys=keys)
    else:
        async with opened_store(args, read_only=True) as store:
            ws = check_workspace(args.workspace) if args.workspace else \
                await find_workspace(store, run_id)
            ex = None if ws is None else await explain_run(
                store, ws, run_id, show_prompts=args.show_prompts)
    if ex is None:
        raise AuditFleetError(f"run {run_id!r} not found")
    if args.json:
        print_json(ex.to_json())
    else:
        print(render(ex))
    return 0


def register(subparsers: Any) -> None:
    """Add ``explain`` to the ``audit-fleet`` command."""
    p = subparsers.add_parser(
        "explain", help="show why a run did what it did",
        description="The full decision chain of one run: trigger, nodes in execution order "
        "with timing, model, tokens, prompt and output, decisions, actions, errors, outcome.")
    p.add_argument("run_id", metavar="RUN_ID")
    add_store_flag(p)
    p.add_argument("-w", "--workspace", help="workspace ID (default: search all)")
    p.add_argument("--json", action="store_true", help="stable JSON (explainVersion 1)")
    p.add_argument("--show-prompts", action="store_true",
                   help="show prompts and trigger metadata in full, unredacted")
    p.add_argument("--archive", metavar="DIR",
                   help="read the run from the archive (directory or s3://bucket/prefix) "
                   "instead of the store")
    p.set_defaults(func=cmd_explain)
