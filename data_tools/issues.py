"""One shape for every problem with the data that we report instead of stopping: the shard
build's annotation issues and fine-tuning's data reports alike hold
``{"name": what it concerns (a file path or a frame name), "reason": a code, "detail": text}``,
with each report's codes listed (and explained) beside it."""
from __future__ import annotations

from collections import Counter


def issue(name: str, reason: str, detail: str = "", *, reasons) -> dict:
    """``reasons``: the codes this report documents (a new code must be documented first)."""
    if reason not in reasons:
        raise ValueError(f"issue reason {reason!r} is not one of the documented {sorted(reasons)}")
    return {"name": str(name), "reason": reason, "detail": detail}


def count_by_reason(issues: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(i["reason"] for i in issues).items()))
