"""The lorafleet training recipe: fine-tune one base model with one method, then publish the result.

Run as:
    python -m services.trainer.recipe examples/lora.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 -m services.trainer.recipe examples/lora_zero2.yaml
    lorafleet train examples/lora.yaml          # launches torchrun / deepspeed per `distributed.*`

One process per device. Without DeepSpeed a multi-process run uses DDP; with
``distributed.deepspeed_stage`` >= 0 the DeepSpeed engine owns the optimizer step (ZeRO 0/1/2/3,
optional CPU offload). The loop is deliberately one explicit function: read it top to bottom.

Outputs in ``output.run_dir``: ``config.yaml`` (resolved), ``trainer_log.jsonl`` (one record per
logging step plus events), ``training_loss.png``, ``final_metrics.json``, ``checkpoints/``; the
artifact is published atomically to ``<output.adapters_root>/<output.adapter_name>/<version>/``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from lorafleet import __version__, adapters, checkpoint, data, templates
from lorafleet.config import RunConfig, load_config
from lorafleet.distributed import (
    Topology,
    all_reduce_sum,
    barrier,
    destroy_process_group,
    device_for,
    die_with_launcher,
    ensure_rendezvous_env,
    gather_objects,
    init_process_group,
    topology_from_env,
)
from lorafleet.errors import LorafleetError
from lorafleet.estimate import estimate_run, model_dims
from lorafleet.families import detect_family, get_family
from lorafleet.fastpath import causal_lm_loss, supports_label_logits
from lorafleet.method_specs import ARTIFACT_FULL_MODEL, OPTION_SECTIONS, method_spec, quantization_for
from lorafleet.methods import PreparedModel, prepare_model, save_artifact
from lorafleet.models import base_model_fingerprint, count_parameters, load_model, load_tokenizer
from lorafleet.runlog import RunRecorder, plot_loss, write_final_metrics
from lorafleet.scoring import compute_generation_metrics
from services.trainer import run_metrics

IGNORE_INDEX = -100


@dataclass
class TrainResult:
    """What one run produced. ``model`` is the trained model as it is at the end of training."""

    model: torch.nn.Module
    tokenizer: Any
    run_dir: Path
    metrics: dict[str, Any]
    published: adapters.PublishedAdapter | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Data:
    train: list[Any]
    validation: list[Any]
    validation_samples: list[Any]
    stats: dict[str, Any]
    files: list[str]


def run_id_for(config: RunConfig) -> str:
    """A stable id of this run, stored in the manifest.

    It covers the run dir, the resolved config and the *contents* of the base model and data files,
    so a restarted run finds its own already-published artifact and never publishes twice, while a
    rebuilt base model or an edited dataset under the same paths is a new run.
    """
    files = [config.data.train_file] + ([config.data.validation_file] if config.data.validation_file else [])
    payload = json.dumps(
        {
            "run_dir": str(Path(config.output.run_dir).resolve()),
            "config": config.to_dict(),
            "base_model": base_model_fingerprint(config.model.name_or_path, config.model.revision),
            "data": adapters.dataset_fingerprint([f for f in files if Path(f).is_file()])["sha256"],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_file(path: str, config: RunConfig) -> tuple[list[Any], list[Any]]:
    samples, problems = data.load_samples(path, config.data)
    return samples, problems


def _load_data(config: RunConfig, tokenizer: Any, template: Any) -> _Data:
    """Validate and tokenize the datasets; every rank does it (deterministic, cheap next to training).

    Rows that fail to parse and samples left with no answer token after truncation both count as bad;
    above ``data.max_bad_fraction`` the run refuses with one error quoting the first problems.
    """
    d = config.data
    train_samples, train_problems = _load_file(d.train_file, config)
    files = [d.train_file]
    val_samples: list[Any] = []
    val_problems: list[Any] = []
    if d.validation_file:
        val_samples, val_problems = _load_file(d.validation_file, config)
        files.append(d.validation_file)
    elif d.validation_split > 0:
        train_samples, val_samples = data.split_samples(train_samples, d.validation_split, config.train.seed)
    if d.max_samples is not None:
        train_samples = train_samples[: d.max_samples]
    train_examples, train_stats = data.tokenize_samples(train_samples, tokenizer, template, d)
    val_examples, val_stats = data.tokenize_samples(
        val_samples, tokenizer, template, replace(d, packing=False)
    )
    for path, samples, load_problems, tok_stats in (
        (d.train_file, train_samples, train_problems, train_stats),
        (d.validation_file, val_samples, val_problems, val_stats),
    ):
        if path:
            total = len(samples) + data.count_bad_rows(load_problems)
            data.check_bad_rows(path, total, [*load_problems, *tok_stats.problems], d.max_bad_fraction)
    if not train_examples:
        raise LorafleetError(
            f"data.train_file={d.train_file!r}: no sample left to train on after tokenization"
        )
    rows: list[Any] = list(train_examples)
    if d.packing:
        rows = data.pack_examples(train_examples, d.packing_length)
    stats = {
        "train_samples": len(train_samples),
        "validation_samples": len(val_samples),
        "train_rows": len(rows),
        "bad_rows": data.count_bad_rows(train_problems),
        "truncated_samples": train_stats.truncated,
        "dropped_samples": train_stats.dropped,
        "train_tokens_per_epoch": train_stats.tokens,
        "target_tokens_per_epoch": train_stats.target_tokens,
    }
    return _Data(rows, val_examples, val_samples, stats, files)


def _epoch_batches(lengths: list[int], config: RunConfig, epoch: int, topo: Topology) -> list[list[int]]:
    """This rank's micro-batches for ``epoch``: a function of (seed, epoch) only, so resume replays it.

    Every rank gets the same count (ZeRO and DDP step together); rank r takes every world_size-th
    batch, so one process with accumulation k sees the same global batches as k ranks.
    """
    t = config.train
    if t.group_by_length:
        return data.length_grouped_batches(
            lengths, t.per_device_batch_size, t.seed, epoch, topo.rank, topo.world_size
        )
    return data.shuffled_batches(
        len(lengths), t.per_device_batch_size, t.seed, epoch, topo.rank, topo.world_size
    )


def strip_stop_strings(text: str, stops: list[str]) -> str:
    """Cut generated text at the first stop string (a template's end-of-turn marker)."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def _lr_lambda(total_steps: int, warmup_steps: int, kind: str):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def _optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norms (torch's; DeepSpeed's fused Adam would JIT on CPU)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.train.learning_rate)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _evaluate_loss(
    model: torch.nn.Module,
    examples: list[Any],
    config: RunConfig,
    pad_id: int,
    topo: Topology,
    device: torch.device,
) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the validation examples, across ranks."""
    if not examples:
        return {}
    bs = config.train.per_device_batch_size
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    mine = batches[topo.rank :: topo.world_size]
    # Every rank must run the same number of forwards (ZeRO-3 gathers parameters collectively).
    n_rounds = math.ceil(len(batches) / topo.world_size)
    label_logits = config.train.label_only_logits and supports_label_logits(model)
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0.0
    for i in range(n_rounds):
        idx = mine[i] if i < len(mine) else batches[0]
        batch = _to_device(data.collate([examples[j] for j in idx], pad_id), device)
        loss = causal_lm_loss(model, batch, label_logits)
        n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if i < len(mine):
            total_loss += float(loss) * n
            total_tokens += n
    if was_training:
        model.train()
    loss_sum, tok_sum = all_reduce_sum([total_loss, total_tokens], device)
    eval_loss = loss_sum / max(tok_sum, 1.0)
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}


@torch.no_grad()
def _generate_predictions(
    model: Any,
    tokenizer: Any,
    template: Any,
    samples: list[Any],
    config: RunConfig,
    topo: Topology,
    device: torch.device,
) -> tuple[list[str], list[str]]:
    """Greedy answers to the last turn of each validation sample; all ranks generate, rank 0 gets all."""
    samples = samples[: config.train.max_eval_samples]
    if not samples:
        return [], []
    prompts = [
        templates.encode_prompt(
            template, tokenizer, s.turns[:-1], s.turns[-1][0], s.system or config.data.system
        )[-config.data.max_source_length :]
        for s in samples
    ]
    refs = [s.turns[-1][1] for s in samples]
    bs = max(1, config.train.per_device_batch_size)
    batches = [list(range(i, min(i + bs, len(samples)))) for i in range(0, len(samples), bs)]
    mine = batches[topo.rank :: topo.world_size]
    n_rounds = math.ceil(len(batches) / topo.world_size)
    zero3 = config.distributed.deepspeed_stage == 3 and topo.distributed
    stop_ids = templates.stop_token_ids(template, tokenizer)
    stops = templates.stop_strings(template, tokenizer)
    pad_id = tokenizer.pad_token_id
    model.eval()
    results: list[tuple[int, str]] = []
    for r in range(n_rounds):
        idx = mine[r] if r < len(mine) else batches[0]
        seqs = [prompts[i] for i in idx]
        width = max(len(s) for s in seqs)
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=config.train.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=stop_ids,
            synced_gpus=zero3,
        )
        if r < len(mine):
            for row, i in enumerate(idx):
                text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                results.append((i, strip_stop_strings(text, stops).strip()))
    everything = sorted(x for part in gather_objects(results) for x in part)
    return [t for _, t in everything], refs


def _gathered_state_dict(
    engine: Any, model: torch.nn.Module, config: RunConfig
) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3 parameters are partitioned: gather a full state dict on rank 0 (None elsewhere)."""
    if engine is None or config.distributed.deepspeed_stage != 3:
        return None
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    if method_spec(config.method).artifact_kind == ARTIFACT_FULL_MODEL:
        return engine._zero3_consolidated_16bit_state_dict()
    state: dict[str, torch.Tensor] = {}
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        for name, p in model.named_parameters():
            if p.requires_grad:
                state[name] = p.detach().cpu().clone()
    return state


