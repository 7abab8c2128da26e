"""The core library's commands: the ones that need nothing but ``lorafleet`` itself.

Each is a ``main(argv) -> int`` with its own parser; the ``lorafleet`` entry point
(``services/cli.py``) dispatches to them by name, as it does to the services' commands:

    lorafleet estimate CONFIG.yaml [section.key=value ...] [--json]   memory estimate, nothing trained
    lorafleet check-data CONFIG.yaml [overrides]                     validate the datasets, every bad row
    lorafleet data --out data/                                       write the bundled datasets
    lorafleet adapters [--root DIR]                                  list published adapters
    lorafleet adapters import SRC --name NAME [--base B] [--template T]   import a PEFT adapter

``lorafleet tiny`` is ``lorafleet.tiny.main``.
"""

from __future__ import annotations

import argparse
import json


def _config_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"lorafleet {command}", description=description)
    parser.add_argument("config", help="YAML config (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied over the YAML")
    return parser


def estimate_main(argv: list[str] | None = None) -> int:
    """``lorafleet estimate``: print the memory estimate of a config; nothing is loaded or trained."""
    from lorafleet.config import load_config
    from lorafleet.estimate import estimate_for_config

    parser = _config_parser("estimate", "Memory estimate for a config; nothing is loaded or trained.")
    parser.add_argument("--json", action="store_true", help="also print the estimate as JSON")
    args = parser.parse_args(argv)
    estimate = estimate_for_config(load_config(args.config, args.overrides))
    print(estimate.summary())
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
    return 0


def check_data_main(argv: list[str] | None = None) -> int:
    """``lorafleet check-data``: validate a config's datasets and print every bad row.

    Raises:
        DatasetError: a file is unreadable, or its share of bad rows is above
            ``data.max_bad_fraction``.
    """
    from lorafleet import data
    from lorafleet.config import load_config

    parser = _config_parser("check-data", "Validate a config's datasets, reporting every bad row.")
    parser.add_argument("--max-problems", type=int, default=50, help="problems printed per file")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    files = [f for f in (config.data.train_file, config.data.validation_file) if f]
    for path in files:
        samples, problems = data.load_samples(path, config.data)
        print(f"{path}: {len(samples)} valid rows, {len(problems)} bad")
        for p in problems[: args.max_problems]:
            print(f"  {p}")
        data.check_bad_rows(path, len(samples) + len(problems), problems, config.data.max_bad_fraction)
    return 0


def data_main(argv: list[str] | None = None) -> int:
    """``lorafleet data``: write the bundled datasets (SFT and preference) and print where each went."""
    from lorafleet.datagen import generate_datasets, generate_preference_datasets

    parser = argparse.ArgumentParser(prog="lorafleet data", description="Write the bundled datasets.")
    parser.add_argument("--out", default="data", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = {
        **generate_datasets(args.out, seed=args.seed),
        **generate_preference_datasets(args.out, args.seed),
    }
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def adapters_main(argv: list[str] | None = None) -> int:
    """``lorafleet adapters``: one line per published adapter version, from its manifest;
    ``lorafleet adapters import SRC --name NAME ...`` imports a PEFT adapter (``lorafleet.adapter_import``)."""
    import sys

    from lorafleet.adapters import list_adapters

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import"]:
        from lorafleet.adapter_import import main as import_main

        return import_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="lorafleet adapters",
        description="List published adapters; `lorafleet adapters import --help` imports a PEFT adapter.",
    )
    parser.add_argument("--root", default=".cache/adapters", help="adapters root")
    args = parser.parse_args(argv)
    for pub in list_adapters(args.root):
        m = pub.manifest
        acc = m.metrics.get("accuracy")
        print(
            f"{pub.name}@{pub.version}\t{m.method}\t{m.template}\t{m.created_at}"
            + (f"\taccuracy={acc:.3f}" if isinstance(acc, float) else "")
            + (f"\tsource={m.source['kind']}" if m.source.get("kind") else "")
            + f"\t{pub.path}"
        )
    return 0
