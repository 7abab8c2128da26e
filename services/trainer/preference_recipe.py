"""The preference stages of the training recipe: DPO (and IPO / ORPO / SimPO), KTO, reward models.

Run as (``services.trainer.recipe`` dispatches here when ``stage`` is not ``sft``):
    python -m services.trainer.recipe examples/dpo.yaml [section.key=value ...]

One process per device, as SFT: plain PyTorch, DDP across processes, or DeepSpeed ZeRO 0-3 when
``distributed.deepspeed_stage`` >= 0 (the engine owns the optimizer step). The loop
is one explicit function. The reference policy: for the LoRA methods the base with the adapter
disabled, or, when ``preference.sft_adapter`` names a published SFT adapter to start from, a frozen
copy of it (adapter ``ref``; the trained adapter starts as that copy). For ``full``/``freeze`` a
second, frozen model is loaded (``preference.precompute_reference`` scores the data with it once,
then frees it). ``rm`` trains a scalar value head (sequence classification, last non-padding token)
plus LoRA on the base.

Outputs in ``output.run_dir``: ``config.yaml``, ``trainer_log.jsonl`` (per step: loss,
rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected,
learning_rate), ``final_metrics.json`` (held-out preference accuracy and mean margin, before and
after); the artifact is published like any other, its manifest recording the stage and the SFT
adapter it started from.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from lorafleet import adapters, preference, preference_data, templates
from lorafleet.config import RunConfig
from lorafleet.data import check_bad_rows, count_bad_rows
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
from lorafleet.errors import ConfigError, FieldProblem, LorafleetError
from lorafleet.estimate import model_dims
from lorafleet.families import detect_family, get_family
from lorafleet.method_specs import (
    ARTIFACT_FULL_MODEL,
    TRAINS_LORA,
    method_spec,
    quantization_for,
)
from lorafleet.methods import PreparedModel, prepare_model
from lorafleet.models import (
    base_model_fingerprint,
    count_parameters,
    fingerprints_match,
    load_model,
    load_tokenizer,
)
from lorafleet.runlog import RunRecorder, write_final_metrics
from services.trainer import run_metrics
from services.trainer.recipe import (
    _gathered_state_dict,
    _to_device,
    _weights_digest,
    publish_run,
    run_id_for,
)

_EVAL_BATCH = 16


def _load_split(
    config: RunConfig, tokenizer: Any, template: Any
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Train and held-out examples (validation_file, else a validation_split of train), checked."""
    d, stage = config.data, config.stage
    samples, problems = preference_data.load_preference_samples(d.train_file, config.preference, stage)
    held: list[Any] = []
    held_problems: list[Any] = []
    if d.validation_file:
        held, held_problems = preference_data.load_preference_samples(
            d.validation_file, config.preference, stage
        )
    elif d.validation_split > 0:
        order = list(range(len(samples)))
        random.Random(config.train.seed).shuffle(order)
        cut = max(1, int(len(samples) * d.validation_split))
        held, samples = [samples[i] for i in order[:cut]], [samples[i] for i in order[cut:]]
    if d.max_samples is not None:
        samples = samples[: d.max_samples]
    train, train_stats = preference_data.tokenize_preference(samples, tokenizer, template, d)
    val, val_stats = preference_data.tokenize_preference(held, tokenizer, template, d)
    for path, rows, bad, stats in (
        (d.train_file, samples, problems, train_stats),
        (d.validation_file, held, held_problems, val_stats),
    ):
        if path:
            check_bad_rows(path, len(rows) + count_bad_rows(bad), [*bad, *stats.problems], d.max_bad_fraction)
    if not train:
        raise LorafleetError(f"data.train_file={d.train_file!r}: no preference row left to train on")
    return (
        train,
        val,
        {
            "train_samples": len(train),
            "validation_samples": len(val),
            "bad_rows": count_bad_rows(problems),
            "dropped_samples": train_stats.dropped,
            "train_tokens_per_epoch": train_stats.tokens,
        },
    )


