"""``metrics.jsonl``: one JSON record per log step and per evaluation, appended by the
main process; read back by ``overture report`` and the tests.

A kill -9 or a full disk mid-write can leave a torn last line. Appending to it would glue
the next record onto it, so a run that starts on an existing log first cuts it back to
its complete records, and drops the records past the step it resumes from (those steps
are trained and logged again).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .atomic import write_text_atomic

log = logging.getLogger(__name__)


def read_records(path: Path) -> tuple[list[dict], list[int]]:
    """(the complete records of ``path`` in order, the line numbers of torn lines). A
    line is torn when it is not one JSON object with a "step", or when it is the last
    line and has no newline yet (a write in progress or cut short)."""
    raw = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = raw.split("\n")  # the last item is "" when the file ends with a newline
    records, torn = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if last or not isinstance(record, dict) or not isinstance(record.get("step"), int):
            torn.append(number)
            continue
        records.append(record)
    return records, torn


class MetricsLog:
    """Appends records to ``path`` (one JSON line each, with the wall time)."""

    def __init__(self, path: Path, resume_step: int = 0):
        """Repair an existing ``path`` for a run that continues from ``resume_step`` (0
        for a fresh start): torn lines and records past that step are dropped, and one
        line says so."""
        self.path = Path(path)
        if self.path.is_file():
            self._cut_back(resume_step)

    def _cut_back(self, resume_step: int) -> None:
        records, torn = read_records(self.path)
        kept = [r for r in records if r["step"] <= resume_step]
        dropped = len(records) - len(kept)
        if not torn and not dropped:
            return
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        said = []
        if torn:
            said.append(f"dropped {len(torn)} torn line(s) (line {', '.join(map(str, torn))})")
        if dropped:
            said.append(f"dropped {dropped} record(s) past step {resume_step}, where this "
                        "run continues")
        log.warning("%s: %s; %d complete records kept", self.path, " and ".join(said),
                    len(kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")
