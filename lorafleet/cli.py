"""The ``lorafleet`` command line.

Run as:
    lorafleet train CONFIG.yaml [section.key=value ...]   fine-tune (launches torchrun/deepspeed when needed)
    lorafleet estimate CONFIG.yaml [overrides]             memory estimate, nothing trained
    lorafleet check-data CONFIG.yaml [overrides]           validate the dataset, report every bad row
    lorafleet tiny --arch llama --out .cache/tiny/llama    build an offline tiny base model
    lorafleet data --out data/                             write the bundled datasets
    lorafleet adapters [--root DIR]                        list published adapters
    lorafleet demo                                         the end-to-end demo (what `make demo` runs)
    lorafleet trainer-server [--port 50051 ...]            run the trainer gRPC service
    lorafleet submit CONFIG.yaml [overrides] [--addr A]    submit a job to the trainer service, watch it
    lorafleet jobs [--state running]                       list jobs
    lorafleet watch JOB                                    follow a job (progress bar with loss)
    lorafleet cancel JOB                                   cancel a job
    lorafleet inference-server --model NAME=PATH [...]     run the inference gRPC service
    lorafleet chat [--adapter NAME[@V]] [--message TEXT]   chat with a base model or adapter, streamed
    lorafleet generate PROMPT [--adapter NAME[@V]]         complete a raw prompt, streamed
    lorafleet models                                       base models and adapters of the service
    lorafleet load NAME[@V] / lorafleet unload NAME[@V]    load or unload an adapter explicitly
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace

from lorafleet.errors import LorafleetError


def _train(args: argparse.Namespace) -> int:
    from lorafleet.config import load_config
    from lorafleet.distributed import (
        format_command,
        launch_command,
        launch_environment,
        resolve_node_settings,
    )

    config = load_config(args.config, args.overrides)
    d = resolve_node_settings(config.distributed)
    if d.nproc_per_node * d.nnodes == 1 and d.deepspeed_stage < 0:
        from services.trainer.recipe import main as recipe_main

        return recipe_main([args.config, *args.overrides])
    cmd = launch_command(replace(d), [args.config, *args.overrides])
    print(f"launching: {format_command(cmd)}", file=sys.stderr)
    return subprocess.call(cmd, env=launch_environment())


def _estimate(args: argparse.Namespace) -> int:
    from lorafleet.config import load_config
    from lorafleet.estimate import estimate_for_config

    config = load_config(args.config, args.overrides)
    estimate = estimate_for_config(config)
    print(estimate.summary())
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from lorafleet import data
    from lorafleet.config import load_config

    config = load_config(args.config, args.overrides)
    files = [f for f in (config.data.train_file, config.data.validation_file) if f]
    for path in files:
        samples, problems = data.load_samples(path, config.data)
        print(f"{path}: {len(samples)} valid rows, {len(problems)} bad")
        for p in problems[: args.max_problems]:
            print(f"  {p}")
        data.check_bad_rows(path, len(samples) + len(problems), problems, config.data.max_bad_fraction)
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from lorafleet.tiny import main as tiny_main

    return tiny_main(args.rest)


def _data(args: argparse.Namespace) -> int:
    from lorafleet.datagen import generate_datasets

    for name, path in generate_datasets(args.out, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


def _adapters(args: argparse.Namespace) -> int:
    from lorafleet.adapters import list_adapters

    for pub in list_adapters(args.root):
        m = pub.manifest
        acc = m.metrics.get("accuracy")
        print(
            f"{pub.name}@{pub.version}\t{m.method}\t{m.template}\t{m.created_at}"
            + (f"\taccuracy={acc:.3f}" if isinstance(acc, float) else "")
            + f"\t{pub.path}"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.demo import main as demo_main

    return demo_main(args.rest)


def _client(args: argparse.Namespace) -> int:
    from services.trainer.client import main as client_main

    return client_main(args.command, args.rest)


def _trainer_server(args: argparse.Namespace) -> int:
    from services.trainer.server import main as server_main

    return server_main(args.rest)


def _inference_server(args: argparse.Namespace) -> int:
    from services.inference.server import main as server_main

    return server_main(args.rest)


def _inference_client(args: argparse.Namespace) -> int:
    from services.inference.client import main as client_main

    return client_main(args.command, args.rest)


_INFERENCE_CLIENT_COMMANDS = (
    ("chat", "chat with a base model or an adapter (REPL, or --message), streamed"),
    ("generate", "complete a raw prompt, streamed"),
    ("models", "list the inference service's base models and adapters"),
    ("load", "load an adapter into the inference service"),
    ("unload", "unload an adapter from the inference service"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (
        ("train", _train, "fine-tune a model"),
        ("estimate", _estimate, "memory estimate for a config"),
        ("check-data", _check_data, "validate a config's datasets"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="section.key=value")
        p.set_defaults(fn=fn)
        if name == "estimate":
            p.add_argument("--json", action="store_true")
        if name == "check-data":
            p.add_argument("--max-problems", type=int, default=50)
    p = sub.add_parser(
        "tiny", help="build an offline tiny base model (see `lorafleet tiny --help`)", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_tiny)
    p = sub.add_parser("data", help="write the bundled datasets")
    p.add_argument("--out", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_data)
    p = sub.add_parser("adapters", help="list published adapters")
    p.add_argument("--root", default=".cache/adapters")
    p.set_defaults(fn=_adapters)
    p = sub.add_parser("demo", help="end-to-end demo on the embedded defaults", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_demo)
    p = sub.add_parser("trainer-server", help="run the trainer gRPC service", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_trainer_server)
    for name, helptext in (
        ("submit", "submit a job to the trainer service"),
        ("jobs", "list the trainer service's jobs"),
        ("watch", "follow a job until it ends"),
        ("cancel", "cancel a job"),
    ):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=_client)
    p = sub.add_parser("inference-server", help="run the inference gRPC service", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_inference_server)
    for name, helptext in _INFERENCE_CLIENT_COMMANDS:
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=_inference_client)
    return parser


_PASS_THROUGH = {"submit": _client, "jobs": _client, "watch": _client, "cancel": _client,
                 "trainer-server": _trainer_server, "inference-server": _inference_server,
                 **{name: _inference_client for name, _ in _INFERENCE_CLIENT_COMMANDS}}  # fmt: skip
"""Commands with parsers of their own: everything after the command name goes to them unparsed."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASS_THROUGH:
        args = argparse.Namespace(command=argv[0], rest=argv[1:], fn=_PASS_THROUGH[argv[0]])
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except LorafleetError as e:
        print(f"error: {e.reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
