"""An export's stages, each timed and its peak memory measured: what the CLI shows while the export
runs and sums up at the end (and the manifest keeps, as `export_stages`).

A stage's peak is the largest resident set of the export's processes added together while it ran:
this process's own (its high-water mark is reset when the stage starts, on Linux), plus the peak of
a child process the stage ran in. Stages that run in a child measure themselves there and come back
with that process's figures (`adopt`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from sphinx_edge.rss import peak_rss_mib, reset_peak_rss


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_rss_mib: float | None  # None where a process's peak cannot be reset (not Linux)

    def to_dict(self) -> dict:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


class StageLog:
    """`with log.stage("pte lower"): ...` times and measures a stage; `log.say("3 of 9")` reports
    progress inside the current one. `on_progress` receives every line to show. Stages do not nest:
    each resets the process's peak."""

    def __init__(self, on_progress: Callable[[str], None] | None = None) -> None:
        self.records: list[StageRecord] = []
        self._show = on_progress or (lambda line: None)
        self._current: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageLog]:
        self._current = name
        self._show(name)
        resettable = reset_peak_rss()
        started = time.perf_counter()
        try:
            yield self
        finally:
            peak = peak_rss_mib() if resettable else None
            self.records.append(StageRecord(name, time.perf_counter() - started, peak))
            self._current = None

    def say(self, detail: str) -> None:
        self._show(f"{self._current}: {detail}" if self._current else detail)

    def show(self, line: str) -> None:
        """A line as it is (another process's stage, already named)."""
        self._show(line)

    def adopt(self, records: list[StageRecord], own_peak_mib: float | None) -> None:
        """Stages another process ran while this one held `own_peak_mib` at most: each peak becomes
        the two processes' sum."""
        for r in records:
            both = None if r.peak_rss_mib is None or own_peak_mib is None else r.peak_rss_mib + own_peak_mib
            self.records.append(StageRecord(r.name, r.seconds, both))

    def merge_side_by_side(self, since: int, others: list[StageRecord]) -> None:
        """This process's stages from record `since` on ran while another process ran `others`: both
        lists join the log (theirs first), each peak counted with the other process's largest (an
        upper bound of the two together)."""
        mine = self.records[since:]
        del self.records[since:]

        def largest(records: list[StageRecord]) -> float | None:
            peaks = [r.peak_rss_mib for r in records]
            return None if not peaks or None in peaks else max(peaks)

        self.adopt(others, largest(mine))
        self.adopt(mine, largest(others))

    def summary(self) -> list[dict]:
        return [r.to_dict() for r in self.records]
