"""The trainer gRPC service (``lorafleet.v1.TrainerService``): a thin layer over ``JobManager``.

Run as:
    python -m services.trainer.server [--port 50051] [--state-dir .cache/trainer] [--adapters-root .cache/adapters]
        [--launcher local|kubernetes] [--max-running 1] [--max-queued 100] [--max-attempts 3]
        [--metrics-port 9101] [--auth-token-file F] [--auth-scope writes|all] [--tls-cert F --tls-key F] [--allow-remote-code ID ...]
        [--data-roots DIR ...] [--model-roots DIR ...]

Every flag also reads an environment variable (LORAFLEET_TRAINER_<FLAG>, e.g. LORAFLEET_TRAINER_PORT,
LORAFLEET_TRAINER_AUTH_TOKEN). Prints ``listening on HOST:PORT`` once it serves.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from lorafleet import adapters as adapter_store
from lorafleet.errors import ConfigError, FieldProblem, LorafleetError
from lorafleet.v1 import adapters_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import grpc_util
from services.common.auth import AUTH_SCOPES, add_secret_refusal, guarded_methods, read_token
from services.common.field_errors import truncate_utf8
from services.common.interceptor import ErrorInterceptor
from services.trainer import adapter_ops, bounds
from services.trainer import store as st
from services.trainer.errors import STATUS_FOR
from services.trainer.jobspec import request_from_spec, spec_from_request
from services.trainer.manager import JobManager, ManagerSettings
from services.trainer.paths import DEFAULT_DATA_ROOTS, DEFAULT_MODEL_ROOTS, PathPolicy

log = logging.getLogger("lorafleet.trainer")
SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
MUTATING = ["SubmitJob", "CancelJob", "ImportAdapter", "ExportAdapter"]

_STATE_TO_PB = {
    st.QUEUED: trainer_pb2.JOB_STATE_QUEUED,
    st.RUNNING: trainer_pb2.JOB_STATE_RUNNING,
    st.SUCCEEDED: trainer_pb2.JOB_STATE_SUCCEEDED,
    st.FAILED: trainer_pb2.JOB_STATE_FAILED,
    st.CANCELLED: trainer_pb2.JOB_STATE_CANCELLED,
}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}


def _ts(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


MAX_JOB_BYTES = 512 * 1024
"""Serialized bytes of one ``Job`` in an answer; a larger stored job is sent trimmed."""
PAGE_BYTES = 3 * 1024 * 1024
"""Serialized bytes of the jobs of one ``ListJobs`` page, under gRPC's default 4 MiB receive limit
whatever is stored: the page ends early and its token continues after the last job sent."""
LOG_TAIL_CHARS = 8000
"""Characters of a job's log tail in an answer (the end is kept; the full log stays on disk)."""
MAX_EVENT_BYTES = 64 * 1024
"""Serialized bytes of one ``JobEvent``; a larger stored event is sent as a note instead."""
MAX_ADAPTERS_BYTES = 3 * 1024 * 1024
"""Serialized bytes of one ``ListAdapters`` answer; past it the manifests are left out."""
_REASON_CHARS = 2000


def _finite(value: Any) -> float:
    """A stored number as a double the proto can carry; raises for what is not a finite number."""
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"not a finite number: {value!r}")
    return out


def _number_map(values: Any) -> dict[str, float]:
    """The finite numeric entries of a stored mapping (others cannot travel as ``map<string, double>``)."""
    if not isinstance(values, dict):
        return {}
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out[str(key)] = _finite(value)
            except (ValueError, OverflowError):
                continue
    return out


def adapter_to_pb(published: adapter_store.PublishedAdapter) -> adapters_pb2.Adapter:
    """The adapter as the API shows it; a manifest with values the proto cannot carry still lists,
    with its name, version and path, and ``manifest_json`` saying why the rest is missing."""
    try:
        out = _adapter_to_pb(published)
        out.SerializeToString()  # strings that cannot be encoded fail here, not in gRPC
        return out
    except Exception as e:
        log.warning("adapter %s: manifest cannot be sent as stored: %s", published.ref, e)
        return adapters_pb2.Adapter(
            name=published.name,
            version=published.version,
            path=str(published.path),
            ref=published.ref,
            manifest_json=json.dumps({"unreadable": _unreadable_reason(e)}),
        )


def _unreadable_reason(e: BaseException) -> str:
    return truncate_utf8(f"stored record unreadable: {type(e).__name__}: {e}", _REASON_CHARS)


