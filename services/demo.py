"""The end-to-end demo on the embedded defaults (what `make demo` runs), through both services.

Run as:
    lorafleet demo [--epochs N] [--show N] [--out DIR] [--keep-running]

1. writes the bundled datasets to ``.cache/data`` and builds the offline tiny llama in
   ``.cache/tiny/llama`` if they are missing (nothing is downloaded);
2. starts the trainer service and the inference service on loopback (``lorafleet trainer-server``
   and ``lorafleet inference-server``, each its own process, sharing one adapters root);
3. submits a LoRA job on the PromptCBLUE-like task (``examples/lora.yaml``) over gRPC and follows
   it with ``WatchJob`` (progress bar with loss);
4. waits until the inference service has picked up the published adapter (no restart);
5. asks the held-out questions to the base model and to the adapter through ``Chat`` (all requests
   at once, so base and adapter rows share decode batches), prints answers side by side and both
   accuracies, and the services' addresses and metrics URLs;
6. submits a short DPO job (``examples/dpo.yaml``, stage ``dpo``) that starts from the SFT adapter
   just published, on the bundled preference task (``lorafleet.datagen.preference_tables``: the
   chosen answer tags itself with the asked letter and its check digit), and prints its held-out
   preference accuracy before and after (the fraction of held-out pairs whose chosen answer the
   model itself ranks above the rejected one);
7. chats with the DPO adapter through the inference service once it has picked it up, and shows for
   each held-out prompt which tag (chosen or rejected) the adapter prefers, scored by the service;
8. stops both services, or keeps them up with ``--keep-running`` (for ``make dashboard``) until
   Ctrl-C.

Exit status 0 when the SFT adapter's held-out accuracy beats the base model's and DPO raised the
held-out preference accuracy.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".cache" / "data"
TINY = ROOT / ".cache" / "tiny" / "llama"
DEMO_STATE = ROOT / ".cache" / "demo"
ADAPTER_NAME = "demo-cblue"
DPO_ADAPTER_NAME = "demo-dpo"
DPO_STEPS = 30
"""Steps of the demo's DPO job: enough for the tiny llama to learn the bundled preference rule."""
BASE_NAME = "tiny-llama"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class ServiceProcess:
    """One service run as ``python -m services.cli <command> ...``, its log in a file.

    The service prints ``listening on HOST:PORT`` and ``metrics on URL``; ``wait_for`` follows
    the log for a line and returns its match.
    """

    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *command],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,  # Ctrl-C on the demo reaches us, not the service; we stop it
        )

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.MULTILINE)
        while time.monotonic() < deadline:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            found = regex.search(text)
            if found:
                return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{text[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name}: no line matching {pattern!r} after {timeout:.0f} s ({self.log_path})"
        )

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _wait(what: str, ready: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _short(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _dpo_step(trainer_client: Any, istub: Any, sft_ref: str, adapters_root: Path, steps: int) -> bool:
    """Steps 6 and 7: DPO from ``sft_ref`` through the trainer, then chat with the result.

    Returns whether the held-out preference accuracy rose.
    """
    from lorafleet import adapters, templates
    from lorafleet.config import load_config
    from lorafleet.preference_data import load_preference_samples
    from lorafleet.v1 import inference_pb2 as ipb
    from lorafleet.v1 import trainer_pb2 as tpb
    from services.trainer.client import state_name, watch_with_progress
    from services.trainer.jobspec import config_to_spec

    print(f"== 6/7 DPO from {sft_ref} on the bundled preference task (examples/dpo.yaml)")
    overrides = [
        "data.template=auto",  # the SFT adapter's template (the family default)
        f"preference.sft_adapter={sft_ref}",
        f"train.max_steps={steps}",
        f"output.adapter_name={DPO_ADAPTER_NAME}",
        f"output.adapters_root={adapters_root}",
    ]
    config = load_config(ROOT / "examples" / "dpo.yaml", overrides)
    job = trainer_client.submit(config_to_spec(config), idempotency_key=f"demo-dpo-{time.time_ns()}")
    print(f"   job {job.id} {state_name(job.state)} (stage {job.spec.stage}, from {sft_ref})")
    job = watch_with_progress(trainer_client, job.id, out=sys.stdout)
    if job.state != tpb.JOB_STATE_SUCCEEDED:
        print(f"job {job.id} ended {state_name(job.state)}: {job.reason}\n{job.log_tail}", file=sys.stderr)
        return False
    m = job.final_metrics
    before, after = m.get("initial_preference_accuracy", 0.0), m.get("preference_accuracy", 0.0)
    print(f"   published {job.adapter.ref} (manifest: stage dpo, started from {sft_ref})")
    print(
        f"held-out preference accuracy: before DPO {before:.1%}   after DPO {after:.1%}   "
        f"(mean reward margin {m.get('mean_margin', float('nan')):.3f})"
    )

    print(f"== 7/7 chatting with {job.adapter.ref} through the inference service")
    dpo_ref = job.adapter.ref

    def picked_up() -> bool:
        listed = istub.ListModels(ipb.ListModelsRequest(), timeout=5)
        return any(a.ref == dpo_ref and a.state in ("available", "loaded") for a in listed.adapters)

    _wait(f"{dpo_ref} in ListModels", picked_up, 60)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY))
    template_name = adapters.get_adapter(adapters_root, DPO_ADAPTER_NAME).manifest.template
    template = templates.get_template(template_name, tokenizer)

    def sequence_logprob(prompt: str, answer: str) -> float:
        """The DPO adapter's log-probability of the templated prompt plus ``answer``, scored by the
        inference service (prompt log-probs). Two answers to one prompt differ only after the
        prompt, so the difference of two such sums is the log-ratio the preference is about."""
        ((query, response),) = templates.render_turns(template, tokenizer, [(prompt, answer)], None)
        request = ipb.GenerateRequest(
            model=BASE_NAME,
            adapter=dpo_ref,
            prompt=query + response,
            sampling=ipb.SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=0),
        )
        scored = istub.Generate(request, timeout=300).prompt_logprobs
        return sum(t.logprob for t in scored if t.HasField("logprob"))

    pairs, _ = load_preference_samples(str(config.data.validation_file), config.preference, "dpo")
    for sample in pairs[:3]:
        request = ipb.ChatRequest(
            model=BASE_NAME,
            adapter=dpo_ref,
            messages=[ipb.ChatMessage(role="user", content=sample.prompt)],
            sampling=ipb.SamplingParams(max_new_tokens=16, temperature=0.0),
        )
        reply = istub.Chat(request, timeout=300).text.strip()
        chosen, rejected = sample.chosen or "", sample.rejected or ""  # set on pairwise rows
        margin = sequence_logprob(sample.prompt, chosen) - sequence_logprob(sample.prompt, rejected)
        chosen_tag, rejected_tag = chosen.split(":")[0], rejected.split(":")[0]
        preferred, other = (chosen_tag, rejected_tag) if margin > 0 else (rejected_tag, chosen_tag)
        print(f"   user: {_short(sample.prompt, 70)}")
        print(f"   {DPO_ADAPTER_NAME}: {_short(reply, 70)}   (chosen: {_short(chosen, 30)})")
        print(
            f"   prefers {preferred} over {other} by {abs(margin):.2f} nats "
            f"(chosen {chosen_tag}, rejected {rejected_tag}: {'ok' if margin > 0 else 'x'})"
        )
    return after > before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="lorafleet demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=float, default=None, help="override train.epochs")
    ap.add_argument("--show", type=int, default=10, help="held-out questions printed side by side")
    ap.add_argument(
        "--out",
        default=None,
        help=f"directory for the services' state, runs and adapters (default: {DEMO_STATE})",
    )
    ap.add_argument(
        "--keep-running",
        action="store_true",
        help="keep both services up after the demo (for `make dashboard`) until Ctrl-C",
    )
    ap.add_argument("--dpo-steps", type=int, default=DPO_STEPS, help="steps of the DPO job; 0 skips it")
    ap.add_argument("--trainer-port", type=int, default=50051, help="used when free, else any free port")
    ap.add_argument("--inference-port", type=int, default=50052, help="used when free, else any free port")
    args = ap.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lorafleet import data
    from lorafleet.config import load_config
    from lorafleet.datagen import generate_datasets, generate_preference_datasets
    from lorafleet.scoring import exact_match
    from lorafleet.tiny import build_tiny_model
    from lorafleet.v1 import inference_pb2 as ipb
    from lorafleet.v1 import inference_pb2_grpc
    from lorafleet.v1 import trainer_pb2 as tpb
    from services.trainer.client import TrainerClient, state_name, watch_with_progress
    from services.trainer.jobspec import config_to_spec

    t0 = time.perf_counter()
    host = "127.0.0.1"
    out = Path(args.out).resolve() if args.out else DEMO_STATE
    adapters_root = out / "adapters"
    print("== 1/7 assets: bundled datasets and the offline tiny base model")
    generate_datasets(str(DATA))
    generate_preference_datasets(str(DATA))
    build_tiny_model(str(TINY), arch="llama", pretrain_steps=300)
    print(f"   data in {DATA}, base model in {TINY}")

    print("== 2/7 starting the trainer and inference services on loopback")
    tport = args.trainer_port if _port_free(host, args.trainer_port) else 0
    iport = args.inference_port if _port_free(host, args.inference_port) else 0
    trainer = ServiceProcess(
        "trainer",
        [
            "trainer-server",
            "--host",
            host,
            "--port",
            str(tport),
            "--metrics-port",
            "0",
            "--state-dir",
            str(out / "trainer"),
            "--adapters-root",
            str(adapters_root),
        ],
        out / "logs" / "trainer.log",
    )
    inference = ServiceProcess(
        "inference",
        [
            "inference-server",
            "--host",
            host,
            "--port",
            str(iport),
            "--metrics-port",
            "0",
            "--model",
            f"{BASE_NAME}={TINY}",
            "--adapters-root",
            str(adapters_root),
            "--max-batch-size",
            "32",
            "--scan-interval-s",
            "0.5",
        ],
        out / "logs" / "inference.log",
    )
    services = [trainer, inference]
    trainer_client: TrainerClient | None = None
    ichannel: grpc.Channel | None = None
    try:
        listening = r"listening on \S+:(\d+)"
        taddr = f"{host}:{trainer.wait_for(listening, 120).group(1)}"
        iaddr = f"{host}:{inference.wait_for(listening, 120).group(1)}"
        tmetrics = trainer.wait_for(r"metrics on (\S+)", 30).group(1)
        imetrics = inference.wait_for(r"metrics on (\S+)", 30).group(1)
        outcome = inference.wait_for(r"^(ready|error: base models failed to load.*)$", 600).group(1)
        if outcome != "ready":
            log_tail = inference.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise RuntimeError(f"inference server: {outcome}\n{log_tail}")
        trainer_client = TrainerClient(taddr)
        ichannel = grpc.insecure_channel(iaddr)
        istub = inference_pb2_grpc.InferenceServiceStub(ichannel)
        for addr, channel, service in (
            (taddr, trainer_client.channel, "lorafleet.v1.TrainerService"),
            (iaddr, ichannel, "lorafleet.v1.InferenceService"),
        ):
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING

            def is_serving(h: Any = health, s: str = service, want: Any = serving) -> bool:
                return h.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status == want

            _wait(f"{service} at {addr} to be SERVING", is_serving, 120, 0.2)
        print(f"   trainer   gRPC {taddr}   metrics {tmetrics}")
        print(f"   inference gRPC {iaddr}   metrics {imetrics}")

        print("== 3/7 submitting a LoRA job over gRPC (examples/lora.yaml)")
        overrides = [
            f"output.adapter_name={ADAPTER_NAME}",
            f"output.adapters_root={adapters_root}",
            # The DPO step inherits this adapter's LoRA shape, dropout included, and the preference
            # loop trains with dropout on in both the policy and the frozen reference copy: on an
            # adapter trained to convergence, that noise swamps the one-token preference signal.
            "lora.dropout=0.0",
        ]
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        config = load_config(ROOT / "examples" / "lora.yaml", overrides)
        job = trainer_client.submit(config_to_spec(config), idempotency_key=f"demo-{time.time_ns()}")
        print(f"   job {job.id} {state_name(job.state)}; {job.memory_estimate.summary}")
        job = watch_with_progress(trainer_client, job.id, out=sys.stdout)
        if job.state != tpb.JOB_STATE_SUCCEEDED:
            print(
                f"job {job.id} ended {state_name(job.state)}: {job.reason}\n{job.log_tail}", file=sys.stderr
            )
            return 1
        ref = job.adapter.ref
        print(f"   published {ref} -> {job.adapter.path}")
        print(
            "   train loss {:.3f}, eval loss {:.3f}, run records in {}".format(
                job.final_metrics.get("train_loss", float("nan")),
                job.final_metrics.get("eval_loss", float("nan")),
                job.run_dir,
            )
        )

        print("== 4/7 waiting for the inference service to pick the adapter up (no restart)")
        published_at = time.monotonic()

        def picked_up() -> bool:
            listed = istub.ListModels(ipb.ListModelsRequest(), timeout=5)
            return any(a.ref == ref and a.state in ("available", "loaded") for a in listed.adapters)

        _wait(f"{ref} in ListModels", picked_up, 60)
        print(f"   {ref} servable {time.monotonic() - published_at:.1f} s after the job ended")

        print("== 5/7 held-out questions through the inference service: base model vs adapter")
        held_out, _ = data.load_dataset(str(config.data.validation_file), config.data)
        prompts = [s.turns[-1][0] for s in held_out]
        golds = [s.turns[-1][1] for s in held_out]
        greedy = ipb.SamplingParams(max_new_tokens=config.train.max_new_tokens, temperature=0.0)

        def ask(item: tuple[str, str]) -> ipb.GenerateResponse:
            adapter, prompt = item
            request = ipb.ChatRequest(
                model=BASE_NAME,
                adapter=adapter,
                messages=[ipb.ChatMessage(role="user", content=prompt)],
                sampling=greedy,
            )
            return istub.Chat(request, timeout=300)

        asked = time.perf_counter()
        with ThreadPoolExecutor(max_workers=32) as pool:  # base and adapter rows share batches
            replies = list(pool.map(ask, [("", p) for p in prompts] + [(ref, p) for p in prompts]))
        seconds = time.perf_counter() - asked
        base_answers = [r.text.strip() for r in replies[: len(prompts)]]
        tuned_answers = [r.text.strip() for r in replies[len(prompts) :]]
        tokens = sum(r.usage.generated_tokens for r in replies)
        templates = {r.usage.template for r in replies}
        base_acc = sum(exact_match(a, g) for a, g in zip(base_answers, golds)) / len(golds)
        tuned_acc = sum(exact_match(a, g) for a, g in zip(tuned_answers, golds)) / len(golds)
        print(f"{'criterion (held out)':<42} {'gold':<10} {'base model':<22} {'adapter':<12}")
        for p, g, b, a in list(zip(prompts, golds, base_answers, tuned_answers))[: args.show]:
            sentence = p.split("\n")[1] if "\n" in p else p
            mark = "ok" if exact_match(a, g) else "x"
            print(
                f"{_short(sentence, 40):<42} {_short(g, 10):<10} {_short(b, 20):<22} {_short(a, 12):<12} {mark}"
            )
        print(
            f"\nheld-out accuracy over {len(golds)} questions: base model {base_acc:.1%}   adapter {tuned_acc:.1%}"
        )
        print(
            f"{len(replies)} chat requests in {seconds:.1f} s ({tokens} tokens, "
            f"template {', '.join(sorted(templates))}), served by {iaddr}"
        )
        learned = True
        if args.dpo_steps > 0:
            learned = _dpo_step(trainer_client, istub, ref, adapters_root, args.dpo_steps)
        print(f"trainer   gRPC {taddr}   metrics {tmetrics}")
        print(f"inference gRPC {iaddr}   metrics {imetrics}")
        print(f"logs in {out / 'logs'}; demo done in {time.perf_counter() - t0:.0f} s")
        if args.keep_running:
            print(
                "services keep running (Ctrl-C stops them); dashboard: make dashboard "
                f"LORAFLEET_TRAINER_ADDR={taddr} LORAFLEET_INFERENCE_ADDR={iaddr}",
                flush=True,
            )
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            while not stop.wait(1.0):
                if any(s.proc.poll() is not None for s in services):
                    print("a service exited; see its log", file=sys.stderr)
                    return 1
        return 0 if tuned_acc > base_acc and learned else 1
    finally:
        if trainer_client is not None:
            trainer_client.close()
        if ichannel is not None:
            ichannel.close()
        for s in services:
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
