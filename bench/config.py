"""Sweep and cluster configuration, validated at the door: the one place both files are loaded.

Owns: the schema of sweep YAML files (``SweepConfig`` and its parts; docs/sweep-files.md is the
reference for both files), loading sweep and cluster files through bench.safeio, and turning any
failure into one line naming the file, the key and what is allowed (``ConfigError``; the CLI
exits 2 with it). The cluster file's schema is bench.clusterfile, what "strict" means
bench.schema; both are re-exported here (``from bench.config import ClusterConfig`` works).

Validation is strict where YAML would otherwise be guessed at: an integer is an integer (not
``true``, not ``"64"``, not ``64.0``), a number is an int or a float (not a string, not a
boolean, not NaN or infinity), a boolean is ``true``/``false`` (not ``"yes"``, not ``1``), a
string is a string; a key given twice is refused by the loader.

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AliasChoices, BaseModel, Field, Strict, ValidationError, field_validator, model_validator

from bench import safeio, workloads
from bench.clusterfile import ClusterConfig, HardwareConfig, check_ray_address
from bench.errors import ConfigError
from bench.names import check_name
from bench.schema import Bool, Float, Int, IntOrAuto, Str, StrictModel, first_error, int_or_auto, kind

__all__ = ["ClusterConfig", "HardwareConfig", "LRConfig", "LRSearchConfig", "OptimizerConfig", "SweepConfig", "TelemetryConfig",
           "ConfigError", "check_ray_address", "default_cluster", "load_cluster", "load_sweep", "read_yaml",
           "resolve_sweep_path"]

PACKAGED_SWEEPS = Path(__file__).parent / "sweeps"
MAX_YAML_BYTES = safeio.LIMITS["config"]  # a sweep file is a few KB; larger files are refused unread
MAX_YAML_VALUES = 10_000  # a sweep file has a few hundred; a flat list of 300,000 is refused in milliseconds
MAX_EPOCHS = 100_000
MAX_CONCURRENT_RUNS = 4096
MIN_LR_TRIALS, MAX_LR_TRIALS = 3, 32  # LRs per batch in an lr_search (the rule's counts for factors)
MAX_BATCH_TOKENS = 2**31  # a global batch in tokens (GPT-3 trained at 3.2 M)
TOKEN_WORKLOADS = frozenset({"lm"})  # workloads whose batch unit is the token (docs/language-models.md)



class OptimizerConfig(StrictModel):
    name: Literal["sgd", "adamw", "lars", "lamb"] = "sgd"
    momentum: Float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: Bool = False
    weight_decay: Float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[Annotated[float, Strict(), Field(ge=0.0, lt=1.0)],
                 Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: Float = Field(1e-8, gt=0.0, le=1.0)
    trust_coefficient: Float = Field(0.001, gt=0.0, le=1.0)  # lars
    exclude_bias_and_norm: Bool = True  # no weight decay / trust ratio on biases and norm layers


class LRConfig(StrictModel):
    # The LR tuned at a reference batch; the rule scales it to each global batch. Called base_lr /
    # base_batch_size before (still accepted): MLPerf's opt_base_learning_rate is the *peak* LR.
    reference_lr: Float = Field(gt=0.0, le=1000.0, validation_alias=AliasChoices("reference_lr", "base_lr"),
                                description="LR at reference_batch_size")
    reference_batch_size: Int = Field(gt=0, le=10_000_000,
                                      validation_alias=AliasChoices("reference_batch_size", "base_batch_size"),
                                      description="global batch the reference_lr was tuned for")
    scaling: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: Float = Field(0.0, ge=0.0, le=10_000.0)
    warmup_steps: Optional[Int] = Field(None, ge=0, le=100_000_000, description="overrides warmup_epochs")
    schedule: Literal["constant", "step", "cosine", "linear"] = "constant"
    # cosine / linear decay towards min_lr_ratio x the peak LR (0: to zero) at the last step
    min_lr_ratio: Float = Field(0.0, ge=0.0, lt=1.0)
    # warmup starts at min(reference_lr, peak LR) (Goyal et al.), or at zero (usual for Adam on
    # transformers: the first step then only primes Adam's moments)
    warmup_from: Literal["reference", "zero"] = "reference"
    step_milestones_epochs: tuple[Float, ...] = ()  # schedule: step
    step_gamma: Float = Field(0.1, gt=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _one_name_each(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for new, old in (("reference_lr", "base_lr"), ("reference_batch_size", "base_batch_size")):
                if new in data and old in data:
                    raise ValueError(f"{old} is the old name of {new}; give one of them")
        return data

    @field_validator("step_milestones_epochs")
    @classmethod
    def _ascending(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0 < m <= MAX_EPOCHS for m in v) or list(v) != sorted(v):
            raise ValueError(f"milestones must be ascending epochs in (0, {MAX_EPOCHS}]")
        return v


class LRSearchConfig(StrictModel):
    """A learning-rate search per global batch (bench.lrsearch; docs/lr-search.md): the trials are
    ``factors`` x the rule's peak LR at each batch, or the absolute ``peak_lrs`` at every batch; the
    rule's LR is always a trial too. Stage 1 runs every trial at ``search_seeds``; stage 2 runs every
    seed at the chosen LR and at the rule's LR."""

    factors: Optional[list[Float]] = Field(None, min_length=1, max_length=MAX_LR_TRIALS,
                                           description="x the rule's peak LR, e.g. [0.25, 0.5, 1, 2, 4]")
    peak_lrs: Optional[list[Float]] = Field(None, min_length=1, max_length=MAX_LR_TRIALS,
                                            description="absolute peak LRs, the same at every batch")
    search_seeds: Optional[list[Int]] = Field(None, min_length=1, max_length=100,
                                              description="stage 1's seeds (default: the sweep's first)")

    @model_validator(mode="after")
    def _one_grid(self) -> "LRSearchConfig":
        if (self.factors is None) == (self.peak_lrs is None):
            raise ValueError("give one of factors (x the rule's LR) and peak_lrs (absolute LRs)")
        key, values, low, high = (("factors", self.factors, 1e-4, 1e4) if self.factors is not None
                                  else ("peak_lrs", self.peak_lrs, 1e-8, 1000.0))
        if any(not low <= v <= high for v in values) or len(set(values)) != len(values):
            raise ValueError(f"{key}: values must be distinct numbers in [{low:g}, {high:g}]")
        count = len(set(values) | {1.0}) if key == "factors" else len(values)
        if count < MIN_LR_TRIALS:
            what = "LR(s) per batch counting the rule's (factor 1)" if key == "factors" else "LR(s)"
            raise ValueError(f"{key}: {count} {what}; a search needs at least {MIN_LR_TRIALS} "
                             f"(e.g. {key}: {[0.5, 1, 2] if key == 'factors' else [0.01, 0.03, 0.1]})")
        return self


