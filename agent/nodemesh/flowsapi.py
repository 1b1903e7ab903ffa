"""GET /v1/flows: the flow log's answer to one query string (see flows.FlowLog.since)."""
from __future__ import annotations

import urllib.parse
from typing import Any, Tuple

from .flows import HISTORY, MAX_WAIT, Filter, FlowLog


def flows_view(log: FlowLog, path: str) -> Tuple[int, Any]:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)

    def one(name: str) -> Any:
        values = query.get(name)
        return values[-1] if values else None

    try:
        match = Filter.parse(one("service"), one("backend"), one("verdict"))
        since = int(one("since") or 0)
        wait = float(one("wait") or 0)
        limit = int(one("limit") or HISTORY)
        if not 0 <= wait <= MAX_WAIT:
            raise ValueError(f"wait {wait}: 0 to {MAX_WAIT} seconds")
        if limit < 1:
            raise ValueError(f"limit {limit}: at least 1")
    except ValueError as e:
        return 400, {"error": str(e)}
    found, seq = log.since(since, match, wait, limit)
    return 200, {"flows": [f.as_dict() for f in found], "seq": seq}