def _weights_digest(model: torch.nn.Module, zero3: bool) -> str:
    """sha256 of this rank's full trainable weights (gathered under ZeRO-3): equal on every rank when in sync."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ctx: Any = contextlib.nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    h = hashlib.sha256()
    with ctx:
        for name, p in params:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _find_published(config: RunConfig, run_id: str) -> adapters.PublishedAdapter | None:
    if not config.output.adapter_name:
        return None
    for pub in adapters.list_adapters(config.output.adapters_root):
        if pub.name == config.output.adapter_name and pub.manifest.run_id == run_id:
            return pub
    return None


def publish_run(
    config: RunConfig,
    prepared: PreparedModel,
    tokenizer: Any,
    template_name: str,
    family: str,
    metrics: dict[str, Any],
    dataset: dict[str, Any],
    stage_hyperparameters: dict[str, Any],
    run_id: str = "",
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> adapters.PublishedAdapter:
    """Save the trained artifact and publish it atomically with its manifest, as a new version.

    Args:
        dataset: the data fingerprint and statistics for the manifest.
        stage_hyperparameters: what the stage adds to the manifest's hyperparameters (SFT: the data
            options and the DeepSpeed stage; preference stages: the stage and its options).
        extra: manifest fields of the stage (e.g. the SFT adapter a DPO run started from).
        state_dict: the weights to save when the model's own are sharded (ZeRO-3).
    """
    o = config.output
    tree = config.to_dict()
    options_section = method_spec(config.method).options_section
    staging = adapters.new_staging_dir(o.adapters_root, o.adapter_name)
    save_artifact(prepared.model, tokenizer, staging, prepared.kind, state_dict=state_dict)
    manifest = adapters.Manifest(
        name=o.adapter_name,
        version=0,
        kind=prepared.kind,
        method=config.method,
        base_model=base_model_fingerprint(config.model.name_or_path, config.model.revision),
        family=family,
        template=template_name,
        hyperparameters={
            "method_options": prepared.details,
            **{s: tree[s] if s == options_section else None for s in OPTION_SECTIONS},
            "train": tree["train"],
            "model": {"dtype": config.model.dtype, "quantization": quantization_for(config)},
            **stage_hyperparameters,
        },
        dataset=dataset,
        metrics=metrics,
        created_at=adapters.utc_now(),
        lorafleet_version=__version__,
        run_id=run_id,
        extra=extra or {},
    )
    version = None if o.version == "auto" else int(o.version)
    return adapters.publish(staging, o.adapters_root, o.adapter_name, manifest, version=version)


def run_training(config: RunConfig, progress: bool | None = None) -> TrainResult:
    """Train per ``config`` and publish; the whole run, on every rank of a distributed launch.

    Raises:
        LorafleetError: bad data, a model that cannot be loaded, an option the model cannot take.
    """
    if config.stage != "sft":  # dpo / kto / rm: their own loop (services/trainer/preference_recipe.py)
        from services.trainer.preference_recipe import run_preference

        out = run_preference(config, progress)
        return TrainResult(
            out["model"], out["tokenizer"], Path(config.output.run_dir), out["metrics"], out["published"]
        )
    die_with_launcher()
    if config.distributed.deepspeed_stage >= 0:
        ensure_rendezvous_env()
    topo = topology_from_env()
    init_process_group(topo)
    device = device_for(topo)
    t = config.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    run_dir = Path(config.output.run_dir)
    run_id = run_id_for(config)
    if topo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
        )
        checkpoint.remove_partial(run_dir)
    barrier()
    torch.manual_seed(t.seed)

    # ---- model, template, data -------------------------------------------------------------
    tokenizer = load_tokenizer(config.model)
    model_cfg = replace(config.model, quantization=quantization_for(config))
    model = load_model(model_cfg, for_training=True)
    family = (
        detect_family(model.config, config.model.name_or_path)
        if config.model.family == "auto"
        else get_family(config.model.family)
    )
    template_name = family.template if config.data.template == "auto" else config.data.template
    template = templates.get_template(template_name, tokenizer)
    ds = _load_data(config, tokenizer, template)
    prepared = prepare_model(model, config, family)
    model = prepared.model
    compute_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    # Packing must be proven to keep samples apart on this very model, before any wrapping.
    packing_mode = data.detect_packing_mode(model) if config.data.packing else "none"
    total_params, trainable_params = count_parameters(model)

    # ---- steps, records, memory estimate ---------------------------------------------------
    lengths = [len(e.input_ids) for e in ds.train]
    micro_per_epoch = len(_epoch_batches(lengths, config, 0, topo))
    if micro_per_epoch == 0:
        raise LorafleetError(
            f"data.train_file={config.data.train_file!r}: {len(lengths)} rows are fewer than one "
            f"batch per process (train.per_device_batch_size={t.per_device_batch_size}, "
            f"{topo.world_size} processes)"
        )
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * micro_per_epoch / t.gradient_accumulation_steps))
    resume_from = None
    if t.resume == "auto":
        resume_from = checkpoint.last_checkpoint(run_dir)
    elif t.resume != "never":
        resume_from = Path(t.resume)
    state = (
        checkpoint.read_state(resume_from)
        if resume_from
        else checkpoint.TrainerState(world_size=topo.world_size)
    )
    recorder = RunRecorder(
        run_dir, total_steps, is_main=topo.is_main, progress=progress, resume_step=state.global_step
    )
    if topo.local_rank == 0:  # one /metrics per node when LORAFLEET_TRAINING_METRICS_PORT is set
        node_rank = topo.rank // max(topo.local_world_size, 1)
        exporter = run_metrics.start_from_env(run_id, config.method, node_rank, topo.is_main)
        if exporter is not None and topo.is_main:
            recorder.add_listener(exporter.observe)
    mcfg = model.config
    estimate = estimate_run(config, mcfg, total_params, trainable_params, max(lengths), topo.world_size)
    recorder.write_event(
        "run_started",
        run_id=run_id,
        world_size=topo.world_size,
        method=config.method,
        template=template_name,
        family=family.name,
        total_params=total_params,
        trainable_params=trainable_params,
        total_steps=total_steps,
        data=ds.stats,
        memory_estimate=estimate.to_dict(),
    )

    # ---- already published by an earlier attempt of this very run? -------------------------
    if topo.is_main:
        done = _find_published(config, run_id)
        done_flag = [done.version if done else 0]
    else:
        done, done_flag = None, [0]
    done_flag = gather_objects(done_flag[0])[:1]
    if done_flag[0]:
        recorder.write_event("already_published", version=done_flag[0])
        recorder.close()
        barrier()
        destroy_process_group()
        return TrainResult(model, tokenizer, run_dir, {}, done, {"already_published": True})

    # ---- optimizer, scheduler, engine ------------------------------------------------------
    if quantization_for(config) == "none":
        model.to(device)  # quantized bases are placed by bitsandbytes at load time
    optimizer = _optimizer(model, config)
    warmup = int(total_steps * t.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup, t.lr_scheduler))
    engine: Any = None
    forward_model: torch.nn.Module = model
    if config.distributed.deepspeed_stage >= 0:
        import deepspeed

        from lorafleet.deepspeed_config import build_deepspeed_config

        ds_config = build_deepspeed_config(config, topo.world_size, model_dims(mcfg)["hidden_size"] or 1024)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        forward_model = engine
        if topo.is_main:
            (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    elif topo.distributed:
        forward_model = torch.nn.parallel.DistributedDataParallel(model)

    if resume_from is not None:
        if engine is not None:
            engine.load_checkpoint(str(resume_from / "deepspeed"), tag="state")
        else:
            checkpoint.load_plain(resume_from, model, optimizer, scheduler)
        checkpoint.load_rng(resume_from, topo.rank)
        recorder.write_event("resumed", step=state.global_step, checkpoint=str(resume_from))

    # ---- the loop --------------------------------------------------------------------------
    pad_id = tokenizer.pad_token_id
    collate: Any = data.collate
    if config.data.packing:
        collate = functools.partial(data.collate_packed, mode=packing_mode, mask_dtype=compute_dtype)
    accum = t.gradient_accumulation_steps
    label_logits = t.label_only_logits and supports_label_logits(forward_model)
    model.train()
    window_loss, window_micro, window_tokens = 0.0, 0, 0
    window_start = time.perf_counter()
    micro_in_step = 0
    epoch, done_in_epoch = state.epoch, state.micro_batches_done
    last_eval: dict[str, float] = {}
    loop_start, tokens_at_start = time.perf_counter(), state.tokens_seen
    while state.global_step < total_steps:
        batches = _epoch_batches(lengths, config, epoch, topo)
        while done_in_epoch < len(batches) and state.global_step < total_steps:
            idx = batches[done_in_epoch]
            done_in_epoch += 1
            batch = _to_device(collate([ds.train[i] for i in idx], pad_id), device)
            boundary = micro_in_step + 1 == accum
            sync = contextlib.nullcontext()
            if engine is None and topo.distributed and not boundary:
                sync = forward_model.no_sync()  # type: ignore[operator]
            with sync:
                # use_cache=False (inside): with a cache transformers skips packed-sequence
                # detection and packed samples would silently attend to each other.
                loss = causal_lm_loss(forward_model, batch, label_logits)
                if engine is not None:
                    engine.backward(loss)
                    engine.step()
                else:
                    (loss / accum).backward()
            window_loss += float(loss.detach())
            window_micro += 1
            window_tokens += sum(len(ds.train[i].input_ids) for i in idx)  # real tokens, no padding
            micro_in_step += 1
            if not boundary:
                continue
            micro_in_step = 0
            grad_norm: float | None = None
            if engine is None:
                params = [p for p in model.parameters() if p.requires_grad]
                norm = torch.nn.utils.clip_grad_norm_(
                    params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                )
                grad_norm = float(norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                gn = engine.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None else None
            state.global_step += 1
            state.epoch, state.micro_batches_done = epoch, done_in_epoch

            if t.eval_steps and state.global_step % t.eval_steps == 0 and state.global_step < total_steps:
                last_eval = _evaluate_loss(forward_model, ds.validation, config, pad_id, topo, device)
            if state.global_step % t.logging_steps == 0 or state.global_step == total_steps or last_eval:
                loss_sum, micro_sum, tok_sum = all_reduce_sum(
                    [window_loss, window_micro, window_tokens], device
                )
                elapsed = time.perf_counter() - window_start
                state.tokens_seen += int(tok_sum)
                record: dict[str, Any] = {
                    "step": state.global_step,
                    "epoch": round(epoch + done_in_epoch / max(len(batches), 1), 4),
                    "loss": loss_sum / max(micro_sum, 1),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "tokens_per_s": tok_sum / max(elapsed, 1e-9),
                    "tokens": state.tokens_seen,
                    **last_eval,
                }
                if grad_norm is not None and math.isfinite(grad_norm):
                    record["grad_norm"] = grad_norm
                recorder.log(record)
                window_loss, window_micro, window_tokens = 0.0, 0, 0
                window_start = time.perf_counter()
                last_eval = {}
            if t.save_steps and state.global_step % t.save_steps == 0 and state.global_step < total_steps:
                _save_checkpoint(
                    run_dir, state, model, optimizer, scheduler, engine, topo, t.save_total_limit
                )
                recorder.write_event("checkpoint_saved", step=state.global_step)
        if done_in_epoch >= len(batches):
            epoch, done_in_epoch = epoch + 1, 0

    # ---- final evaluation, generation metrics, publish --------------------------------------
    runtime = time.perf_counter() - loop_start
    metrics: dict[str, Any] = {
        "train_steps": state.global_step,
        "train_tokens": state.tokens_seen,
        "train_runtime_s": runtime,
        "train_tokens_per_s": (state.tokens_seen - tokens_at_start) / max(runtime, 1e-9),
    }
    metrics.update(_evaluate_loss(forward_model, ds.validation, config, pad_id, topo, device))
    plain = engine.module if engine is not None else model
    if t.predict_with_generate and ds.validation_samples:
        preds, refs = _generate_predictions(
            plain, tokenizer, template, ds.validation_samples, config, topo, device
        )
        if topo.is_main:
            metrics.update(compute_generation_metrics(preds, refs))
            with open(run_dir / "generated_predictions.jsonl", "w", encoding="utf-8") as f:
                for p, r in zip(preds, refs):
                    f.write(json.dumps({"predict": p, "label": r}, ensure_ascii=False) + "\n")
    records = [r for r in recorder.records() if "loss" in r]
    if records:
        metrics["train_loss"] = records[-1]["loss"]
    zero3 = engine is not None and config.distributed.deepspeed_stage == 3
    digests = gather_objects(_weights_digest(plain, zero3))
    state_dict = _gathered_state_dict(engine, plain, config)
    published = None
    if topo.is_main:
        write_final_metrics(run_dir, metrics)
        plot_loss(run_dir)
        if config.output.adapter_name:
            tree = config.to_dict()
            published = publish_run(
                config,
                prepared,
                tokenizer,
                template_name,
                family.name,
                metrics,
                {**adapters.dataset_fingerprint(ds.files), **ds.stats},
                {
                    "data": {
                        k: v for k, v in tree["data"].items() if k not in ("train_file", "validation_file")
                    },
                    "deepspeed_stage": config.distributed.deepspeed_stage,
                },
                run_id=run_id,
                state_dict=state_dict,
            )
            recorder.write_event(
                "published", name=published.name, version=published.version, path=str(published.path)
            )
    recorder.write_event("finished", metrics=metrics, weights_digest_per_rank=digests)
    recorder.close()
    barrier()
    destroy_process_group()
    return TrainResult(
        plain,
        tokenizer,
        run_dir,
        metrics,
        published,
        {
            "template": template_name,
            "family": family.name,
            "kind": prepared.kind,
            "memory_estimate": estimate.to_dict(),
            "weights_digest_per_rank": digests,
            **ds.stats,
        },
    )


def _save_checkpoint(
    run_dir: Path,
    state: checkpoint.TrainerState,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    engine: Any,
    topo: Topology,
    keep: int,
) -> None:
    stage = checkpoint.staging_path(run_dir, state.global_step)
    if topo.is_main:
        stage.mkdir(parents=True, exist_ok=True)
    barrier()
    checkpoint.save_rank_files(stage, topo.rank)
    if engine is not None:
        engine.save_checkpoint(str(stage / "deepspeed"), tag="state")
    elif topo.is_main:
        checkpoint.save_plain(stage, model, optimizer, scheduler)
    barrier()
    if topo.is_main:
        checkpoint.finalize(stage, state, keep)
    barrier()


def _leave_reason(config_path: str, reason: str) -> None:
    """Write why the job is invalid where the manager reads it, from whichever rank found it.

    Only for a managed attempt (``LORAFLEET_ATTEMPT`` set). Written to a temporary file and renamed,
    so the manager reads a whole reason or none; any rank may win, each reason is true.
    """
    from services.trainer.launchers.base import REASON_FILE, attempt_dir

    attempt = os.environ.get("LORAFLEET_ATTEMPT", "")
    if not attempt.isdigit():
        return
    directory = attempt_dir(Path(config_path), int(attempt))
    tmp = directory / f"{REASON_FILE}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_text(reason, encoding="utf-8")
        os.replace(tmp, directory / REASON_FILE)
    except OSError as e:  # the log still carries rank 0's line
        print(f"warning: cannot write {directory / REASON_FILE}: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        config = load_config(args[0], args[1:])
        result = run_training(config)
    except LorafleetError as e:
        _leave_reason(args[0], e.reason)
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {e.reason}", file=sys.stderr)
        return 2
    if topology_from_env().is_main and not result.details.get("already_published"):
        print(
            json.dumps(
                {
                    "metrics": result.metrics,
                    "published": str(result.published.path) if result.published else None,
                },
                ensure_ascii=False,
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
