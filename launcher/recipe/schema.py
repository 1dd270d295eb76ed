"""The recipe schema: one strict pydantic model per concern.

Every default lives here and only here. Unknown keys are errors at every level
(`extra="forbid"`). Choices come from the registries that implement them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from launcher.data.formats import FORMATS
from launcher.dist.strategies import STRATEGIES
from launcher.train.optim import OPTIMIZERS, SCHEDULES
from launcher.train.tasks import TASKS

FormatName = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]
ScheduleName = Literal[tuple(SCHEDULES)]  # type: ignore[valid-type]
StrategyName = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]

PosInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0.0)]


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignment re-validates."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(Section):
    name_or_path: str = Field(description="HF directory, hub id, or pkg:<package>/<path>")
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path to load")
    tokenizer: str | None = Field(None, description="tokenizer path if not the model's")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    gradient_checkpointing: bool = False
    add_tokens: list[str] = Field(
        [],
        description="special tokens to add to the tokenizer (e.g. chat markers a base model "
        "lacks); the embeddings grow and, with an adapter, are trained and saved with it",
    )
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None,
        description="override every dropout probability in the model's config (hidden, "
        "attention, classifier...); the summary lists the keys it set",
    )
    freeze_vision_tower: bool = Field(
        True, description="vision_language: the vision encoder gets no gradients"
    )
    freeze_projector: bool = Field(
        False,
        description="vision_language: the projector (image features -> language model) gets "
        "no gradients; when trained under LoRA it is trained in full and saved with the adapter",
    )


class AdapterCfg(Section):
    type: Literal["full", "none", "lora", "dora"] = Field(
        "full", description="full (or none): train every weight; lora/dora: train an adapter"
    )
    r: PosInt = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r), not alpha/r")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="all-linear (every linear layer of the backbone, not the head), a list "
        "of module names, or a regex matched against full module paths",
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved with the adapter"
    )

    @property
    def enabled(self) -> bool:
        """True when an adapter is trained (the base weights stay frozen)."""
        return self.type in ("lora", "dora")


QuantDtype = Literal["float32", "bfloat16", "float16"]


class QuantCfg(Section):
    bits: Literal[4, 8] | None = None
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="quantize the 4-bit scales too (~0.4 bit/weight)")
    compute_dtype: QuantDtype = "bfloat16"
    quant_storage: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype that holds the packed 4-bit weights; auto: uint8, or the model "
        "dtype when ZeRO-3/FSDP shards them (sharding flattens one dtype)",
    )


class AugmentCfg(Section):
    """Train-time image augmentation (evals see the plain images)."""

    crop_scale: tuple[float, float] | None = Field(
        None,
        description="random resized crop: the area fraction range kept, e.g. [0.5, 1.0] "
        "(aspect ratio 3/4 to 4/3); null: no crop",
    )
    hflip: bool = Field(False, description="flip half of the images left-right")


class MixSource(Section):
    """One more training source mixed into data.train (same format and fields)."""

    path: str = Field(description="a data file or folder, as data.train")
    weight: Annotated[float, Field(gt=0.0)] = Field(
        1.0,
        description="rows per epoch as a multiple of this source's rows: 2 = every row "
        "twice, 0.25 = a seeded quarter of them",
    )


class DataCfg(Section):
    format: FormatName = "completion"
    train: str = Field(description="JSONL/JSON/CSV file, or a folder of label folders")
    train_weight: Annotated[float, Field(gt=0.0)] = Field(
        1.0, description="data.train's weight in a mixture (see data.mix)"
    )
    mix: list[MixSource] = Field(
        [],
        description="more training sources, each with a weight: the epoch holds weight x "
        "rows of each (fractions sample without replacement, seeded by data.split_seed)",
    )
    eval: str | None = None
    eval_split: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    split_seed: int = 0
    max_length: PosInt = Field(512, description="tokens per example (the source, for seq2seq)")
    too_long: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="an example longer than max_length (or max_target_length) is cut, "
        "dropped and counted, or reported as an error with its line",
    )
    on_bad_row: Literal["error", "skip"] = "error"
    shards_per_rank: bool = Field(
        True,
        description="data.train is a shard folder (ftl shard) and several processes train: "
        "each reads only its own shards (shard i to rank i mod world) instead of all",
    )
    streaming: bool = Field(
        False,
        description="causal_lm: read, tokenize and pack data.train as training goes (memory "
        "bounded by data.shuffle_buffer, whatever the data's size); needs train.max_steps",
    )
    shuffle_buffer: PosInt = Field(
        10_000, description="streaming: examples held for the seeded shuffle"
    )
    num_workers: PosInt = Field(
        1,
        description="processes that format and tokenize the rows (forked; the same examples "
        "in the same order as one); worth it from tens of thousands of rows",
    )
    packing: bool = Field(
        False,
        description="causal_lm: pack several examples into each row of max_length tokens "
        "(best-fit decreasing; position ids restart per example, no attention across "
        "examples); micro_batch_size then counts rows",
    )
    train_on_prompt: bool = Field(
        False,
        description="chat / alpaca: the loss falls on every token (system and user turns, "
        "prompts, template text) instead of the answers only (TRL's default for messages "
        "data; axolotl's train_on_inputs)",
    )
    padding_free: bool | None = Field(
        None,
        description="packing: each micro-batch is one row of up to micro_batch_size x "
        "max_length tokens (bins that size, no padding at all) instead of micro_batch_size "
        "padded rows; needs attention that runs per segment (flash attention's varlen "
        "path, or ftl's CPU backend), else it is correct but slower; default: on where "
        "it has that (CPU with train.fast_dropout, or flash_attention_2)",
    )
    max_samples: PosInt | None = None
    # field names inside each row
    text_field: str = "text"
    label_field: str = "label"
    messages_field: str = "messages"
    tokens_field: str = Field("tokens", description="token classification: the words")
    tags_field: str = Field("tags", description="token classification: one tag per word")
    image_field: str = Field(
        "image", description="image tasks: the image path (relative to the data file's folder)"
    )
    images_field: str = Field(
        "images",
        description="vision chat: the list of image paths, one per <image> placeholder in "
        "the messages (or use image parts in the message content)",
    )
    augment: AugmentCfg = AugmentCfg()
    source_field: str = Field("source", description="seq2seq: the input text")
    target_field: str = Field("target", description="seq2seq: the text to produce")
    source_prefix: str = Field(
        "", description='seq2seq: prepended to every source (T5: "translate English to German: ")'
    )
    max_target_length: PosInt = Field(128, description="seq2seq: tokens per target")
    labels: list[str] | None = Field(
        None, description="label (or tag) set; inferred from the training data if omitted"
    )
    prompt_template: str | None = Field(None, description="alpaca template override")
    cache: bool = Field(
        True,
        description="keep the tokenized examples in a content-hashed cache and reuse them "
        "while the data files, tokenizer, chat template and data settings are unchanged "
        "(`ftl preprocess` builds it ahead); image tasks are never cached",
    )
    cache_dir: str | None = Field(
        None,
        description="the cache folder (default: $FTL_CACHE_DIR, else ~/.cache/ftl/data), one "
        "entry per key; a folder holding manifest.json is that one entry and must match",
    )


class EarlyStoppingCfg(Section):
    metric: str = Field("eval_loss", description="any eval metric of the task")
    patience: PosInt = Field(3, description="evals without improvement before stopping")
    mode: Literal["min", "max", "auto"] = Field(
        "auto", description="auto: min for eval_loss, perplexity and errors, max otherwise"
    )
    min_delta: NonNegFloat = 0.0
    restore_best: bool = Field(
        True,
        description="the saved model/ is the best evaluated one (kept in RUN/best while "
        "training), not the last",
    )


class GenerationCfg(Section):
    """How seq2seq evals generate text for BLEU and chrF (greedy unless num_beams > 1)."""

    max_new_tokens: PosInt | None = Field(None, description="default: data.max_target_length")
    num_beams: PosInt = 1


class TrainCfg(Section):
    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: PosInt | None = None
    micro_batch_size: PosInt = Field(8, description="samples per process per forward pass")
    grad_accum: PosInt = 1
    global_batch_size: PosInt | None = Field(
        None,
        description="samples per optimizer step over all processes; derives grad_accum "
        "from the world size (micro_batch_size x grad_accum x world)",
    )
    lr: Annotated[float, Field(gt=0)] = 2e-5
    weight_decay: NonNegFloat = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    optimizer: OptimizerName = "adamw"
    scheduler: ScheduleName = "linear"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    max_grad_norm: NonNegFloat | None = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 42
    log_every: PosInt = 10
    eval_every: PosInt | None = None
    eval_at_start: bool = Field(
        False, description="evaluate the untouched model first (a baseline)"
    )
    eval_batch_size: PosInt | None = None
    save_every: PosInt | None = None
    keep_last: PosInt = 2
    early_stopping: EarlyStoppingCfg | None = None
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="cross-entropy label smoothing of the training loss (evals unsmoothed)"
    )
    generation: GenerationCfg = GenerationCfg()
    l2sp: NonNegFloat = Field(0.0, description="λ of L2-SP: loss + λ·Σ‖θ−θ₀‖²")
    num_threads: PosInt | None = Field(None, description="torch CPU threads (default: all)")
    fast_dropout: bool = Field(True, description="cheaper dropout masks when training on CPU")


class DistributedCfg(Section):
    strategy: StrategyName = "none"
    deepspeed_config: str | None = Field(
        None,
        description="your own DeepSpeed JSON instead of ds_configs/<strategy>.json; "
        '"auto" values are filled from the recipe',
    )
    num_processes: PosInt | Literal["auto"] = Field(
        "auto", description="processes per machine (auto: one per GPU, 1 without GPUs)"
    )
    num_machines: PosInt = 1
    main_process_port: Annotated[int, Field(ge=1024, le=65535)] = 29500
    timeout_minutes: Annotated[float, Field(gt=0)] = Field(
        30,
        description="how long a collective (barrier, all-reduce, broadcast) may wait for the "
        "other ranks before the run fails with an error instead of hanging",
    )


class OutputCfg(Section):
    dir: str
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    run_name: str | None = None
    save_model: bool = True


class SlurmCfg(Section):
    """Defaults for `ftl slurm`; its command-line flags win over these."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = Field(None, description="memory per node, as sbatch --mem takes it")
    exclusive: bool = False
    nodes: PosInt = 1
    gpus_per_node: Annotated[int, Field(ge=0)] = Field(
        8, description="GPUs per node; 0 on a CPU-only cluster"
    )
    cpus_per_task: PosInt | None = None
    time: str = Field("24:00:00", description="wall-clock limit of one run of the job")
    job_name: str | None = Field(None, description="default: ftl-<run folder name>")
    requeue: bool = Field(
        True,
        description="on the time-limit warning (or a manual USR1) checkpoint, then requeue "
        "the job, which resumes from that checkpoint",
    )
    signal_grace_s: Annotated[int, Field(ge=10, le=65535)] = Field(
        300,
        description="seconds before the time limit at which SLURM warns the job (USR1): "
        "time to finish the step and write a checkpoint",
    )
    retries_on_failure: Annotated[int, Field(ge=0)] = Field(
        0,
        description="requeue the job this many times after a crash (a lost node, a killed "
        "rank); it resumes from the newest complete checkpoint",
    )
    port: Annotated[int, Field(ge=1024, le=65535)] | None = Field(
        None, description="rendezvous port; default: 20000 + job id mod 20000"
    )
    env: dict[str, str] = Field({}, description="variables exported into the job")
    sbatch_args: list[str] = Field(
        [], description="extra sbatch options, one per item, e.g. --mail-type=END"
    )


class Recipe(Section):
    """A whole recipe, as `ftl validate` prints it once resolved."""

    task: TaskName = "causal_lm"
    model: ModelCfg
    data: DataCfg
    adapter: AdapterCfg = AdapterCfg()
    quant: QuantCfg = QuantCfg()
    train: TrainCfg = TrainCfg()
    distributed: DistributedCfg = DistributedCfg()
    output: OutputCfg
    slurm: SlurmCfg | None = None


def dump(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (every default filled in)."""
    return recipe.model_dump(mode="json")


def fingerprint(recipe: Recipe) -> str:
    """Short hash of the whole resolved recipe: equal on every rank that runs the same one."""
    import hashlib
    import json

    text = json.dumps(dump(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
