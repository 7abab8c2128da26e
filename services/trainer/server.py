"""The trainer gRPC service (``lorafleet.v1.TrainerService``): a thin layer over ``JobManager``.

Run as:
    python -m services.trainer.server [--port 50051] [--state-dir .cache/trainer] [--adapters-root .cache/adapters]
        [--launcher local|kubernetes] [--max-running 1] [--max-queued 100] [--max-attempts 3]
        [--metrics-port 9101] [--auth-token TOKEN] [--tls-cert F --tls-key F] [--allow-remote-code ID ...]

Every flag also reads an environment variable (LORAFLEET_TRAINER_<FLAG>, e.g. LORAFLEET_TRAINER_PORT,
LORAFLEET_TRAINER_AUTH_TOKEN). Prints ``listening on HOST:PORT`` once it serves.
"""

from __future__ import annotations

import argparse
import json
import logging
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
from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.v1 import adapters_pb2, trainer_pb2, trainer_pb2_grpc
from services.common import grpc_util
from services.common.interceptor import ErrorInterceptor
from services.trainer import store as st
from services.trainer.errors import STATUS_FOR
from services.trainer.jobspec import request_from_spec, spec_from_request
from services.trainer.manager import JobManager, ManagerSettings

log = logging.getLogger("lorafleet.trainer")
SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
MUTATING = [f"/{SERVICE}/SubmitJob", f"/{SERVICE}/CancelJob"]

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


def adapter_to_pb(published: adapter_store.PublishedAdapter) -> adapters_pb2.Adapter:
    m = published.manifest
    base = m.base_model
    metrics = {k: float(v) for k, v in (m.metrics or {}).items() if isinstance(v, (int, float))}
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
        manifest_json=json.dumps(m.to_dict(), ensure_ascii=False, sort_keys=True),
    )


