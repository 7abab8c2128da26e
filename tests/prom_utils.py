"""Test helpers for a REAL Prometheus: the binaries, ``promtool check metrics``, a scraping server.

Why real: prometheus_client happily exposes names that Prometheus' own linter rejects (units such
as ``_mb``, counters without ``_total``), and only a real scrape proves that the exporter thread,
the port and the text format work end to end. The binaries come from Debian's Prometheus 2.42 via
``scripts/install_prometheus.sh`` (shared/STACK.md, "Prometheus, for real"), which the helpers run on
demand; when it fails the test fails with the script's message. No skip: CI must not turn green
because a tool was missing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_prometheus.sh"
BIN_DIR = REPO_ROOT / ".cache" / "prometheus" / "bin"

#: Seconds to wait for Prometheus to answer /-/ready (it replays an empty WAL: about a second).
READY_TIMEOUT_S = 30.0

_install_lock = threading.Lock()


class PrometheusUnavailable(RuntimeError):
    """The Prometheus binaries are missing and scripts/install_prometheus.sh could not get them."""


def _ensure_installed() -> None:
    """Run the install script unless both binaries are there (it is idempotent, but costs a fork)."""
    with _install_lock:
        if (BIN_DIR / "prometheus").is_file() and (BIN_DIR / "promtool").is_file():
            return
        try:
            proc = subprocess.run(
                ["bash", str(INSTALL_SCRIPT)],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PrometheusUnavailable(f"{INSTALL_SCRIPT} did not finish in {exc.timeout} s") from exc
        if proc.returncode != 0:
            raise PrometheusUnavailable(
                f"{INSTALL_SCRIPT} failed (exit {proc.returncode}); the tests need real Prometheus binaries.\n"
                f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
            )
        for name in ("prometheus", "promtool"):
            if not (BIN_DIR / name).is_file():
                raise PrometheusUnavailable(f"{INSTALL_SCRIPT} succeeded but {BIN_DIR / name} is missing")


def prometheus_bin() -> Path:
    """Path of the ``prometheus`` server binary, installing it first if needed."""
    _ensure_installed()
    return BIN_DIR / "prometheus"


def promtool_bin() -> Path:
    """Path of ``promtool``, installing it first if needed."""
    _ensure_installed()
    return BIN_DIR / "promtool"


def promtool_check_metrics(text: bytes) -> tuple[int, str]:
    """Lint an exposition with ``promtool check metrics``.

    Returns:
        ``(exit_code, output)``: 0 and no output when clean; promtool exits 3 and lists each
        problem (one per line, stdout and stderr merged) when a name or type breaks its rules,
        and 1 when the text does not even parse.
    """
    proc = subprocess.run(
        [str(promtool_bin()), "check", "metrics"],
        input=text,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def _free_port() -> int:
    """A TCP port on loopback that was free a moment ago (callers retry on the rare race)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


