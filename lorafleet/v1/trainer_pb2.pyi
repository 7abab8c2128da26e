import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from lorafleet.v1 import adapters_pb2 as _adapters_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class ModelSpec(_message.Message):
    __slots__ = ("name_or_path", "revision", "family", "dtype", "quantization", "trust_remote_code")
    NAME_OR_PATH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    TRUST_REMOTE_CODE_FIELD_NUMBER: _ClassVar[int]
    name_or_path: str
    revision: str
    family: str
    dtype: str
    quantization: str
    trust_remote_code: bool
    def __init__(self, name_or_path: _Optional[str] = ..., revision: _Optional[str] = ..., family: _Optional[str] = ..., dtype: _Optional[str] = ..., quantization: _Optional[str] = ..., trust_remote_code: _Optional[bool] = ...) -> None: ...

class DatasetSpec(_message.Message):
    __slots__ = ("train_file", "validation_file", "validation_split", "format", "prompt_column", "response_column", "template", "system", "max_source_length", "max_target_length", "train_on_prompt", "mask_history", "packing", "packing_length", "max_bad_fraction", "max_samples")
    TRAIN_FILE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FILE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_SPLIT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_COLUMN_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_TARGET_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ON_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MASK_HISTORY_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    PACKING_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    train_file: str
    validation_file: str
    validation_split: float
    format: str
    prompt_column: str
    response_column: str
    template: str
    system: str
    max_source_length: int
    max_target_length: int
    train_on_prompt: bool
    mask_history: bool
    packing: bool
    packing_length: int
    max_bad_fraction: float
    max_samples: int
    def __init__(self, train_file: _Optional[str] = ..., validation_file: _Optional[str] = ..., validation_split: _Optional[float] = ..., format: _Optional[str] = ..., prompt_column: _Optional[str] = ..., response_column: _Optional[str] = ..., template: _Optional[str] = ..., system: _Optional[str] = ..., max_source_length: _Optional[int] = ..., max_target_length: _Optional[int] = ..., train_on_prompt: _Optional[bool] = ..., mask_history: _Optional[bool] = ..., packing: _Optional[bool] = ..., packing_length: _Optional[int] = ..., max_bad_fraction: _Optional[float] = ..., max_samples: _Optional[int] = ...) -> None: ...

class LoraOptions(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules", "modules_to_save", "use_dora", "use_rslora")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MODULES_TO_SAVE_FIELD_NUMBER: _ClassVar[int]
    USE_DORA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    modules_to_save: _containers.RepeatedScalarFieldContainer[str]
    use_dora: bool
    use_rslora: bool
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., modules_to_save: _Optional[_Iterable[str]] = ..., use_dora: _Optional[bool] = ..., use_rslora: _Optional[bool] = ...) -> None: ...

class FreezeOptions(_message.Message):
    __slots__ = ("trainable_layers", "trainable_modules", "train_embeddings")
    TRAINABLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_MODULES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    trainable_layers: int
    trainable_modules: _containers.RepeatedScalarFieldContainer[str]
    train_embeddings: bool
    def __init__(self, trainable_layers: _Optional[int] = ..., trainable_modules: _Optional[_Iterable[str]] = ..., train_embeddings: _Optional[bool] = ...) -> None: ...

class PtuningOptions(_message.Message):
    __slots__ = ("mode", "num_virtual_tokens", "encoder_hidden_size", "prefix_projection")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_VIRTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_PROJECTION_FIELD_NUMBER: _ClassVar[int]
    mode: str
    num_virtual_tokens: int
    encoder_hidden_size: int
    prefix_projection: bool
    def __init__(self, mode: _Optional[str] = ..., num_virtual_tokens: _Optional[int] = ..., encoder_hidden_size: _Optional[int] = ..., prefix_projection: _Optional[bool] = ...) -> None: ...

