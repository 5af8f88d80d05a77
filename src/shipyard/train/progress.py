"""A Rich progress bar for training: step count, loss, learning rate, throughput and ETA."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """Shows progress on stderr when enabled; does nothing otherwise (other ranks, tests)."""

    def __init__(self, *, total: int, start: int, enabled: bool, title: str) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: Any = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task(title, total=total, completed=start, stats="")

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        """Advance to `step`; refresh the numbers when a log record is given."""
        if self._progress is None:
            return
        if record is None:
            self._progress.update(self._task, completed=step)
            return
        stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}"
        if "tokens_per_s" in record:
            stats += f"  {record['tokens_per_s']:,.0f} tok/s"
        else:
            stats += f"  {record['samples_per_s']:,.0f} samples/s"
        self._progress.update(self._task, completed=step, stats=stats)