def _adapter_to_pb(published: adapter_store.PublishedAdapter) -> adapters_pb2.Adapter:
    m = published.manifest
    base = m.base_model
    metrics = _number_map(m.metrics)
    return adapters_pb2.Adapter(
        name=published.name,
        version=published.version,
        path=str(published.path),
        ref=f"{published.name}@{published.version}",
        method=m.method,
        template=m.template,
        base_model=str(base.get("id") or base.get("path") or ""),
        created_at=m.created_at,
        metrics=metrics,
        dataset_sha256=str(m.dataset.get("sha256", "")),
        run_id=m.run_id,
        manifest_json=json.dumps(m.to_dict(), ensure_ascii=False, sort_keys=True, default=str),
    )


def states_from_pb(states: Any) -> list[str]:
    """The store's state names of a ``ListJobs`` filter."""
    out = []
    for s in states:
        if s not in _PB_TO_STATE:
            names = ", ".join(trainer_pb2.JobState.Name(v) for v in _PB_TO_STATE)
            raise ConfigError([FieldProblem("states", s, f"not a job state filter; one of {names}")])
        out.append(_PB_TO_STATE[s])
    return out


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Converts protobuf to ``JobManager`` calls and back; errors become statuses in the interceptor."""

    def __init__(self, manager: JobManager, adapters_root: Path) -> None:
        self.manager = manager
        self.adapters_root = adapters_root

    def job_to_pb(self, job: st.JobRow) -> trainer_pb2.Job:
        """The job as the API shows it, at most :data:`MAX_JOB_BYTES` whatever is stored.

        A stored row the proto cannot carry (an unknown state, a number out of range, a broken
        record) becomes a job with its id, state unspecified and a reason that says so, instead of
        an error for the whole answer. An oversized one loses its log tail, then its labels and
        overrides, then everything but its id, state and times (the reason says which).
        """
        if job.unreadable:
            return _unreadable_job(job, job.unreadable)
        try:
            out = self._job_to_pb(job)
            size = len(out.SerializeToString())  # strings that cannot be encoded fail here
        except Exception as e:
            log.warning("job %s: stored record cannot be sent: %s", job.id, e)
            return _unreadable_job(job, _unreadable_reason(e))
        if size <= MAX_JOB_BYTES:
            return out
        out.log_tail = ""
        out.spec.ClearField("labels")
        out.spec.ClearField("overrides")
        note = f"[record of {size} bytes trimmed to fit an answer: log tail, labels and overrides left out]"
        out.reason = truncate_utf8(f"{note} {out.reason}", _REASON_CHARS)
        if out.ByteSize() <= MAX_JOB_BYTES:
            return out
        small = trainer_pb2.Job(
            id=out.id,
            state=out.state,
            reason=note.replace("log tail, labels and overrides", "everything but id, state and times"),
        )
        for name in ("created_at", "started_at", "finished_at"):
            if out.HasField(name):
                getattr(small, name).CopyFrom(getattr(out, name))
        return small

    def _job_to_pb(self, job: st.JobRow) -> trainer_pb2.Job:
        p = job.progress
        progress = trainer_pb2.Progress(
            step=int(p.get("step", 0)),
            total_steps=int(p.get("total_steps", 0)),
            epoch=float(p.get("epoch", 0.0)),
            percent=float(p.get("percent", 0.0)),
        )
        for key in ("loss", "eval_loss", "learning_rate", "tokens_per_s", "eta_s"):
            if p.get(key) is not None:
                setattr(progress, key, float(p[key]))
        out = trainer_pb2.Job(
            id=job.id,
            spec=spec_from_request(job.request),
            state=_STATE_TO_PB[job.state],
            idempotency_key=job.idempotency_key or "",
            created_at=_ts(job.created_at),
            started_at=_ts(job.started_at),
            finished_at=_ts(job.finished_at),
            progress=progress,
            reason=truncate_utf8(job.reason, _REASON_CHARS),
            log_tail=job.log_tail[-LOG_TAIL_CHARS:],
            final_metrics=_number_map(job.final_metrics),
            run_dir=job.run_dir,
            launcher=job.launcher,
            queue_position=self.manager.queue_position(job) if job.queue_seq else 0,
        )
        for a in job.attempts:
            attempt = trainer_pb2.Attempt(
                number=a.number,
                state=a.state,
                started_at=_ts(a.started_at),
                finished_at=_ts(a.finished_at),
                reason=a.reason,
                resumed_from_step=a.resumed_from_step,
                launcher=a.launcher,
                launcher_ref=str(a.handle.get("pid") or a.handle.get("job_name") or ""),
            )
            if a.exit_code is not None:
                attempt.exit_code = a.exit_code
            out.attempts.append(attempt)
        if job.memory_estimate:
            m = job.memory_estimate
            out.memory_estimate.CopyFrom(
                trainer_pb2.MemoryEstimate(
                    device_bytes_per_process=int(m["device_bytes_per_process"]),
                    host_bytes=int(m["host_bytes"]),
                    device=m["device"],
                    summary=m["summary"],
                )
            )
        if job.adapter_ref:
            name, _, version = job.adapter_ref.partition("@")
            try:
                out.adapter.CopyFrom(
                    adapter_to_pb(adapter_store.get_adapter(self.adapters_root, name, int(version)))
                )
            except (adapter_store.AdapterError, ValueError):
                fallback = adapters_pb2.Adapter(name=name, ref=job.adapter_ref)
                if version.isdigit() and 0 < int(version) <= adapter_store.MAX_VERSION:
                    fallback.version = int(version)
                out.adapter.CopyFrom(fallback)
        return out

    def SubmitJob(
        self, request: trainer_pb2.SubmitJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.Job:
        bounds.check_request(request)
        job_request = request_from_spec(request.spec)
        return self.job_to_pb(self.manager.submit(job_request, request.idempotency_key, request.dry_run))

    def GetJob(self, request: trainer_pb2.GetJobRequest, context: grpc.ServicerContext) -> trainer_pb2.Job:
        bounds.check_request(request)
        return self.job_to_pb(self.manager.get(request.job_id))

    def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.ListJobsResponse:
        bounds.check_request(request)
        states = states_from_pb(request.states)
        rows, token = self.manager.list_jobs(states, request.page_size, request.page_token)
        out = trainer_pb2.ListJobsResponse()
        used = 0
        for i, row in enumerate(rows):
            job = self.job_to_pb(row)
            used += job.ByteSize() + 8  # + the field's tag and length
            if i and used > PAGE_BYTES:
                # The page is full: the next one starts after the last job sent.
                return trainer_pb2.ListJobsResponse(jobs=out.jobs, next_page_token=str(rows[i - 1].queue_seq))
            out.jobs.append(job)
        out.next_page_token = token
        return out

    def CancelJob(
        self, request: trainer_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.Job:
        bounds.check_request(request)
        return self.job_to_pb(self.manager.cancel(request.job_id, request.reason))

    def WatchJob(self, request: trainer_pb2.WatchJobRequest, context: grpc.ServicerContext) -> Any:
        bounds.check_request(request)
        kinds = ("state", "metrics") if request.skip_logs else ()
        events = self.manager.follow(request.job_id, request.after_seq, kinds, context.is_active)
        yield from (event_to_pb(e) for e in events)

    def ListAdapters(
        self, request: trainer_pb2.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.ListAdaptersResponse:
        bounds.check_request(request)
        if request.name:
            adapter_store.validate_adapter_name(request.name)
        found = adapter_store.list_adapters(self.adapters_root)
        out = trainer_pb2.ListAdaptersResponse(
            adapters=[adapter_to_pb(a) for a in found if not request.name or a.name == request.name]
        )
        if out.ByteSize() > MAX_ADAPTERS_BYTES:
            for adapter in out.adapters:
                adapter.manifest_json = ""  # GetAdapter still gives each one's manifest
        return out

    def GetAdapter(self, request: trainer_pb2.GetAdapterRequest, context: grpc.ServicerContext) -> Any:
        bounds.check_request(request)
        name, version = adapter_store.parse_adapter_ref(request.ref)
        return adapter_to_pb(adapter_store.get_adapter(self.adapters_root, name, version))

    def ImportAdapter(self, request: trainer_pb2.ImportAdapterRequest, context: grpc.ServicerContext) -> Any:
        bounds.check_request(request)
        published = adapter_ops.import_from_request(
            self.adapters_root,
            request.source,
            request.name,
            request.base,
            request.template,
            self.manager.settings.path_policy,
        )
        return adapter_to_pb(published)

    def ExportAdapter(
        self, request: trainer_pb2.ExportAdapterRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.ExportAdapterResponse:
        bounds.check_request(request)
        result = adapter_ops.export_from_request(
            self.adapters_root, request.ref, request.publish_name, request.dtype
        )
        return trainer_pb2.ExportAdapterResponse(
            adapter=adapter_to_pb(result.published), notice=result.notice
        )


def event_to_pb(e: st.EventRow) -> trainer_pb2.JobEvent:
    """The event as the API shows it; a stored event the proto cannot carry, or too large to send,
    becomes a log line saying so, and the stream goes on."""
    try:
        out = _event_to_pb(e)
        size = len(out.SerializeToString())
    except Exception as exc:
        log.warning("job %s event %s: stored event cannot be sent: %s", e.job_id, e.seq, exc)
        return _note_event(e, _unreadable_reason(exc))
    if size > MAX_EVENT_BYTES:
        return _note_event(e, f"stored event of {size} bytes left out (over {MAX_EVENT_BYTES})")
    return out


def _note_event(e: st.EventRow, text: str) -> trainer_pb2.JobEvent:
    seq = e.seq if isinstance(e.seq, int) and 0 <= e.seq < 2**63 else 0
    out = trainer_pb2.JobEvent(seq=seq, job_id=str(e.job_id))
    out.log.CopyFrom(trainer_pb2.LogLine(text=text))
    return out


def _unreadable_job(job: st.JobRow, reason: str) -> trainer_pb2.Job:
    """What can be sent of a job whose stored record the proto cannot carry."""
    out = trainer_pb2.Job(
        id=truncate_utf8(str(job.id), 64),
        state=_STATE_TO_PB.get(job.state, trainer_pb2.JOB_STATE_UNSPECIFIED),
        reason=truncate_utf8(
            reason if reason.startswith("stored") else f"stored record unreadable: {reason}", _REASON_CHARS
        ),
    )
    for name in ("created_at", "started_at", "finished_at"):
        try:
            ts = _ts(getattr(job, name))
            if ts is not None:
                getattr(out, name).CopyFrom(ts)
        except (ValueError, OverflowError, TypeError):
            continue
    return out


def _event_to_pb(e: st.EventRow) -> trainer_pb2.JobEvent:
    out = trainer_pb2.JobEvent(seq=e.seq, job_id=e.job_id, time=_ts(e.time))
    p = e.payload
    if e.kind == "state":
        out.state.CopyFrom(
            trainer_pb2.StateChange(
                state=_STATE_TO_PB[p["state"]], reason=p.get("reason", ""), attempt=int(p.get("attempt", 0))
            )
        )
    elif e.kind == "metrics":
        m = trainer_pb2.MetricRecord(
            step=int(p.get("step", 0)),
            total_steps=int(p.get("total_steps", 0)),
            epoch=float(p.get("epoch", 0)),
            percent=float(p.get("percent", 0)),
            attempt=int(p.get("attempt", 0)),
            values=_number_map(p.get("values")),
        )
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "eta_s"):
            if p.get(key) is not None:
                setattr(m, key, float(p[key]))
        out.metrics.CopyFrom(m)
    else:
        out.log.CopyFrom(trainer_pb2.LogLine(attempt=int(p.get("attempt", 0)), text=p.get("text", "")))
    return out


# -- wiring -------------------------------------------------------------------------------------------


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"LORAFLEET_TRAINER_{name.upper()}", default)


def _env_list(name: str, default: tuple[str, ...]) -> list[str]:
    raw = _env(name, None)
    return list(default) if raw is None else [x for x in raw.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=_env("host", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(_env("port", 50051)), help="0 = any free port")
    ap.add_argument("--state-dir", default=_env("state_dir", ".cache/trainer"))
    ap.add_argument("--adapters-root", default=_env("adapters_root", ".cache/adapters"))
    ap.add_argument("--launcher", choices=["local", "kubernetes"], default=_env("launcher", "local"))
    ap.add_argument("--max-running", type=int, default=int(_env("max_running", 1)))
    ap.add_argument("--max-queued", type=int, default=int(_env("max_queued", 100)))
    ap.add_argument("--max-attempts", type=int, default=int(_env("max_attempts", 3)))
    ap.add_argument("--max-processes", type=int, default=int(_env("max_processes", 0)) or None)
    ap.add_argument("--poll-interval", type=float, default=float(_env("poll_interval", 0.5)))
    ap.add_argument("--cancel-grace", type=float, default=float(_env("cancel_grace", 10.0)))
    ap.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("metrics_port", -1)),
        help="serve /metrics on this port (0 = any free port, -1 = off)",
    )
    ap.add_argument(
        "--auth-token-file",
        default=_env("auth_token_file", ""),
        help="file holding the bearer token (or set LORAFLEET_TRAINER_AUTH_TOKEN)",
    )
    ap.add_argument(
        "--auth-scope",
        choices=AUTH_SCOPES,
        default=_env("auth_scope", "writes"),
        help="what the token guards: writes (SubmitJob/CancelJob) or all RPCs",
    )
    add_secret_refusal(ap, "--auth-token", "use --auth-token-file or LORAFLEET_TRAINER_AUTH_TOKEN")
    ap.add_argument("--tls-cert", default=_env("tls_cert", ""))
    ap.add_argument("--tls-key", default=_env("tls_key", ""))
    ap.add_argument(
        "--allow-remote-code",
        nargs="*",
        default=[x for x in _env("allow_remote_code", "").split(",") if x],
        help="models (ids, paths, or 'org/' prefixes) that may use trust_remote_code",
    )
    ap.add_argument(
        "--data-roots",
        nargs="*",
        default=_env_list("data_roots", DEFAULT_DATA_ROOTS),
        help="directories a job's data files must be under (default: %(default)s)",
    )
    ap.add_argument(
        "--model-roots",
        nargs="*",
        default=_env_list("model_roots", DEFAULT_MODEL_ROOTS),
        help="directories a job's local model must be under; hub ids stay allowed (default: %(default)s)",
    )
    ap.add_argument("--no-memory-check", action="store_true")
    return ap


def make_launcher(args: argparse.Namespace) -> Any:
    if args.launcher == "kubernetes":
        from services.trainer.launchers.kubernetes import K8sSettings, KubernetesLauncher

        return KubernetesLauncher(K8sSettings.from_env())
    from services.trainer.launchers.local import LocalLauncher

    return LocalLauncher.for_this_machine(args.max_processes)


class TrainerServer:
    """Everything one trainer process runs: store, manager, gRPC server, metrics endpoint."""

    def __init__(self, args: argparse.Namespace, launcher: Any | None = None) -> None:
        from services.trainer.metrics import TrainerMetrics

        self.args = args
        state_dir = Path(args.state_dir).resolve()
        adapters_root = Path(args.adapters_root).resolve()
        adapters_root.mkdir(parents=True, exist_ok=True)
        self.store = st.SQLiteJobStore(state_dir / "jobs.sqlite3")
        self.metrics = TrainerMetrics()
        self.manager = JobManager(
            self.store,
            launcher or make_launcher(args),
            ManagerSettings(
                state_dir=state_dir,
                adapters_root=adapters_root,
                max_running=args.max_running,
                max_queued=args.max_queued,
                default_max_attempts=args.max_attempts,
                poll_interval_s=args.poll_interval,
                cancel_grace_s=args.cancel_grace,
                remote_code_allow=list(args.allow_remote_code),
                check_memory=not args.no_memory_check,
                path_policy=PathPolicy.from_roots(args.data_roots, args.model_roots),
            ),
            self.metrics,
        )
        # The error interceptor goes first: it also counts what the auth interceptor refuses.
        interceptors: list[grpc.ServerInterceptor] = [ErrorInterceptor(STATUS_FOR, self._count_code)]
        token = read_token(
            os.environ.get("LORAFLEET_TRAINER_AUTH_TOKEN", ""), args.auth_token_file, "auth_token_file"
        )
        if token:
            guarded = guarded_methods(
                trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"], MUTATING, args.auth_scope
            )
            interceptors.append(grpc_util.BearerTokenInterceptor(token, guarded))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), interceptors=interceptors)
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            TrainerServicer(self.manager, adapters_root), self.server
        )
        self.health = grpc_util.add_health_and_reflection(self.server, [SERVICE])
        address = f"{args.host}:{args.port}"
        if args.tls_cert:
            self.port = self.server.add_secure_port(
                address, grpc_util.server_credentials(args.tls_cert, args.tls_key)
            )
        else:
            self.port = self.server.add_insecure_port(address)
        self.metrics_port: int | None = None
        self._metrics_server: Any = None

    def _count_code(self, method: str, code: str) -> None:
        if method == "SubmitJob" and code != "OK":
            self.metrics.submission_rejected(code)

    def start(self) -> None:
        self.manager.start()
        if self.args.metrics_port >= 0:
            self._metrics_server = self.metrics.serve(self.args.metrics_port, self.args.host)
            self.metrics_port = self.metrics.port
        self.server.start()
        grpc_util.set_serving(self.health, [SERVICE], True)

    def stop(self, grace: float = 2.0) -> None:
        grpc_util.set_serving(self.health, [SERVICE], False)
        self.server.stop(grace).wait()
        self.manager.stop()
        if self._metrics_server is not None:
            self.metrics.close()
        self.store.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        server = TrainerServer(args)
    except LorafleetError as e:
        print(f"error: {e.reason}", file=sys.stderr)
        return 2
    server.start()
    print(f"listening on {args.host}:{server.port}", flush=True)
    if server.metrics_port is not None:
        print(f"metrics on http://{args.host}:{server.metrics_port}/metrics", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