class PreferenceOptions(_message.Message):
    __slots__ = ("loss", "beta", "gamma", "label_smoothing", "desirable_weight", "undesirable_weight", "sft_adapter", "precompute_reference", "prompt_column", "chosen_column", "rejected_column", "completion_column", "label_column")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    DESIRABLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNDESIRABLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SFT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PRECOMPUTE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_COLUMN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COLUMN_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_COLUMN_FIELD_NUMBER: _ClassVar[int]
    LABEL_COLUMN_FIELD_NUMBER: _ClassVar[int]
    loss: str
    beta: float
    gamma: float
    label_smoothing: float
    desirable_weight: float
    undesirable_weight: float
    sft_adapter: str
    precompute_reference: bool
    prompt_column: str
    chosen_column: str
    rejected_column: str
    completion_column: str
    label_column: str
    def __init__(self, loss: _Optional[str] = ..., beta: _Optional[float] = ..., gamma: _Optional[float] = ..., label_smoothing: _Optional[float] = ..., desirable_weight: _Optional[float] = ..., undesirable_weight: _Optional[float] = ..., sft_adapter: _Optional[str] = ..., precompute_reference: _Optional[bool] = ..., prompt_column: _Optional[str] = ..., chosen_column: _Optional[str] = ..., rejected_column: _Optional[str] = ..., completion_column: _Optional[str] = ..., label_column: _Optional[str] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("epochs", "max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "seed", "gradient_checkpointing", "group_by_length", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "predict_with_generate", "max_new_tokens", "max_eval_samples", "num_threads")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    PER_DEVICE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LOGGING_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAVE_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAVE_TOTAL_LIMIT_FIELD_NUMBER: _ClassVar[int]
    PREDICT_WITH_GENERATE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_EVAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_THREADS_FIELD_NUMBER: _ClassVar[int]
    epochs: float
    max_steps: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    gradient_checkpointing: bool
    group_by_length: bool
    logging_steps: int
    eval_steps: int
    save_steps: int
    save_total_limit: int
    predict_with_generate: bool
    max_new_tokens: int
    max_eval_samples: int
    num_threads: int
    def __init__(self, epochs: _Optional[float] = ..., max_steps: _Optional[int] = ..., per_device_batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lr_scheduler: _Optional[str] = ..., warmup_ratio: _Optional[float] = ..., weight_decay: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., seed: _Optional[int] = ..., gradient_checkpointing: _Optional[bool] = ..., group_by_length: _Optional[bool] = ..., logging_steps: _Optional[int] = ..., eval_steps: _Optional[int] = ..., save_steps: _Optional[int] = ..., save_total_limit: _Optional[int] = ..., predict_with_generate: _Optional[bool] = ..., max_new_tokens: _Optional[int] = ..., max_eval_samples: _Optional[int] = ..., num_threads: _Optional[int] = ...) -> None: ...

class DeepSpeedSpec(_message.Message):
    __slots__ = ("zero_stage", "offload_optimizer", "offload_param", "launcher")
    ZERO_STAGE_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_PARAM_FIELD_NUMBER: _ClassVar[int]
    LAUNCHER_FIELD_NUMBER: _ClassVar[int]
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    launcher: str
    def __init__(self, zero_stage: _Optional[int] = ..., offload_optimizer: _Optional[bool] = ..., offload_param: _Optional[bool] = ..., launcher: _Optional[str] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("nodes", "processes_per_node", "gpus_per_node", "cpu", "memory")
    NODES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    processes_per_node: int
    gpus_per_node: int
    cpu: str
    memory: str
    def __init__(self, nodes: _Optional[int] = ..., processes_per_node: _Optional[int] = ..., gpus_per_node: _Optional[int] = ..., cpu: _Optional[str] = ..., memory: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("model", "dataset", "method", "lora", "freeze", "ptuning", "hyperparameters", "deepspeed", "resources", "adapter_name", "max_attempts", "labels", "overrides", "stage", "preference")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class OverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    PTUNING_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DEEPSPEED_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    dataset: DatasetSpec
    method: str
    lora: LoraOptions
    freeze: FreezeOptions
    ptuning: PtuningOptions
    hyperparameters: Hyperparameters
    deepspeed: DeepSpeedSpec
    resources: Resources
    adapter_name: str
    max_attempts: int
    labels: _containers.ScalarMap[str, str]
    overrides: _containers.ScalarMap[str, str]
    stage: str
    preference: PreferenceOptions
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., dataset: _Optional[_Union[DatasetSpec, _Mapping]] = ..., method: _Optional[str] = ..., lora: _Optional[_Union[LoraOptions, _Mapping]] = ..., freeze: _Optional[_Union[FreezeOptions, _Mapping]] = ..., ptuning: _Optional[_Union[PtuningOptions, _Mapping]] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., deepspeed: _Optional[_Union[DeepSpeedSpec, _Mapping]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., adapter_name: _Optional[str] = ..., max_attempts: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., overrides: _Optional[_Mapping[str, str]] = ..., stage: _Optional[str] = ..., preference: _Optional[_Union[PreferenceOptions, _Mapping]] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("number", "state", "started_at", "finished_at", "exit_code", "reason", "resumed_from_step", "launcher", "launcher_ref")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    LAUNCHER_FIELD_NUMBER: _ClassVar[int]
    LAUNCHER_REF_FIELD_NUMBER: _ClassVar[int]
    number: int
    state: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    exit_code: int
    reason: str
    resumed_from_step: int
    launcher: str
    launcher_ref: str
    def __init__(self, number: _Optional[int] = ..., state: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., resumed_from_step: _Optional[int] = ..., launcher: _Optional[str] = ..., launcher_ref: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "percent", "loss", "eval_loss", "learning_rate", "tokens_per_s", "eta_s")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: float
    percent: float
    loss: float
    eval_loss: float
    learning_rate: float
    tokens_per_s: float
    eta_s: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., percent: _Optional[float] = ..., loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ...) -> None: ...

class MemoryEstimate(_message.Message):
    __slots__ = ("device_bytes_per_process", "host_bytes", "device", "summary")
    DEVICE_BYTES_PER_PROCESS_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    device_bytes_per_process: int
    host_bytes: int
    device: str
    summary: str
    def __init__(self, device_bytes_per_process: _Optional[int] = ..., host_bytes: _Optional[int] = ..., device: _Optional[str] = ..., summary: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "state", "idempotency_key", "created_at", "started_at", "finished_at", "attempts", "progress", "reason", "log_tail", "adapter", "final_metrics", "memory_estimate", "run_dir", "launcher", "queue_position")
    class FinalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOG_TAIL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FINAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    LAUNCHER_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    state: JobState
    idempotency_key: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    progress: Progress
    reason: str
    log_tail: str
    adapter: _adapters_pb2.Adapter
    final_metrics: _containers.ScalarMap[str, float]
    memory_estimate: MemoryEstimate
    run_dir: str
    launcher: str
    queue_position: int
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., idempotency_key: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., reason: _Optional[str] = ..., log_tail: _Optional[str] = ..., adapter: _Optional[_Union[_adapters_pb2.Adapter, _Mapping]] = ..., final_metrics: _Optional[_Mapping[str, float]] = ..., memory_estimate: _Optional[_Union[MemoryEstimate, _Mapping]] = ..., run_dir: _Optional[str] = ..., launcher: _Optional[str] = ..., queue_position: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "idempotency_key", "dry_run")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    idempotency_key: str
    dry_run: bool
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_seq", "skip_logs")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    SKIP_LOGS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    skip_logs: bool
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., skip_logs: _Optional[bool] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("state", "reason", "attempt")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    reason: str
    attempt: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class MetricRecord(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "eta_s", "percent", "attempt", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: float
    loss: float
    eval_loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_s: float
    eta_s: float
    percent: float
    attempt: int
    values: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., grad_norm: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., percent: _Optional[float] = ..., attempt: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("attempt", "text")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    text: str
    def __init__(self, attempt: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("seq", "job_id", "time", "state", "metrics", "log")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    seq: int
    job_id: str
    time: _timestamp_pb2.Timestamp
    state: StateChange
    metrics: MetricRecord
    log: LogLine
    def __init__(self, seq: _Optional[int] = ..., job_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[StateChange, _Mapping]] = ..., metrics: _Optional[_Union[MetricRecord, _Mapping]] = ..., log: _Optional[_Union[LogLine, _Mapping]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[_adapters_pb2.Adapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[_adapters_pb2.Adapter, _Mapping]]] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class ImportAdapterRequest(_message.Message):
    __slots__ = ("source", "name", "base", "template")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    source: str
    name: str
    base: str
    template: str
    def __init__(self, source: _Optional[str] = ..., name: _Optional[str] = ..., base: _Optional[str] = ..., template: _Optional[str] = ...) -> None: ...

class ExportAdapterRequest(_message.Message):
    __slots__ = ("ref", "dtype", "publish_name")
    REF_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_NAME_FIELD_NUMBER: _ClassVar[int]
    ref: str
    dtype: str
    publish_name: str
    def __init__(self, ref: _Optional[str] = ..., dtype: _Optional[str] = ..., publish_name: _Optional[str] = ...) -> None: ...

class ExportAdapterResponse(_message.Message):
    __slots__ = ("adapter", "notice")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    adapter: _adapters_pb2.Adapter
    notice: str
    def __init__(self, adapter: _Optional[_Union[_adapters_pb2.Adapter, _Mapping]] = ..., notice: _Optional[str] = ...) -> None: ...