@dataclass
class PrometheusServer:
    """A Prometheus process started by :func:`running_prometheus`.

    Attributes:
        url: base URL such as ``http://127.0.0.1:40123`` (no trailing slash).
        process: the server process (stopped when the context exits).
        log_path: its stdout+stderr, quoted in failure messages.
    """

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query at "now" through ``/api/v1/query``.

        Returns:
            The ``data.result`` list of a vector result: one ``{"metric": {labels},
            "value": [unix_ts, "string value"]}`` per series; empty when nothing matches yet.

        Raises:
            AssertionError: Prometheus answered an error (bad PromQL, ...), with its message.
        """
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            body = _get_json(url)
        except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body worth showing
            raise AssertionError(
                f"query {promql!r} failed: HTTP {exc.code}: {exc.read().decode('utf-8', 'replace')}"
            ) from exc
        if body.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {body}")
        result = body["data"]["result"]
        if not isinstance(result, list):  # scalar/string results are [ts, value], not a vector
            raise AssertionError(f"query {promql!r} did not return a vector: {body['data']}")
        return result

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 30.0,
        interval: float = 0.25,
    ) -> list[dict[str, Any]]:
        """Poll :meth:`query` until ``predicate(result)`` holds, and return that result.

        Why poll: samples only appear after Prometheus' next scrape (about 7 s for the first one
        with a 1 s interval: scrape offset plus start-up), so a single query would be a race.

        Raises:
            AssertionError: not within ``timeout`` seconds; the message carries the last result,
                the scrape targets' health/last error and the tail of Prometheus' log, which is
                what one needs to tell "not scraped" from "scraped, wrong value".
        """
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while True:
            last = self.query(promql)
            if predicate(last):
                return last
            if time.monotonic() >= deadline:
                break
            if self.process.poll() is not None:
                raise AssertionError(f"Prometheus exited ({self.process.returncode}).\n{self._log_tail()}")
            time.sleep(interval)
        raise AssertionError(
            f"{promql!r} did not satisfy the predicate within {timeout} s; last result: {last}\n"
            f"targets: {self.targets()}\n{self._log_tail()}"
        )

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with ``scrapeUrl``, ``health`` and ``lastError`` (diagnostics)."""
        try:
            body = _get_json(f"{self.url}/api/v1/targets?state=active")
        except (OSError, ValueError) as exc:
            return [{"error": repr(exc)}]
        keep = ("scrapeUrl", "health", "lastError", "lastScrape")
        return [{k: t.get(k) for k in keep} for t in body.get("data", {}).get("activeTargets", [])]

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no Prometheus log)"
        return "--- prometheus log (tail) ---\n" + "\n".join(text)


def _write_config(path: Path, targets: list[str]) -> None:
    """Scrape ``targets`` (``host:port``) every second under job ``lorafleet``.

    scrape_timeout is set explicitly because Prometheus refuses a timeout above the interval and
    its default (10 s) is.
    """
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "lorafleet", "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Prometheus flushes and exits in well under a second), SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _start(config: Path, data_dir: Path, log_path: Path) -> PrometheusServer:
    """Start one Prometheus on a free loopback port and wait for /-/ready.

    Raises:
        OSError: the port was taken between picking and binding (the caller retries).
        AssertionError: it exited or did not become ready (with its log).
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(prometheus_bin()),
                f"--config.file={config}",
                f"--storage.tsdb.path={data_dir}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PrometheusServer(url=url, process=process, log_path=log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                tail = server._log_tail()
                if "address already in use" in tail:
                    raise OSError(f"port {port} was taken: {tail}")
                raise AssertionError(f"Prometheus exited ({process.returncode}) before ready.\n{tail}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return server
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while starting up
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"Prometheus not ready within {READY_TIMEOUT_S} s.\n{server._log_tail()}"
                )
            time.sleep(0.1)
    except BaseException:
        _stop(process)
        raise


@contextmanager
def running_prometheus(targets: list[str], tmp_path: Path) -> Iterator[PrometheusServer]:
    """A real Prometheus on 127.0.0.1 that scrapes ``targets`` every second.

    Args:
        targets: ``host:port`` of the exporters (path ``/metrics``), e.g. ``["127.0.0.1:9464"]``.
        tmp_path: a private directory for the config, the TSDB and the log (pytest's ``tmp_path``).

    Yields:
        A ready :class:`PrometheusServer` (``.url``, ``.query()``, ``.wait_for()``); it is
        terminated, then killed if it hangs, when the block exits.
    """
    base = Path(tmp_path) / "prometheus"
    base.mkdir(parents=True, exist_ok=True)
    config = base / "prometheus.yml"
    _write_config(config, targets)
    server: PrometheusServer | None = None
    for attempt in range(3):
        try:
            server = _start(config, base / "data", base / f"prometheus-{attempt}.log")
            break
        except OSError:
            if attempt == 2:
                raise
    assert server is not None
    try:
        yield server
    finally:
        _stop(server.process)
