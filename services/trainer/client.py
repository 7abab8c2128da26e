"""Command-line client of the trainer service: ``lorafleet submit | jobs | watch | cancel``.

The address, token and TLS CA come from flags or LORAFLEET_TRAINER_ADDR, LORAFLEET_TRAINER_TOKEN
(or a file: --token-file, LORAFLEET_TRAINER_TOKEN_FILE),
LORAFLEET_TRAINER_TLS_CA. ``submit`` takes the same YAML run config and ``key=value`` overrides as
``lorafleet train``, so a run that works by hand is submitted unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

import grpc

from lorafleet.errors import LorafleetError
from lorafleet.v1 import trainer_pb2 as pb
from lorafleet.v1 import trainer_pb2_grpc
from services.common.auth import add_secret_refusal, read_token
from services.common.field_errors import field_violations
from services.common.grpc_util import channel

_STATE_NAMES = {v: k.removeprefix("JOB_STATE_").lower() for k, v in pb.JobState.items()}


def add_connection_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--addr", default=os.environ.get("LORAFLEET_TRAINER_ADDR", "127.0.0.1:50051"))
    ap.add_argument(
        "--token-file",
        default=os.environ.get("LORAFLEET_TRAINER_TOKEN_FILE", ""),
        help="file holding the bearer token (or set LORAFLEET_TRAINER_TOKEN)",
    )
    add_secret_refusal(ap, "--token", "use --token-file or LORAFLEET_TRAINER_TOKEN")
    ap.add_argument("--tls-ca", default=os.environ.get("LORAFLEET_TRAINER_TLS_CA", ""))


class TrainerClient:
    """A small typed wrapper over the stub; the bearer token (if any) goes with every call, so it
    also works against a server whose token guards reads (``--auth-scope all``)."""

    def __init__(self, addr: str, token: str = "", tls_ca: str = "") -> None:
        self.channel = channel(addr, tls_ca or None, token=token)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def submit(self, spec: pb.JobSpec, idempotency_key: str = "", dry_run: bool = False) -> pb.Job:
        request = pb.SubmitJobRequest(spec=spec, idempotency_key=idempotency_key, dry_run=dry_run)
        return self.stub.SubmitJob(request)

    def get(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id))

    def list(self, states: list[Any] | None = None) -> list[pb.Job]:
        jobs: list[pb.Job] = []
        token = ""
        while True:
            page = self.stub.ListJobs(
                pb.ListJobsRequest(states=states or [], page_size=200, page_token=token)
            )
            jobs += page.jobs
            token = page.next_page_token
            if not token:
                return jobs

    def cancel(self, job_id: str, reason: str = "") -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id, reason=reason))

    def watch(self, job_id: str, skip_logs: bool = True) -> Iterator[pb.JobEvent]:
        yield from self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, skip_logs=skip_logs))

    def close(self) -> None:
        self.channel.close()


def state_name(state: int) -> str:
    return _STATE_NAMES.get(state, str(state))


_PREFERENCE_POSTFIX = {"rewards/margins": "margin", "rewards/accuracies": "acc"}


def watch_with_progress(client: TrainerClient, job_id: str, out: Any = sys.stderr) -> pb.Job:
    """Follow a job with a progress bar (step, loss, tokens/s; reward margin and preference accuracy
    for a preference job) until it ends; returns the final job."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", file=out, dynamic_ncols=True)
    try:
        for ev in client.watch(job_id):
            kind = ev.WhichOneof("event")
            if kind == "state":
                bar.write(f"[{job_id}] {state_name(ev.state.state)}: {ev.state.reason}")
            elif kind == "metrics":
                m = ev.metrics
                if m.total_steps and bar.total != m.total_steps:
                    bar.total = m.total_steps
                bar.n = m.step
                post = {"loss": f"{m.loss:.4f}"} if m.HasField("loss") else {}
                if m.HasField("tokens_per_s"):
                    post["tok/s"] = f"{m.tokens_per_s:.0f}"
                for key, short in _PREFERENCE_POSTFIX.items():  # a dpo, kto or rm job's own figures
                    if key in m.values:
                        post[short] = f"{m.values[key]:.3f}"
                if m.attempt > 1:
                    post["attempt"] = str(m.attempt)
                bar.set_postfix(post, refresh=False)
                bar.refresh()
    finally:
        bar.close()
    return client.get(job_id)