def _sft_start(config: RunConfig) -> adapters.PublishedAdapter | None:
    """The published SFT adapter named by ``preference.sft_adapter``, checked against this run."""
    ref = config.preference.sft_adapter
    if not ref:
        return None
    name, version = adapters.parse_adapter_ref(ref)
    published = adapters.get_adapter(config.output.adapters_root, name, version)
    if published.manifest.kind != "lora":
        raise ConfigError(
            [
                FieldProblem(
                    "preference.sft_adapter",
                    ref,
                    f"is a {published.manifest.kind} artifact, not a LoRA adapter",
                )
            ]
        )
    expected = base_model_fingerprint(config.model.name_or_path, config.model.revision)
    if not fingerprints_match(published.manifest.base_model, expected):
        raise ConfigError(
            [
                FieldProblem(
                    "preference.sft_adapter",
                    ref,
                    f"was trained on another base than {config.model.name_or_path}",
                )
            ]
        )
    return published


def _prepare(
    config: RunConfig, family: Any, start: adapters.PublishedAdapter | None
) -> tuple[Any, PreparedModel]:
    """(the loaded base, the model to train) for the stage and method."""
    spec = method_spec(config.method)
    if config.stage == "rm":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        if quantization_for(config) != "none":
            raise ConfigError(
                [
                    FieldProblem(
                        "model.quantization", config.model.quantization, "stage rm loads the base unquantized"
                    )
                ]
            )
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.model.dtype]
        base = AutoModelForSequenceClassification.from_pretrained(
            config.model.name_or_path,
            num_labels=1,
            dtype=dtype,
            trust_remote_code=config.model.trust_remote_code,
        )
        from lorafleet.methods import resolve_lora_targets

        targets = resolve_lora_targets(base, family, config.lora.target_modules)
        lora = LoraConfig(
            task_type="SEQ_CLS",
            r=config.lora.rank,
            lora_alpha=config.lora.alpha,  # type: ignore[arg-type]
            lora_dropout=config.lora.dropout,
            target_modules=targets,
        )
        model = get_peft_model(base, lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return base, PreparedModel(
            model, "lora", {"target_modules": sorted(targets), "value_head": preference.VALUE_HEAD}
        )
    model_cfg = replace(config.model, quantization=quantization_for(config))
    base = load_model(model_cfg, for_training=True)
    if start is not None and spec.trains == TRAINS_LORA:
        from peft import PeftModel

        started: Any = PeftModel.from_pretrained(base, str(start.path), is_trainable=True)
        started.load_adapter(str(start.path), adapter_name=preference.REFERENCE_ADAPTER, is_trainable=False)
        started.set_adapter("default")
        for p in started.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return base, PreparedModel(started, "lora", {"started_from": start.ref})
    return base, prepare_model(base, config, family)


def _batches(count: int, size: int, seed: int, epoch: int, topo: Topology | None = None) -> list[list[int]]:
    """This rank's micro-batches of ``epoch``: a function of (seed, epoch) only.

    Rank r takes every world_size-th batch and every rank gets the same count (ZeRO and DDP step
    together), so one process with accumulation k sees the same global batches as k ranks.
    """
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    batches = [order[i : i + size] for i in range(0, count - size + 1, size)]
    if topo is None or not topo.distributed:
        return batches
    return batches[topo.rank :: topo.world_size][: len(batches) // topo.world_size]


def _collate(config: RunConfig, rows: list[Any], pad: int) -> dict[str, torch.Tensor]:
    if config.stage == "kto":
        return preference.collate_unpaired(rows, pad)
    return preference.collate_pairs(rows, pad)


def _step(
    config: RunConfig, model: Any, batch: dict[str, torch.Tensor], ref_model: Any, ref_logps: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    o = config.preference
    if config.stage == "rm":
        return preference.reward_step(model, batch)
    if config.stage == "kto":
        return preference.kto_step(model, batch, o.beta, o.desirable_weight, o.undesirable_weight, ref_model)
    return preference.pairwise_step(
        model,
        batch,
        o.loss,
        o.beta,
        o.gamma,
        o.label_smoothing,
        ref_model=ref_model,
        ref_logps=ref_logps,
        share_prompt=_shares_prompt(config),
    )


def _shares_prompt(config: RunConfig) -> bool:
    """Whether the pairwise forwards run each prompt once (``lorafleet.preference_prefix``).

    Everywhere but DeepSpeed ZeRO-3: there the policy would take two grad-carrying forwards per
    step through the partitioned engine (prompt, then answers), a path not checked against its
    parameter gathering; the plain [2·batch] forward stays. Models the trick does not fit (no
    ``logits_to_keep`` mask, a cache that is not a plain DynamicCache, gradient checkpointing) fall
    back per batch inside ``preference.pairwise_step``.
    """
    return config.distributed.deepspeed_stage != 3


@torch.no_grad()
def evaluate_preferences(
    config: RunConfig, model: Any, pairs: list[preference.PairExample], pad: int, ref_model: Any = None
) -> dict[str, float]:
    """Held-out preference metrics over pairwise rows.

    ``preference_accuracy``: the fraction of pairs the model itself ranks right: the value head's
    score (rm), the mean token log-prob (ORPO / SimPO, which train that), else the summed answer
    log-prob log π(y|x). It is meaningful before training too (about 50 % on a balanced task for a
    model that has not learned the rule). ``mean_margin``: the mean implicit reward margin
    r(y_w) - r(y_l) with TRL's rewards (β·(log π - log π_ref) for the reference-based losses: 0 at
    the start by construction), and ``reward_accuracy`` the fraction of pairs where it is > 0.
    """
    if not pairs:
        return {}
    was_training = model.training
    model.eval()
    ranks: list[torch.Tensor] = []
    margins: list[torch.Tensor] = []
    o = config.preference
    for start in range(0, len(pairs), _EVAL_BATCH):
        batch = preference.collate_pairs(pairs[start : start + _EVAL_BATCH], pad)
        half = batch["input_ids"].shape[0] // 2
        if config.stage == "rm":
            rank = reward = preference.reward_scores(model, batch)
        elif config.stage == "dpo" and o.loss in preference.REFERENCE_FREE_LOSSES:
            rank = preference.forward_logps(model, batch, average=True)
            reward = o.beta * rank
        else:
            rank = preference.forward_logps(model, batch)
            reward = o.beta * (rank - preference.reference_logps(model, batch, ref_model))
        ranks.append(rank[:half] - rank[half:])
        margins.append(reward[:half] - reward[half:])
    model.train(was_training)
    rank_gap, margin = torch.cat(ranks), torch.cat(margins)
    return {
        "preference_accuracy": float((rank_gap > 0).float().mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
        "mean_margin": float(margin.mean()),
    }


def _precompute(config: RunConfig, rows: list[Any], ref_model: Any, pad: int) -> list[torch.Tensor]:
    """Reference log-probs of every training row ([2] per pair: chosen, rejected), computed once."""
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), _EVAL_BATCH):
        chunk = rows[start : start + _EVAL_BATCH]
        batch = preference.collate_pairs(chunk, pad)
        logps = preference.reference_logps(ref_model, batch, ref_model)
        half = len(chunk)
        out += [torch.stack([logps[i], logps[half + i]]) for i in range(half)]
    return out


def run_preference(config: RunConfig, progress: bool | None = None) -> dict[str, Any]:
    """Train the preference stage per ``config`` and publish; returns the final metrics and refs.

    Raises:
        LorafleetError: bad data, an unknown or mismatched SFT adapter, an option the model cannot take.
    """
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
    if topo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
        )
    barrier()
    torch.manual_seed(t.seed)

    tokenizer = load_tokenizer(config.model)
    start = _sft_start(config)
    from transformers import AutoConfig

    family_model_config = AutoConfig.from_pretrained(
        config.model.name_or_path, trust_remote_code=config.model.trust_remote_code
    )
    family = (
        detect_family(family_model_config, config.model.name_or_path)
        if config.model.family == "auto"
        else get_family(config.model.family)
    )
    template_name = family.template if config.data.template == "auto" else config.data.template
    template = templates.get_template(template_name, tokenizer)
    train, held_out, stats = _load_split(config, tokenizer, template)
    _, prepared = _prepare(config, family, start)
    model = prepared.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.stage == "rm" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad
    if quantization_for(config) == "none":
        model.to(device)  # quantized bases are placed by bitsandbytes at load time
    ref_model = None
    if prepared.kind == ARTIFACT_FULL_MODEL and not (
        config.stage == "dpo" and config.preference.loss in preference.REFERENCE_FREE_LOSSES
    ):
        # A frozen replica on every rank (it has no optimizer state to partition); under ZeRO-3
        # the config checks ask for precompute_reference, which frees it before training.
        ref_model = load_model(replace(config.model, quantization="none"), for_training=False).eval()
        ref_model.to(device)
        for p in ref_model.parameters():
            p.requires_grad_(False)
    total_params, trainable_params = count_parameters(model)

    per_epoch = len(_batches(len(train), t.per_device_batch_size, t.seed, 0, topo))
    if per_epoch == 0:
        raise LorafleetError(
            f"data.train_file={config.data.train_file!r}: {len(train)} rows are fewer than one batch "
            f"per process (train.per_device_batch_size={t.per_device_batch_size}, "
            f"{topo.world_size} processes)"
        )
    accum = t.gradient_accumulation_steps
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / accum))
    recorder = RunRecorder(run_dir, total_steps, is_main=topo.is_main, progress=progress)
    # The run's own /metrics when LORAFLEET_TRAINING_METRICS_PORT is set (a Kubernetes pod): one process.
    if topo.is_main and os.environ.get(run_metrics.PORT_ENV, "").strip():
        exporter = run_metrics.start_from_env(run_id_for(config), config.method, 0, True)
        if exporter is not None:
            recorder.add_listener(exporter.observe)
    eval_pairs = held_out if config.stage != "kto" else []
    before = evaluate_preferences(config, model, eval_pairs, pad, ref_model)
    recorder.write_event(
        "run_started",
        stage=config.stage,
        method=config.method,
        template=template_name,
        family=family.name,
        total_params=total_params,
        trainable_params=trainable_params,
        total_steps=total_steps,
        data=stats,
        started_from=start.ref if start else None,
        initial=before,
        world_size=topo.world_size,
    )
    precomputed = None
    if config.preference.precompute_reference and ref_model is not None and config.stage == "dpo":
        precomputed = _precompute(config, train, ref_model, pad)
        ref_model = None  # freed: the reference is no longer needed in memory

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    warmup = int(total_steps * t.warmup_ratio)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        if t.lr_scheduler == "constant":
            return 1.0
        progress_frac = (step - warmup) / max(total_steps - warmup, 1)
        return (
            0.5 * (1 + math.cos(math.pi * progress_frac)) if t.lr_scheduler == "cosine" else 1 - progress_frac
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # The policy runs through the wrapper (DeepSpeed's engine hooks its backward onto the forward's
    # outputs); the reference toggles the adapter on the PEFT model inside it.
    engine: Any = None
    forward_model: Any = model
    if config.distributed.deepspeed_stage >= 0:
        import deepspeed

        from lorafleet.deepspeed_config import build_deepspeed_config

        hidden = model_dims(model.config)["hidden_size"] or 1024
        ds_config = build_deepspeed_config(config, topo.world_size, hidden)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        forward_model = engine
        if topo.is_main:
            (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    elif topo.distributed:
        forward_model = torch.nn.parallel.DistributedDataParallel(model)
    preference.disable_dropout(model)  # policy and reference alike (see its docstring)
    forward_model.train()
    step, epoch, micro_total, tokens = 0, 0, 0, 0
    window: list[dict[str, float]] = []
    loop_start = time.perf_counter()
    while step < total_steps:
        epoch_batches = _batches(len(train), t.per_device_batch_size, t.seed, epoch, topo)
        for done_in_epoch, indices in enumerate(epoch_batches, start=1):
            rows = [train[i] for i in indices]
            batch = _to_device(_collate(config, rows, pad), device)
            ref_logps = None
            if precomputed is not None:
                pairs = [precomputed[i] for i in indices]
                ref_logps = torch.cat(
                    [torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])]
                ).to(device)
            micro_total += 1
            boundary = micro_total % accum == 0
            sync: Any = contextlib.nullcontext()
            if engine is None and topo.distributed and not boundary:
                sync = forward_model.no_sync()
            with sync:
                loss, metrics = _step(config, forward_model, batch, ref_model, ref_logps)
                if engine is not None:
                    engine.backward(loss)
                    engine.step()  # an optimizer step only at the accumulation boundary
                else:
                    (loss / accum).backward()
            # Logical tokens (each prompt once per answer), whether or not the forward shares the prompt.
            tokens += int(batch["attention_mask"].sum())
            window.append(metrics)
            if not boundary:
                continue
            if engine is None:
                if t.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % t.logging_steps == 0 or step == total_steps:
                # Every rank's micro-batches of the window: the record is the global mean.
                merged = [m for part in gather_objects(window) for m in part]
                keys = {k for m in merged for k in m}
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": round(epoch + done_in_epoch / max(per_epoch, 1), 4),
                }
                for key in sorted(keys):
                    values = [m[key] for m in merged if key in m]
                    record[key] = sum(values) / len(values)
                record["learning_rate"] = scheduler.get_last_lr()[0]
                recorder.log(record)
                window = []
            if step >= total_steps:
                break
        epoch += 1

    runtime = time.perf_counter() - loop_start
    tokens = int(all_reduce_sum([float(tokens)], device)[0])
    # Every rank evaluates every held-out pair: under ZeRO-3 the forwards gather parameters together.
    after = evaluate_preferences(config, forward_model, eval_pairs, pad, ref_model)
    final: dict[str, Any] = {
        "stage": config.stage,
        "train_steps": step,
        "train_tokens": tokens,
        "train_runtime_s": round(runtime, 6),
        "train_tokens_per_s": round(tokens / runtime, 2) if runtime > 0 else None,
        **{f"initial_{k}": v for k, v in before.items()},
        **after,
    }
    zero3 = engine is not None and config.distributed.deepspeed_stage == 3
    digests = gather_objects(_weights_digest(model, zero3))
    state_dict = _gathered_state_dict(engine, model, config)  # collective under ZeRO-3, else None
    published = None
    if topo.is_main:
        write_final_metrics(run_dir, final)
        if config.output.adapter_name:
            published = _publish(
                config, prepared, tokenizer, template_name, family.name, final, stats, start, state_dict
            )
            final["published"] = published.ref
            # The trainer service reads the artifact of a job from this event, as for SFT runs.
            recorder.write_event(
                "published", name=published.name, version=published.version, path=str(published.path)
            )
    recorder.write_event("run_finished", **final, weights_digest_per_rank=digests)
    recorder.close()
    barrier()
    destroy_process_group()
    return {"metrics": final, "model": model, "tokenizer": tokenizer, "published": published}


def _publish(
    config: RunConfig,
    prepared: PreparedModel,
    tokenizer: Any,
    template_name: str,
    family: str,
    metrics: dict[str, Any],
    stats: dict[str, Any],
    start: adapters.PublishedAdapter | None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> adapters.PublishedAdapter:
    if preference.REFERENCE_ADAPTER in (getattr(prepared.model, "peft_config", None) or {}):
        prepared.model.delete_adapter(
            preference.REFERENCE_ADAPTER
        )  # the artifact is the trained adapter only
    files = [config.data.train_file] + ([config.data.validation_file] if config.data.validation_file else [])
    return publish_run(
        config,
        prepared,
        tokenizer,
        template_name,
        family,
        metrics,
        {**adapters.dataset_fingerprint(files), **stats},
        {"stage": config.stage, "preference": config.to_dict()["preference"]},
        extra={
            "stage": config.stage,
            "started_from": start.ref if start else None,
            # The inference service serves a reward model's LoRA as usual and reads this head aside.
            **({"value_head": preference.VALUE_HEAD} if config.stage == "rm" else {}),
        },
        state_dict=state_dict,
    )
