"""Writing a benchmark's results: the printed table as `.md`, the measurements and their conditions as `.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_lara.io import atomic_write_text


def write_report(output: str | Path, conditions: dict[str, Any], rows: list[dict], table: str) -> None:
    """Write `OUTPUT.md` (the table) and `OUTPUT.json` (`{"conditions", "rows"}`), each atomically, and say where."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"conditions": conditions, "rows": rows}, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    spent = (
        f"wall {conditions['wall_minutes']:.1f} min, CPU {conditions['cpu_minutes']:.1f} min "
        if "cpu_minutes" in conditions
        else ""
    )
    print(f"{spent}-> {out}.md/.json")