def print_rpc_error(err: grpc.RpcError, out: Any = None) -> None:
    """``error: CODE: message``; for a refused spec, its headline and then one line per field problem
    (from the status details, so the message text is never parsed)."""
    out = out or sys.stderr
    details = (err.details() or "") if isinstance(err, grpc.Call) else str(err)
    code = err.code().name if isinstance(err, grpc.Call) else "UNKNOWN"
    violations = field_violations(err)
    if not violations:
        print(f"error: {code}: {details}", file=out)
        return
    print(f"error: {code}: {details.splitlines()[0] if details else 'invalid request'}", file=out)
    for v in violations:
        print(f"  - {v.description}", file=out)


def _print_job(job: pb.Job) -> None:
    p = job.progress
    loss = f"{p.loss:.4f}" if p.HasField("loss") else "-"
    progress = f"{p.step}/{p.total_steps}" if p.total_steps else "-"
    adapter = job.adapter.ref or job.spec.adapter_name or "-"
    print(
        f"{job.id:<14} {state_name(job.state):<10} {progress:>11} {loss:>8}  {adapter:<24} {job.reason[:60]}"
    )


def main(command: str, argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"lorafleet {command}")
    add_connection_args(ap)
    if command == "submit":
        ap.add_argument("config")
        ap.add_argument("overrides", nargs="*")
        ap.add_argument("--idempotency-key", default="")
        ap.add_argument("--dry-run", action="store_true")
        ap.add_argument("--max-attempts", type=int, default=None)
        ap.add_argument("--no-watch", action="store_true", help="return once queued")
        ap.add_argument(
            "--gpus-per-node",
            type=int,
            default=None,
            help="GPUs per node (resources.gpus_per_node; one training process per GPU unless "
            "distributed.nproc_per_node says otherwise)",
        )
    elif command == "jobs":
        ap.add_argument(
            "--state",
            action="append",
            default=[],
            choices=[n for n in _STATE_NAMES.values() if n != "unspecified"],
        )
    elif command in ("watch", "cancel"):
        ap.add_argument("job_id")
        if command == "cancel":
            ap.add_argument("--reason", default="")
    args = ap.parse_args(argv)
    try:
        token = read_token(os.environ.get("LORAFLEET_TRAINER_TOKEN", ""), args.token_file, "token_file")
    except LorafleetError as e:
        print(f"error: {e.reason}", file=sys.stderr)
        return 2
    client = TrainerClient(args.addr, token, args.tls_ca)
    try:
        if command == "submit":
            from lorafleet.config import load_config
            from services.trainer.jobspec import config_to_spec

            spec = config_to_spec(load_config(args.config, args.overrides))
            if args.max_attempts:
                spec.max_attempts = args.max_attempts
            if args.gpus_per_node is not None:
                spec.resources.gpus_per_node = args.gpus_per_node
            job = client.submit(spec, args.idempotency_key, args.dry_run)
            print(f"{'validated' if args.dry_run else 'submitted'} job {job.id} ({state_name(job.state)})")
            if job.memory_estimate.summary:
                print(job.memory_estimate.summary)
            if args.dry_run or args.no_watch:
                return 0
            final = watch_with_progress(client, job.id)
        elif command == "jobs":
            states = [pb.JobState.Value("JOB_STATE_" + s.upper()) for s in args.state]
            print(f"{'JOB':<14} {'STATE':<10} {'STEP':>11} {'LOSS':>8}  {'ADAPTER':<24} REASON")
            for job in client.list(states):
                _print_job(job)
            return 0
        elif command == "cancel":
            _print_job(client.cancel(args.job_id, args.reason))
            return 0
        else:
            final = watch_with_progress(client, args.job_id)
        _print_job(final)
        if final.state == pb.JOB_STATE_FAILED and final.log_tail:
            print(final.log_tail, file=sys.stderr)
        return 0 if final.state == pb.JOB_STATE_SUCCEEDED else 1
    except grpc.RpcError as e:
        print_rpc_error(e)
        return 2
    finally:
        client.close()