def states_from_pb(states: Any) -> list[str]:
    """The store's state names of a ``ListJobs`` filter."""
    out = []
    for s in states:
        if s not in _PB_TO_STATE:
            raise ConfigError(
                [FieldProblem("states", trainer_pb2.JobState.Name(s), "not a job state filter")]
            )
        out.append(_PB_TO_STATE[s])
    return out


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Converts protobuf to ``JobManager`` calls and back; errors become statuses in the interceptor."""

    def __init__(self, manager: JobManager, adapters_root: Path) -> None:
        self.manager = manager
        self.adapters_root = adapters_root

    def job_to_pb(self, job: st.JobRow) -> trainer_pb2.Job:
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
            reason=job.reason,
            log_tail=job.log_tail,
            final_metrics=job.final_metrics,
            run_dir=job.run_dir,
            launcher=job.launcher,
            queue_position=self.manager.queue_position(job) if job.queue_seq else 0,
        )
        for a in job.attempts:
            attempt = trainer_pb2.Attempt(
                number=a.number, state=a.state, started_at=_ts(a.started_at), finished_at=_ts(a.finished_at),
                reason=a.reason, resumed_from_step=a.resumed_from_step, launcher=a.launcher,
                launcher_ref=str(a.handle.get("pid") or a.handle.get("job_name") or ""),
            )  # fmt: skip
            if a.exit_code is not None:
                attempt.exit_code = a.exit_code
            out.attempts.append(attempt)
        if job.memory_estimate:
            m = job.memory_estimate
            out.memory_estimate.CopyFrom(trainer_pb2.MemoryEstimate(
                device_bytes_per_process=int(m["device_bytes_per_process"]), host_bytes=int(m["host_bytes"]),
                device=m["device"], summary=m["summary"],
            ))  # fmt: skip
        if job.adapter_ref:
            name, _, version = job.adapter_ref.partition("@")
            try:
                out.adapter.CopyFrom(
                    adapter_to_pb(adapter_store.get_adapter(self.adapters_root, name, int(version)))
                )
            except adapter_store.AdapterError:
                out.adapter.CopyFrom(
                    adapters_pb2.Adapter(name=name, version=int(version), ref=job.adapter_ref)
                )
        return out

    def SubmitJob(
        self, request: trainer_pb2.SubmitJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.Job:
        job_request = request_from_spec(request.spec)
        return self.job_to_pb(self.manager.submit(job_request, request.idempotency_key, request.dry_run))

    def GetJob(self, request: trainer_pb2.GetJobRequest, context: grpc.ServicerContext) -> trainer_pb2.Job:
        return self.job_to_pb(self.manager.get(request.job_id))

    def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.ListJobsResponse:
        states = states_from_pb(request.states)
        rows, token = self.manager.list_jobs(states, request.page_size, request.page_token)
        return trainer_pb2.ListJobsResponse(jobs=[self.job_to_pb(r) for r in rows], next_page_token=token)

    def CancelJob(
        self, request: trainer_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.Job:
        return self.job_to_pb(self.manager.cancel(request.job_id, request.reason))

    def WatchJob(self, request: trainer_pb2.WatchJobRequest, context: grpc.ServicerContext) -> Any:
        kinds = ("state", "metrics") if request.skip_logs else ()
        events = self.manager.follow(request.job_id, request.after_seq, kinds, context.is_active)
        yield from (event_to_pb(e) for e in events)

    def ListAdapters(
        self, request: trainer_pb2.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.ListAdaptersResponse:
        if request.name:
            adapter_store.validate_adapter_name(request.name)
        found = adapter_store.list_adapters(self.adapters_root)
        return trainer_pb2.ListAdaptersResponse(
            adapters=[adapter_to_pb(a) for a in found if not request.name or a.name == request.name]
        )

    def GetAdapter(self, request: trainer_pb2.GetAdapterRequest, context: grpc.ServicerContext) -> Any:
        name, version = adapter_store.parse_adapter_ref(request.ref)
        return adapter_to_pb(adapter_store.get_adapter(self.adapters_root, name, version))


def event_to_pb(e: st.EventRow) -> trainer_pb2.JobEvent:
    out = trainer_pb2.JobEvent(seq=e.seq, job_id=e.job_id, time=_ts(e.time))
    p = e.payload
    if e.kind == "state":
        out.state.CopyFrom(trainer_pb2.StateChange(state=_STATE_TO_PB[p["state"]], reason=p.get("reason", ""),
                                                   attempt=int(p.get("attempt", 0))))  # fmt: skip
    elif e.kind == "metrics":
        m = trainer_pb2.MetricRecord(
            step=int(p.get("step", 0)), total_steps=int(p.get("total_steps", 0)), epoch=float(p.get("epoch", 0)),
            percent=float(p.get("percent", 0)), attempt=int(p.get("attempt", 0)), values=p.get("values", {}),
        )  # fmt: skip
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
    ap.add_argument("--metrics-port", type=int, default=int(_env("metrics_port", -1)),
                    help="serve /metrics on this port (0 = any free port, -1 = off)")  # fmt: skip
    ap.add_argument("--auth-token", default=_env("auth_token", ""), help="require it for SubmitJob/CancelJob")
    ap.add_argument("--tls-cert", default=_env("tls_cert", ""))
    ap.add_argument("--tls-key", default=_env("tls_key", ""))
    ap.add_argument("--allow-remote-code", nargs="*", default=[x for x in _env("allow_remote_code", "").split(",") if x],
                    help="models (ids, paths, or 'org/' prefixes) that may use trust_remote_code")  # fmt: skip
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
                state_dir=state_dir, adapters_root=adapters_root, max_running=args.max_running,
                max_queued=args.max_queued, default_max_attempts=args.max_attempts,
                poll_interval_s=args.poll_interval, cancel_grace_s=args.cancel_grace,
                remote_code_allow=list(args.allow_remote_code), check_memory=not args.no_memory_check,
            ),
            self.metrics,
        )  # fmt: skip
        # The error interceptor goes first: it also counts what the auth interceptor refuses.
        interceptors: list[grpc.ServerInterceptor] = [ErrorInterceptor(STATUS_FOR, self._count_code)]
        if args.auth_token:
            interceptors.append(grpc_util.BearerTokenInterceptor(args.auth_token, MUTATING))
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
    server = TrainerServer(args)
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
