"""Print the fastest Gluon prefill tiles of an attn_workload.py --json result as SPOOL_GLUON_PREFILL wants them.

  python bench/best_gluon_prefill.py attn.json [CASE]     (CASE: a key of its "prefill"; default the 16-prompt step)

Prints "block_n,stages,persistent" (e.g. "64,4,1"), or nothing when the file has no Gluon rows for
that case.
"""
from __future__ import annotations

import json
import re
import sys


def main() -> int:
    try:
        res = json.load(open(sys.argv[1]))["prefill"]
    except (OSError, KeyError, ValueError, IndexError):
        return 0
    steps = (k for k in res if k.startswith("step") and k.endswith("bf16"))
    case = sys.argv[2] if len(sys.argv) > 2 else next(steps, "")
    rows = sorted((r for r in res.get(case, []) if r["variant"].startswith("gluon")), key=lambda r: r["ms"])
    if rows:
        m = re.fullmatch(r"gluon bn=(\d+) st=(\d+)( grid=items)?", rows[0]["variant"])
        if m:
            print(f"{m[1]},{m[2]},{int(not m[3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
