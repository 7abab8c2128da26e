"""``lorafleet train``: one training run from the command line, without the trainer service.

Run as:
    lorafleet train CONFIG.yaml [section.key=value ...]

A single-process run without DeepSpeed runs the recipe (``services/trainer/recipe.py``) in this
process. Anything else (several processes or nodes, or a DeepSpeed stage) starts torchrun or the
DeepSpeed launcher on ``python -m services.trainer.recipe`` with the same arguments, with the
environment the ranks need (``lorafleet.distributed.launch_environment``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the recipe here or through a launcher; returns its exit status."""
    from lorafleet.config import load_config
    from lorafleet.distributed import (
        format_command,
        launch_command,
        launch_environment,
        resolve_node_settings,
    )
    from lorafleet.errors import ConfigError
    from lorafleet.method_specs import serving_problems

    parser = argparse.ArgumentParser(
        prog="lorafleet train",
        description="Fine-tune a model: torchrun or the DeepSpeed launcher when the config asks for them.",
    )
    parser.add_argument("config", help="YAML config (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied over the YAML")
    parser.add_argument(
        "--no-serving-check",
        action="store_true",
        help="train even what lorafleet's inference service cannot serve yet (to export or use elsewhere)",
    )
    args = parser.parse_args(argv)
    recipe_args = [args.config, *args.overrides]
    config = load_config(args.config, args.overrides)
    unservable = serving_problems(config)
    if unservable and not args.no_serving_check:  # refused before training, as SubmitJob refuses it
        raise ConfigError(
            unservable,
            context="the inference service cannot serve what this run would publish "
            "(--no-serving-check trains it anyway, to export or serve elsewhere)",
        )
    if unservable:
        print("warning: lorafleet's inference service cannot serve this artifact yet", file=sys.stderr)
    topology = resolve_node_settings(config.distributed)
    if topology.nproc_per_node * topology.nnodes == 1 and topology.deepspeed_stage < 0:
        from services.trainer.recipe import main as recipe_main

        return recipe_main(recipe_args)
    cmd = launch_command(topology, recipe_args)
    print(f"launching: {format_command(cmd)}", file=sys.stderr)
    return subprocess.call(cmd, env=launch_environment())
