"""Sweep and cluster configuration: one pydantic model each, validated at the door.

Owns: the schema of sweep YAML and cluster YAML files, safe loading, and the
translation of any validation failure into one line naming the file, the key
and what is allowed (``ConfigError``; the CLI exits 2 with it).

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import math
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench import workloads
from bench.errors import ConfigError
from bench.names import check_name

PACKAGED_SWEEPS = Path(__file__).parent / "sweeps"
MAX_YAML_BYTES = 1_000_000  # a sweep file is a few KB; refuse anything absurd before parsing


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adamw", "lars", "lamb"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    trust_coefficient: float = Field(0.001, gt=0.0, le=1.0)  # lars
    exclude_bias_and_norm: bool = True  # no weight decay / trust ratio on biases and norm layers


class LRConfig(_Strict):
    # The LR tuned at a reference batch; the rule scales it to each global batch. Called base_lr /
    # base_batch_size before (still accepted): MLPerf's opt_base_learning_rate is the *peak* LR.
    reference_lr: float = Field(gt=0.0, le=1000.0, validation_alias=AliasChoices("reference_lr", "base_lr"),
                                description="LR at reference_batch_size")
    reference_batch_size: int = Field(gt=0, le=10_000_000,
                                      validation_alias=AliasChoices("reference_batch_size", "base_batch_size"),
                                      description="global batch the reference_lr was tuned for")
    scaling: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: float = Field(0.0, ge=0.0, le=10_000.0)
    warmup_steps: Optional[int] = Field(None, ge=0, le=100_000_000, description="overrides warmup_epochs")
    schedule: Literal["constant", "step", "cosine"] = "constant"
    step_milestones_epochs: tuple[float, ...] = ()  # schedule: step
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)

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
        if not all(0 < m < math.inf for m in v) or list(v) != sorted(v):
            raise ValueError("milestones must be positive and ascending")
        return v


class TelemetryConfig(_Strict):
    enabled: bool = True
    hz: float = Field(10.0, gt=0.0, le=1000.0, description="samples per second per worker")


class SweepConfig(_Strict):
    name: str = Field(description="folder name under the results dir")
    description: str = ""
    workload: str
    workload_options: dict[str, Any] = Field(default_factory=dict)
    model: Optional[str] = None  # default: the workload's
    optimizer: OptimizerConfig = OptimizerConfig()
    lr: LRConfig
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    epochs: int = Field(gt=0, le=100_000)
    max_steps: Optional[int] = Field(None, gt=0, le=100_000_000, description="step budget; stops earlier")
    global_batch_sizes: list[int] = Field(min_length=1, max_length=64)
    num_workers: list[int] = Field([1], min_length=1, max_length=16)
    seeds: list[int] = Field([0], min_length=1, max_length=100)
    max_micro_batch_size: Optional[Union[int, Literal["auto"]]] = None
    target_accuracy: float = Field(gt=0.0, le=1.0, description="test accuracy that counts as reached")
    eval_every_epochs: int = Field(1, gt=0, le=100_000)
    # Evaluate every N optimizer steps instead of at epoch ends (the resolution of steps-to-target
    # is the interval before the crossing). auto: at geometrically spaced steps, EVALS_PER_DOUBLING
    # per doubling of the step count (so every crossing after step 8 has >= 8 evaluations before it
    # and a resolution <= 16 %), plus every epoch end and the last step.
    eval_every_steps: Optional[Union[int, Literal["auto"]]] = None
    # Training samples the train_* metrics are measured on: a fixed, evenly spaced subset, to bound
    # what frequent evaluation costs (None: the whole training set; streamed ImageNet has its own
    # workload_options.train_eval_samples).
    train_eval_samples: Optional[int] = Field(None, gt=0, le=100_000_000)
    # Sustained time-to-target: the target counts as held once it is reached at this many
    # consecutive evaluations (shown beside MLPerf's first crossing).
    target_hold_evals: int = Field(3, ge=1, le=10_000)
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    divergence_loss_factor: float = Field(10.0, gt=1.0, description="diverged if loss > factor x initial")
    noise_scale_every_steps: int = Field(0, ge=0, le=1_000_000, description="0: off")
    telemetry: TelemetryConfig = TelemetryConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v, "sweep name")

    @field_validator("global_batch_sizes", "num_workers")
    @classmethod
    def _positive_unique(cls, v: list[int]) -> list[int]:
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

    @field_validator("max_micro_batch_size")
    @classmethod
    def _micro(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 10_000_000:
            raise ValueError("must be 1..10000000 or 'auto'")
        return v

    @model_validator(mode="after")
    def _workload(self) -> "SweepConfig":
        if self.workload not in workloads.REGISTRY:
            raise ValueError(f"workload: unknown {self.workload!r} (allowed: {', '.join(sorted(workloads.REGISTRY))})")
        info = workloads.get(self.workload)
        try:
            info.options.model_validate(self.workload_options)
        except ValidationError as err:
            raise ValueError("workload_options: " + _first_error(err)) from None
        if self.model is not None and self.model not in info.models:
            raise ValueError(f"model: {self.model!r} does not fit workload {self.workload!r} "
                             f"(allowed: {', '.join(info.models)})")
        return self

    # --- derived ------------------------------------------------------------------------
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
        blob = json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class HardwareConfig(_Strict):
    gpu_model: Optional[str] = None
    gpus_per_node: int = Field(0, ge=0, le=1024)
    nodes: int = Field(1, ge=1, le=100_000)
    interconnect: Optional[str] = None
    cpu_model: Optional[str] = None
    price_per_gpu_hour: Optional[float] = Field(None, ge=0.0)


class ClusterConfig(_Strict):
    name: str
    description: str = ""
    address: Optional[str] = Field(None, description="Ray address (host:port or ray://host:10001); none: local Ray")
    use_gpu: bool = False
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="collective backend; auto: nccl with GPUs, gloo without. Workers sharing "
        "one GPU (resources_per_worker.GPU < 1) need gloo: two NCCL ranks on one GPU fail")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    local_num_cpus: Optional[int] = Field(None, ge=1, le=4096, description="logical CPUs for a local Ray")
    connect_timeout_s: float = Field(10.0, gt=0.0, le=600.0)
    storage_path: Optional[str] = Field(None, description="shared storage for results on multi-node clusters")
    max_failures: int = Field(0, ge=-1, le=1000, description="Ray Train worker-group restarts; -1 forever")
    checkpoint_every_epochs: int = Field(0, ge=0, le=100_000, description="0: no checkpoints")
    hardware: HardwareConfig = HardwareConfig()
    launcher: Optional[str] = Field(None, description="cluster-launcher YAML or KubeRay manifest, relative to this file")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v, "cluster name")

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        if not all(0 <= q <= 1_000_000 for q in v.values()):  # also refuses NaN
            raise ValueError("resource amounts must be in 0..1000000")
        return v

    @model_validator(mode="after")
    def _gpu(self) -> "ClusterConfig":
        if self.use_gpu and self.resources_per_worker.get("GPU", 1) <= 0:
            raise ValueError("use_gpu is true but resources_per_worker.GPU is 0")
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend nccl needs use_gpu: true (NCCL runs on GPUs only)")
        if self.backend != "gloo" and self.use_gpu and self.resources_per_worker.get("GPU", 1) < 1:
            raise ValueError("workers sharing a GPU (resources_per_worker.GPU < 1) need backend: gloo; "
                             "two NCCL ranks on one GPU fail")
        return self


# --- loading -------------------------------------------------------------------------------

def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    more = len(err.errors()) - 1
    return f"{loc}: {msg}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def read_yaml(path: Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; every failure becomes a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: file is {size} bytes; a config file must be under {MAX_YAML_BYTES}")
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        # Alias bombs expand lazily into shared objects; serialising would blow up, so bound it.
        _check_size(data, budget=[100_000])
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except (UnicodeDecodeError, OSError, RecursionError) as err:
        raise ConfigError(f"{path}: cannot read ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _check_size(node: Any, budget: list[int], depth: int = 0) -> None:
    budget[0] -= 1
    if budget[0] < 0 or depth > 50:
        raise ConfigError("config is too large or too deeply nested (YAML alias expansion?)")
    if isinstance(node, dict):
        for k, v in node.items():
            _check_size(k, budget, depth + 1)
            _check_size(v, budget, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _check_size(v, budget, depth + 1)


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


def load_sweep(name_or_path: str | Path) -> tuple[SweepConfig, Path]:
    path = resolve_sweep_path(str(name_or_path))
    data = read_yaml(path)
    try:
        return SweepConfig.model_validate(data), path
    except ValidationError as err:
        raise ConfigError(f"{path}: {_first_error(err)}") from None


def load_cluster(path: str | Path) -> tuple[ClusterConfig, Path]:
    path = Path(path)
    data = read_yaml(path)
    try:
        cluster = ClusterConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {_first_error(err)}") from None
    if cluster.launcher is not None and not (path.parent / cluster.launcher).is_file():
        raise ConfigError(f"{path}: launcher: file {cluster.launcher!r} does not exist next to the cluster file")
    return cluster, path


DEFAULT_CLUSTER = Path(__file__).resolve().parent.parent / "clusters" / "local.yaml"


def default_cluster() -> tuple[ClusterConfig, Path | None]:
    """clusters/local.yaml when running from a checkout; the same settings built in otherwise."""
    if DEFAULT_CLUSTER.is_file():
        return load_cluster(DEFAULT_CLUSTER)
    return ClusterConfig(name="local", description="local Ray, CPU workers, gloo"), None
