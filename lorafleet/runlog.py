"""Run records: ``trainer_log.jsonl``, a progress bar, the loss plot and ``final_metrics.json``.

``trainer_log.jsonl`` holds one JSON object per line, appended and flushed as it happens so that the
trainer service can stream it while the run goes on. Two kinds of line:

- metric records: ``step``, ``total_steps``, ``epoch``, ``loss``, ``eval_loss``, ``eval_perplexity``,
  ``learning_rate``, ``grad_norm``, ``tokens_per_s``, ``tokens`` (cumulative), ``elapsed_s``,
  ``eta_s``, ``percent``, ``peak_memory_bytes``, ``time`` (unix seconds). A value that is missing
  is left out, never written as null; a non-finite value (a diverged loss) is left out too and its
  name listed under ``nonfinite``, so the file stays strict JSON.
- events: an ``event`` key (``run_started``, ``resumed``, ``checkpoint_saved``, ``finished`` ...),
  ``time``, and the event's own fields.

A killed process can leave a half-written last line; :func:`read_records` skips it, and a new
recorder starts its first line on a fresh line. Only the main rank writes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

LOG_NAME = "trainer_log.jsonl"
PLOT_NAME = "training_loss.png"
FINAL_METRICS_NAME = "final_metrics.json"
_RECORD_ORDER = (
    "step",
    "total_steps",
    "epoch",
    "loss",
    "eval_loss",
    "eval_perplexity",
    "learning_rate",
    "grad_norm",
    "tokens_per_s",
    "tokens",
    "elapsed_s",
    "eta_s",
    "percent",
    "peak_memory_bytes",
    "time",
)


def _clean(value: Any) -> Any:
    """JSON-safe: floats finite or None, Paths as text, containers cleaned recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # a 0-d tensor or numpy scalar
        return _clean(value.item())
    return value


