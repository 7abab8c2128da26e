"""The ``lorafleet`` command line: one entry point for the core's and the services' commands.

Run as:
    lorafleet COMMAND [ARGS ...]             (the console script)
    python -m services.cli COMMAND [ARGS ...]
    lorafleet --help                         every command, with its synopsis
    lorafleet COMMAND --help                 that command's flags

Each command is a ``main(argv) -> int`` in the module that owns its work: the core's commands in
``lorafleet`` (they need nothing else), the services' commands with their service. ``COMMANDS`` names
them by module path and imports only the one that runs, so ``lorafleet estimate`` never loads gRPC
and the core never imports the services.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from lorafleet.errors import LorafleetError


@dataclass(frozen=True)
class Command:
    """One ``lorafleet`` command."""

    name: str
    """What the user types after ``lorafleet``."""
    target: str
    """``module:function`` that runs it, imported when the command runs."""
    synopsis: str
    """Its arguments in short, shown by ``lorafleet --help``."""
    help: str
    """What it does, in a few words."""
    shared: bool = False
    """The function serves several commands and takes the command name first: ``f(name, argv)``."""

    def resolve(self) -> Callable[[list[str]], int]:
        """The function that runs this command with its arguments."""
        module, _, function = self.target.partition(":")
        fn = getattr(importlib.import_module(module), function)
        if self.shared:
            return lambda argv: int(fn(self.name, argv) or 0)
        return lambda argv: int(fn(argv) or 0)


_TRAINER_CLIENT = "services.trainer.client:main"
_INFERENCE_CLIENT = "services.inference.client:main"

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "train",
            "services.trainer.train:main",
            "CONFIG.yaml [section.key=value ...]",
            "fine-tune (launches torchrun/deepspeed when the config asks)",
        ),
        Command(
            "estimate",
            "lorafleet.cli:estimate_main",
            "CONFIG.yaml [overrides] [--json]",
            "memory estimate, nothing trained",
        ),
        Command(
            "check-data",
            "lorafleet.cli:check_data_main",
            "CONFIG.yaml [overrides]",
            "validate the datasets, report every bad row",
        ),
        Command(
            "tiny",
            "lorafleet.tiny:main",
            "--arch llama --out .cache/tiny/llama",
            "build an offline tiny base model",
        ),
        Command(
            "convert",
            "lorafleet.convert:main",
            "SRC_DIR OUT_DIR [--dtype bf16]",
            "convert a Baichuan2/ChatGLM3 checkpoint to native transformers (no remote code)",
        ),
        Command(
            "export",
            "lorafleet.export:main",
            "NAME[@V] (--layout original --out DIR | --merge [--dtype bf16] (--out DIR | --publish NAME))",
            "merge an adapter into its base as a standalone HF model, or write a Baichuan/ChatGLM "
            "adapter in the original key layout",
        ),
        Command("data", "lorafleet.cli:data_main", "--out data/", "write the bundled datasets"),
        Command(
            "adapters",
            "lorafleet.cli:adapters_main",
            "[--root DIR] | import SRC --name NAME [--base B] [--template T]",
            "list published adapters, or import a PEFT adapter made elsewhere (checked, safetensors)",
        ),
        Command(
            "demo",
            "services.demo:main",
            "[--keep-running]",
            "the end-to-end demo through both services (what `make demo` runs)",
        ),
        Command(
            "trainer-server",
            "services.trainer.server:main",
            "[--port 50051 ...]",
            "run the trainer gRPC service",
        ),
        Command(
            "submit",
            _TRAINER_CLIENT,
            "CONFIG.yaml [overrides] [--addr A]",
            "submit a job to the trainer service and follow it",
            shared=True,
        ),
        Command("jobs", _TRAINER_CLIENT, "[--state running]", "list the trainer service's jobs", shared=True),
        Command(
            "watch",
            _TRAINER_CLIENT,
            "JOB",
            "follow a job until it ends (progress bar with loss)",
            shared=True,
        ),
        Command("cancel", _TRAINER_CLIENT, "JOB", "cancel a job", shared=True),
        Command(
            "inference-server",
            "services.inference.server:main",
            "--model NAME=PATH [...]",
            "run the inference gRPC service",
        ),
        Command(
            "chat",
            _INFERENCE_CLIENT,
            "[--adapter NAME[@V]] [--message TEXT]",
            "chat with a base model or an adapter (REPL, or --message), streamed",
            shared=True,
        ),
        Command(
            "generate",
            _INFERENCE_CLIENT,
            "PROMPT [--adapter NAME[@V]]",
            "complete a raw prompt, streamed",
            shared=True,
        ),
        Command(
            "score",
            _INFERENCE_CLIENT,
            "--adapter RM[@V] --prompt TEXT RESPONSE [...]",
            "score responses with a reward model, best first (best-of-n)",
            shared=True,
        ),
        Command(
            "models",
            _INFERENCE_CLIENT,
            "",
            "list the inference service's base models and adapters",
            shared=True,
        ),
        Command(
            "load", _INFERENCE_CLIENT, "NAME[@V]", "load an adapter into the inference service", shared=True
        ),
        Command(
            "unload",
            _INFERENCE_CLIENT,
            "NAME[@V]",
            "unload an adapter from the inference service",
            shared=True,
        ),
    )
}
"""Every command, in the order ``lorafleet --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the command name; everything after it goes to the command's own parser."""
    width = max(len(c.name) + len(c.synopsis) for c in COMMANDS.values()) + 3
    listing = "\n".join(f"  {f'{c.name} {c.synopsis}':<{width}}{c.help}" for c in COMMANDS.values())
    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Fine-tune open LLMs as jobs of a gRPC service and serve many adapters over one base.",
        epilog=f"commands:\n{listing}\n\n`lorafleet COMMAND --help` shows a command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a ``LorafleetError`` becomes ``error: <reason>`` and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    build_parser().parse_args(argv[:1])
    run = COMMANDS[argv[0]].resolve()
    # A command's parser without a prog of its own names itself after argv[0].
    program, sys.argv[0] = sys.argv[0], f"lorafleet {argv[0]}"
    try:
        return run(argv[1:])
    except LorafleetError as e:
        print(f"error: {e.reason}", file=sys.stderr)
        return 2
    finally:
        sys.argv[0] = program


if __name__ == "__main__":
    sys.exit(main())