class TelemetryConfig(StrictModel):
    enabled: Bool = True
    hz: Float = Field(10.0, gt=0.0, le=1000.0, description="samples per second per worker")


class SweepConfig(StrictModel):
    name: Str = Field(description="folder name under the results dir")
    description: Str = ""
    workload: Str
    workload_options: dict[Str, Any] = Field(default_factory=dict)
    model: Optional[Str] = None  # default: the workload's
    optimizer: OptimizerConfig = OptimizerConfig()
    lr: LRConfig
    label_smoothing: Float = Field(0.0, ge=0.0, lt=1.0)
    epochs: Int = Field(gt=0, le=MAX_EPOCHS)
    max_steps: Optional[Int] = Field(None, gt=0, le=100_000_000, description="step budget; stops earlier")
    # Samples per optimizer step; workload lm counts tokens instead, in global_batch_tokens
    # (exactly one of the two, as the workload's batch unit says: SweepConfig.batch_sizes).
    global_batch_sizes: Optional[list[Int]] = Field(None, min_length=1, max_length=64)
    global_batch_tokens: Optional[list[Int]] = Field(None, min_length=1, max_length=64,
                                                     description="lm: tokens (targets) per optimizer step")
    num_workers: list[Int] = Field([1], min_length=1, max_length=16)
    seeds: list[Int] = Field([0], min_length=1, max_length=100)
    # A micro-batch cap (gradient accumulation above it), or auto: the memory probe's choice per
    # per-worker batch (bench.memprobe.resolve_micro_batch reads results/<sweep>/memory-probe.json).
    max_micro_batch_size: IntOrAuto = None
    max_micro_batch_tokens: IntOrAuto = None  # lm: the same cap in tokens (whole sequences of context_length)
    max_tokens: Optional[Int] = Field(None, gt=0, le=10**13, description="lm: per-run token budget; stops earlier")
    # The target: a test accuracy reached (>=), or for a language model a validation loss in nats
    # per token reached (<=); exactly one of the two.
    target_accuracy: Optional[Float] = Field(None, gt=0.0, le=1.0, description="test accuracy that counts as reached")
    target_loss: Optional[Float] = Field(None, gt=0.0, le=1000.0, description="validation loss (nats) reached")
    eval_every_epochs: Int = Field(1, gt=0, le=100_000)
    # Evaluate every N optimizer steps instead of at epoch ends (the resolution of steps-to-target
    # is the interval before the crossing). auto: at geometrically spaced steps, EVALS_PER_DOUBLING
    # per doubling of the step count (so every crossing after step 8 has >= 8 evaluations before it
    # and a resolution <= 16 %), plus every epoch end and the last step.
    eval_every_steps: IntOrAuto = None
    # Training samples the train_* metrics are measured on: a fixed, evenly spaced subset, to bound
    # what frequent evaluation costs (None: the whole training set; streamed ImageNet has its own
    # workload_options.train_eval_samples).
    train_eval_samples: Optional[Int] = Field(None, gt=0, le=100_000_000)
    # Sustained time-to-target: the target counts as held once it is reached at this many
    # consecutive evaluations (shown beside MLPerf's first crossing).
    target_hold_evals: Int = Field(3, ge=1, le=10_000)
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: Bool = False
    compile: Bool = False
    divergence_loss_factor: Float = Field(10.0, gt=1.0, description="diverged if loss > factor x initial")
    noise_scale_every_steps: Int = Field(0, ge=0, le=1_000_000, description="0: off")
    telemetry: TelemetryConfig = TelemetryConfig()
    # Runs at once (bench.launcher): N, or auto (as many worker groups as the cluster's resources
    # hold at once). How the sweep is run, not what it measures: left out of config_hash.
    max_concurrent_runs: IntOrAuto = 1
    lr_search: Optional[LRSearchConfig] = None  # a learning-rate search per batch (docs/lr-search.md)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v, "sweep name")

    @field_validator("global_batch_sizes", "global_batch_tokens", "num_workers")
    @classmethod
    def _positive_unique(cls, v: list[int] | None, info: Any) -> list[int] | None:
        if v is None:
            return v
        if info.field_name == "global_batch_tokens":
            if any(not 1 <= b <= MAX_BATCH_TOKENS for b in v) or len(set(v)) != len(v):
                raise ValueError(f"values must be unique integers in 1..{MAX_BATCH_TOKENS}")
            return sorted(v)
        if any(b < 1 for b in v):
            raise ValueError("every value must be >= 1")
        if any(b > 10_000_000 for b in v):
            raise ValueError("every value must be <= 10000000")
        if len(set(v)) != len(v):
            raise ValueError("values must be unique")
        return sorted(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if any(s < 0 or s > 2**31 - 1 for s in v) or len(set(v)) != len(v):
            raise ValueError("seeds must be unique integers in 0..2147483647")
        return v

    @field_validator("eval_every_steps", "max_micro_batch_size", "max_micro_batch_tokens", mode="before")
    @classmethod
    def _int_or_auto(cls, v: Any) -> Any:
        return int_or_auto(v)

    @field_validator("eval_every_steps")
    @classmethod
    def _eval_steps(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 100_000_000:
            raise ValueError("must be 1..100000000 or 'auto'")
        return v

    @model_validator(mode="after")
    def _one_eval_interval(self) -> "SweepConfig":
        # A stored config.yaml carries every key at its value, so only a non-default epoch interval
        # beside eval_every_steps is a contradiction.
        if self.eval_every_steps is not None and self.eval_every_epochs != 1:
            raise ValueError("eval_every_steps and eval_every_epochs: give one of them")
        return self

    @field_validator("max_concurrent_runs", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        if v is None or (type(v) is int and not 1 <= v <= MAX_CONCURRENT_RUNS):
            raise ValueError(f"must be 1..{MAX_CONCURRENT_RUNS} or 'auto'")
        return int_or_auto(v)

    @model_validator(mode="after")
    def _search_seeds(self) -> "SweepConfig":
        chosen = self.lr_search.search_seeds if self.lr_search is not None else None
        if chosen is not None:
            if len(set(chosen)) != len(chosen) or not set(chosen) <= set(self.seeds):
                raise ValueError(f"lr_search.search_seeds: must be distinct seeds of the sweep's seeds "
                                 f"({', '.join(map(str, self.seeds))})")
        return self

    @field_validator("max_micro_batch_size", "max_micro_batch_tokens")
    @classmethod
    def _micro(cls, v: Any, info: Any) -> Any:
        top = MAX_BATCH_TOKENS if info.field_name == "max_micro_batch_tokens" else 10_000_000
        if isinstance(v, int) and not 1 <= v <= top:
            raise ValueError(f"must be 1..{top} or 'auto'")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> "SweepConfig":
        if (self.target_accuracy is None) == (self.target_loss is None):
            raise ValueError("give one target: target_accuracy (a test accuracy in (0, 1]) or target_loss "
                             "(a validation loss in nats, e.g. 3.0)")
        return self

    @model_validator(mode="after")
    def _batch_unit(self) -> "SweepConfig":
        """Samples or tokens, as the workload counts them: each key only where it means something."""
        tokens = self.batch_unit == "tokens"
        mine, other = ("global_batch_tokens", "global_batch_sizes") if tokens else ("global_batch_sizes",
                                                                                     "global_batch_tokens")
        if getattr(self, other) is not None:
            raise ValueError(f"{other}: not for workload {self.workload!r}, which counts its batches in "
                             f"{self.batch_unit}; use {mine}")
        if getattr(self, mine) is None:
            raise ValueError(f"{mine}: required for workload {self.workload!r} (its batch unit is {self.batch_unit})")
        spelled = ("max_micro_batch_tokens", "max_tokens") if not tokens else ("max_micro_batch_size",)
        for key in spelled:
            if getattr(self, key) is not None:
                raise ValueError(f"{key}: not for workload {self.workload!r}"
                                 + ("; use max_micro_batch_tokens" if tokens else " (language models only)"))
        if self.target_loss is not None and self.lr_search is not None:
            raise ValueError("lr_search: chooses on steps to a target accuracy and final accuracy; not yet "
                             "available with target_loss")
        if tokens and self.noise_scale_every_steps and self.workload_options.get("batching") == "bucket":
            raise ValueError("noise_scale_every_steps: needs equal micro-batches, which length-bucketed batching "
                             "does not give (use workload_options.batching: pack)")
        return self

    @model_validator(mode="after")
    def _workload(self) -> "SweepConfig":
        if self.workload not in workloads.REGISTRY:
            raise ValueError(f"workload: unknown {self.workload!r} (allowed: {', '.join(sorted(workloads.REGISTRY))})")
        info = workloads.get(self.workload)
        try:
            info.options.model_validate(self.workload_options, strict=True)
        except ValidationError as err:
            raise ValueError("workload_options: " + first_error(err)) from None
        if self.model is not None and self.model not in info.models:
            raise ValueError(f"model: {self.model!r} does not fit workload {self.workload!r} "
                             f"(allowed: {', '.join(info.models)})")
        return self

    # --- derived ------------------------------------------------------------------------
    @property
    def batch_unit(self) -> str:
        """What a global batch counts: "tokens" (workload lm) or "samples"."""
        return "tokens" if self.workload in TOKEN_WORKLOADS else "samples"

    @property
    def batch_sizes(self) -> list[int]:
        """The global batches, in the workload's batch unit."""
        return list(self.global_batch_tokens if self.batch_unit == "tokens" else self.global_batch_sizes)

    @property
    def micro_batch_cap(self) -> int | str | None:
        """max_micro_batch_tokens for a token workload, else max_micro_batch_size."""
        return self.max_micro_batch_tokens if self.batch_unit == "tokens" else self.max_micro_batch_size

    @property
    def target(self) -> tuple[str, float]:
        """("accuracy", value) or ("loss", value)."""
        return ("loss", self.target_loss) if self.target_loss is not None else ("accuracy", self.target_accuracy)

    @property
    def model_name(self) -> str:
        return self.model or workloads.get(self.workload).default_model

    @property
    def options(self) -> BaseModel:
        return workloads.get(self.workload).options.model_validate(self.workload_options)

    def dataset_sizes(self) -> tuple[int, int]:
        return workloads.get(self.workload).sizes(self.options)

    def config_hash(self) -> str:
        # Defaults left out: a key added later (at its default) does not change old sweeps' hash.
        # max_concurrent_runs is left out too: a sweep resumed with other concurrency is the same sweep.
        blob = json.dumps(self.model_dump(mode="json", exclude_defaults=True, exclude={"max_concurrent_runs"}),
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --- loading -------------------------------------------------------------------------------

def read_yaml(path: Path) -> dict[str, Any]:
    """Safe-load a config file through bench.safeio (a regular file, at most MAX_YAML_BYTES, no
    duplicate keys, at most MAX_YAML_VALUES values); every failure becomes one ConfigError line
    naming ``path``. A symbolic link the user names is followed (it is their own file)."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        data = safeio.parse_yaml(safeio.read_text(target, "config"), path=path, max_nodes=MAX_YAML_VALUES,
                                 name_keys=True)
    except safeio.UnsafeFile as err:
        raise ConfigError(f"{path}: {err.reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {kind(data)}")
    return data


def resolve_sweep_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the bare name of a packaged sweep (bench/sweeps/NAME.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        return path
    packaged = PACKAGED_SWEEPS / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in PACKAGED_SWEEPS.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: no such sweep file, and no packaged sweep of that name (packaged: {known})")


def _token_dir_beside(data: dict[str, Any], path: Path) -> None:
    """A relative workload_options.token_dir is taken from the sweep file's folder (not from the
    current directory of whichever process reads it)."""
    options = data.get("workload_options")
    token_dir = options.get("token_dir") if isinstance(options, dict) else None
    workload = data.get("workload")
    if isinstance(token_dir, str) and isinstance(workload, str) and workload in TOKEN_WORKLOADS \
            and not Path(token_dir).expanduser().is_absolute():
        options["token_dir"] = str((path.parent / token_dir).resolve())


def load_sweep(name_or_path: str | Path) -> tuple[SweepConfig, Path]:
    path = resolve_sweep_path(str(name_or_path))
    data = read_yaml(path)
    _token_dir_beside(data, path)
    try:
        return SweepConfig.model_validate(data), path
    except ValidationError as err:
        raise ConfigError(f"{path}: {first_error(err)}") from None


def load_cluster(path: str | Path) -> tuple[ClusterConfig, Path]:
    path = Path(path)
    data = read_yaml(path)
    try:
        cluster = ClusterConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {first_error(err)}") from None
    if cluster.launcher is not None and not (path.parent / cluster.launcher).is_file():
        raise ConfigError(f"{path}: launcher: file {cluster.launcher!r} does not exist next to the cluster file")
    return cluster, path


DEFAULT_CLUSTER = Path(__file__).resolve().parent.parent / "clusters" / "local.yaml"


def default_cluster() -> tuple[ClusterConfig, Path | None]:
    """clusters/local.yaml when running from a checkout; the same settings built in otherwise."""
    if DEFAULT_CLUSTER.is_file():
        return load_cluster(DEFAULT_CLUSTER)
    return ClusterConfig(name="local", description="local Ray, CPU workers, gloo"), None