def _compact(fields: dict[str, Any]) -> dict[str, Any]:
    """Drop None values; drop non-finite floats but name them under ``nonfinite``."""
    out: dict[str, Any] = {}
    nonfinite: list[str] = []
    for key, value in fields.items():
        if hasattr(value, "item") and callable(value.item):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite.append(key)
        elif value is not None:
            out[key] = _clean(value)
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA's max allocated when torch uses CUDA, else peak RSS."""
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record and event of a ``trainer_log.jsonl``, in file order.

    A line that does not parse (the half-written last line of a killed process, or such a line
    left in the middle by an earlier attempt) is skipped.

    Args:
        path: the jsonl file, or a run directory holding ``trainer_log.jsonl``.

    Returns:
        The parsed objects; empty when the file does not exist.
    """
    p = Path(path)
    if p.is_dir():
        p = p / LOG_NAME
    if not p.is_file():
        return []
    out: list[dict[str, Any]] = []
    with open(p, "rb") as f:
        for raw in f:
            try:
                item = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(item, dict):
                out.append(item)
    return out


def metric_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metric records (no events), one per step: a step logged twice (a run resumed from an
    earlier checkpoint replays it) keeps its latest record. Sorted by step."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        if "event" not in r and isinstance(r.get("step"), int):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


class RunRecorder:
    """Appends records and events to ``<run_dir>/trainer_log.jsonl`` and drives a progress bar.

    Args:
        run_dir: the run directory (created on the main rank).
        total_steps: optimizer steps of the whole run.
        is_main: only the main rank writes and shows progress; others keep records in memory.
        progress: show a tqdm bar; None shows it when stderr is a terminal.
        resume_step: the step a resumed run starts from; ETA then uses the rate since the restart,
            and ``elapsed_s`` continues from the last record at or before that step.
        clock: monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        *,
        is_main: bool = True,
        progress: bool | None = None,
        resume_step: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOG_NAME
        self.total_steps = max(int(total_steps), 1)
        self.is_main = is_main
        self.resume_step = resume_step
        self._clock = clock
        self._start = clock()
        self._fd: int | None = None
        self._records: list[dict[str, Any]] = []
        self._elapsed_before = 0.0
        self._bar: Any = None
        self._bar_step = resume_step
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step > 0:
            earlier = [r for r in metric_records(read_records(self.path)) if r["step"] <= resume_step]
            self._records = earlier
            if earlier:
                self._elapsed_before = float(earlier[-1].get("elapsed_s", 0.0))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._start_on_fresh_line()
        show = progress if progress is not None else sys.stderr.isatty()
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def _start_on_fresh_line(self) -> None:
        """A killed writer may have left a line without its newline; never glue onto it."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                os.write(self._fd, b"\n")

    def _write(self, obj: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"
        # One write() per line on an O_APPEND descriptor: a concurrent reader sees whole lines or
        # a cut last line, never two records interleaved; no user-space buffer to flush.
        os.write(self._fd, line.encode("utf-8"))

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one metric record; fills in the timing, progress and memory fields.

        Args:
            record: at least ``step``; any of the documented fields, plus extra ones.

        Returns:
            The record as written (without None and non-finite values).
        """
        step = int(record["step"])
        now = self._clock()
        since_start = now - self._start
        done_since_start = step - self.resume_step
        eta = None
        if done_since_start > 0:
            eta = max(self.total_steps - step, 0) * since_start / done_since_start
        fields: dict[str, Any] = {
            "step": step,
            "total_steps": self.total_steps,
            "elapsed_s": round(self._elapsed_before + since_start, 3),
            "eta_s": round(eta, 3) if eta is not None else None,
            "percent": round(100.0 * step / self.total_steps, 2),
            "peak_memory_bytes": peak_memory_bytes(),
            "time": round(time.time(), 3),
        }
        fields.update({k: v for k, v in record.items() if k != "step"})
        ordered = {k: fields[k] for k in _RECORD_ORDER if k in fields}
        ordered.update({k: v for k, v in fields.items() if k not in ordered})
        out = _compact(ordered)
        self._records.append(out)
        self._write(out)
        self._update_bar(out)
        for listener in list(self._listeners):
            try:
                listener(out)
            except Exception as e:  # an observer (a metrics exporter, say) never stops training
                self._listeners.remove(listener)
                print(f"run records: dropped listener {listener!r}: {e!r}", file=sys.stderr)
        return out

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(record)`` with every metric record logged from now on (main rank only).
        A listener that raises is dropped with a warning; training goes on."""
        self._listeners.append(listener)

    def _update_bar(self, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        postfix = {}
        if "loss" in record:
            postfix["loss"] = f"{record['loss']:.4f}"
        if "learning_rate" in record:
            postfix["lr"] = f"{record['learning_rate']:.2e}"
        if "tokens_per_s" in record:
            postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(record["step"] - self._bar_step, 0))
        self._bar_step = record["step"]

    def write_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append an event line (``{"event": kind, "time": ..., **fields}``) on the main rank.

        Args:
            kind: what happened: memory_estimate, run_started, resumed, checkpoint_saved, finished...
            **fields: its details; None values are left out.

        Returns:
            The event as written.
        """
        event = _compact({"event": kind, "time": round(time.time(), 3), **fields})
        self._write(event)
        if self._bar is not None and kind in ("resumed", "checkpoint_saved", "published"):
            self._bar.write(f"[{kind}] " + ", ".join(f"{k}={v}" for k, v in fields.items()))
        return event

    def records(self) -> list[dict[str, Any]]:
        """Metric records of this run so far (those before ``resume_step`` included), no events."""
        return list(self._records)

    def close(self) -> None:
        """Close the file and the progress bar; further writes are dropped."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average whose weight grows with the series length (0 -> ~0.9).

    Short series stay nearly raw; long noisy ones get a strong trend line, as in LLaMA-Factory's plot.
    """
    if not values:
        return []
    weight = 1.8 * (1.0 / (1.0 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1.0 - weight) * v
        out.append(last)
    return out


def plot_loss(run_dir: str | Path) -> Path | None:
    """Draw ``<run_dir>/training_loss.png`` from ``trainer_log.jsonl``: train loss (raw and smoothed)
    and eval loss when present.

    Args:
        run_dir: the run directory.

    Returns:
        The PNG path, or None when there is no loss to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run = Path(run_dir)
    records = metric_records(read_records(run))
    train = [(r["step"], float(r["loss"])) for r in records if isinstance(r.get("loss"), int | float)]
    evals = [
        (r["step"], float(r["eval_loss"])) for r in records if isinstance(r.get("eval_loss"), int | float)
    ]
    if not train and not evals:
        return None
    # Figure + Agg canvas directly: no pyplot global state, safe in threads and without a display.
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#1f77b4", alpha=0.4, label="train loss")
        ax.plot(steps, smooth(list(losses)), color="#1f77b4", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, color="#d62728", marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss of {run.resolve().name}")
    ax.grid(alpha=0.3)
    ax.legend()
    target = run / PLOT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".training_loss.", suffix=".png", dir=run)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_final_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``<run_dir>/final_metrics.json`` atomically (temp file, fsync, rename).

    Non-finite numbers become null so the file stays strict JSON.

    Args:
        run_dir: the run directory (created if missing).
        metrics: JSON-serialisable metrics.

    Returns:
        The file's path.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    target = run / FINAL_METRICS_NAME
    text = json.dumps(_clean(metrics), indent=2, ensure_ascii=False, allow_nan=False, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=".final_metrics.", suffix=".json", dir=run)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
