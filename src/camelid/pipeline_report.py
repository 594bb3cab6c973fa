"""What a data pipeline read, kept and dropped, by rule: one JSON file for programs and a text for people.

Every `camelid data` verb fills a `Report` as it goes and saves it with its output, so a dataset always
carries the account of how it was made: `OUT.report.json` and `OUT.report.txt` beside an output file `OUT`,
or `report.json` and `report.txt` inside an output directory.
"""

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.files import write_atomic


@dataclass
class Report:
    """Counts for one pipeline run. `dropped` maps a rule's short name to the records it removed."""

    pipeline: str  # "selfinstruct", "sharegpt", "mix", "curate", "stats"
    read: int = 0
    written: int = 0
    dropped: Counter = field(default_factory=Counter)
    facts: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping: splits, tokens, cost...
    outputs: dict[str, str] = field(default_factory=dict)  # what was written: name -> path
    started: float = field(default_factory=time.monotonic, repr=False)
    seconds: float | None = None

    def drop(self, rule: str, n: int = 1) -> None:
        self.dropped[rule] += n

    def finish(self) -> "Report":
        self.seconds = round(time.monotonic() - self.started, 2)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "read": self.read,
            "written": self.written,
            "dropped": dict(self.dropped.most_common()),
            "dropped_total": sum(self.dropped.values()),
            **self.facts,
            "outputs": self.outputs,
            "seconds": self.seconds,
        }

    def text(self) -> str:
        """The same counts as lines a person reads top to bottom."""
        lines = [f"{self.pipeline}: read {self.read:,}, wrote {self.written:,}"]
        if self.dropped:
            lines.append(f"dropped {sum(self.dropped.values()):,}:")
            width = max(len(rule) for rule in self.dropped)
            lines += [f"  {rule:<{width}}  {n:>9,}" for rule, n in self.dropped.most_common()]
        for key, value in self.facts.items():
            lines.append(f"{key}: {_plain(value)}")
        for name, path in self.outputs.items():
            lines.append(f"{name}: {path}")
        if self.seconds is not None:
            lines.append(f"took {self.seconds:.1f} s")
        return "\n".join(lines)

    def save(self, out: str | Path) -> tuple[Path, Path]:
        """Write the JSON and text reports for the output `out` (a file or a directory); returns both paths."""
        if self.seconds is None:
            self.finish()
        out = Path(out)
        json_path, text_path = report_paths(out)
        write_atomic(json_path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        write_atomic(text_path, self.text() + "\n")
        return json_path, text_path


def report_paths(out: str | Path) -> tuple[Path, Path]:
    """Where the reports of output `out` go: inside it when it is a directory, else beside it."""
    out = Path(out)
    if out.is_dir():
        return out / "report.json", out / "report.txt"
    return out.with_name(out.name + ".report.json"), out.with_name(out.name + ".report.txt")


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
