"""Sweep and cluster configuration: one pydantic model each, validated at the door.

Owns: the schema of sweep YAML and cluster YAML files (docs/sweep-files.md is its reference),
loading them through bench.safeio, and the translation of any validation failure into one line
naming the file, the key and what is allowed (``ConfigError``; the CLI exits 2 with it).

Validation is strict where YAML would otherwise be guessed at: an integer is an integer (not
``true``, not ``"64"``, not ``64.0``), a number is an int or a float (not a string, not a
boolean, not NaN or infinity), a boolean is ``true``/``false`` (not ``"yes"``, not ``1``), a
string is a string; a key given twice is refused by the loader. A cluster file that Ray Train's
``ScalingConfig`` or Ray's resource checks would refuse is refused here, before Ray starts.

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr,
                      ValidationError, field_validator, model_validator)

from bench import safeio, workloads
from bench.errors import ConfigError
from bench.names import check_name

PACKAGED_SWEEPS = Path(__file__).parent / "sweeps"
MAX_YAML_BYTES = safeio.LIMITS["config"]  # a sweep file is a few KB; larger files are refused unread
MAX_YAML_VALUES = 10_000  # a sweep file has a few hundred; a flat list of 300,000 is refused in milliseconds

# Strict scalars: YAML's "64", true and 64.0 are not the integer 64; "yes" is not a boolean.
Int = StrictInt
Bool = StrictBool
Str = StrictStr
Float = Annotated[float, Strict()]  # an int or a float; not a string or a boolean
IntOrAuto = Optional[Union[StrictInt, Literal["auto"]]]


class _Strict(BaseModel):
    # allow_inf_nan: NaN passes every < / > check, so it would validate and fail only inside Ray.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


def _int_or_auto(value: Any) -> Any:
    """Before validation of an ``N | auto`` key: a clear message instead of a union's two errors."""
    if value is None or value == "auto" or type(value) is int:
        return value
    raise ValueError(f"must be a whole number or 'auto' (got {_kind(value)})")


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adamw", "lars", "lamb"] = "sgd"
    momentum: Float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: Bool = False
    weight_decay: Float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[Annotated[float, Strict(), Field(ge=0.0, lt=1.0)],
                 Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: Float = Field(1e-8, gt=0.0, le=1.0)
    trust_coefficient: Float = Field(0.001, gt=0.0, le=1.0)  # lars
    exclude_bias_and_norm: Bool = True  # no weight decay / trust ratio on biases and norm layers


class LRConfig(_Strict):
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
    schedule: Literal["constant", "step", "cosine"] = "constant"
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
        if not all(0 < m < math.inf for m in v) or list(v) != sorted(v):
            raise ValueError("milestones must be positive and ascending")
        return v


class TelemetryConfig(_Strict):
    enabled: Bool = True
    hz: Float = Field(10.0, gt=0.0, le=1000.0, description="samples per second per worker")


class SweepConfig(_Strict):
    name: Str = Field(description="folder name under the results dir")
    description: Str = ""
    workload: Str
    workload_options: dict[Str, Any] = Field(default_factory=dict)
    model: Optional[Str] = None  # default: the workload's
    optimizer: OptimizerConfig = OptimizerConfig()
    lr: LRConfig
    label_smoothing: Float = Field(0.0, ge=0.0, lt=1.0)
    epochs: Int = Field(gt=0, le=100_000)
    max_steps: Optional[Int] = Field(None, gt=0, le=100_000_000, description="step budget; stops earlier")
    global_batch_sizes: list[Int] = Field(min_length=1, max_length=64)
    num_workers: list[Int] = Field([1], min_length=1, max_length=16)
    seeds: list[Int] = Field([0], min_length=1, max_length=100)
    # A micro-batch cap (gradient accumulation above it), or auto: the memory probe's choice per
    # per-worker batch (bench.plan.resolve_micro_batch reads results/<sweep>/memory-probe.json).
    max_micro_batch_size: IntOrAuto = None
    target_accuracy: Float = Field(gt=0.0, le=1.0, description="test accuracy that counts as reached")
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

    @field_validator("eval_every_steps", "max_micro_batch_size", mode="before")
    @classmethod
    def _int_or_auto(cls, v: Any) -> Any:
        return _int_or_auto(v)

    @field_validator("eval_every_steps")
    @classmethod
    def _eval_steps(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 100_000_000:
            raise ValueError("must be 1..100000000 or 'auto'")
        return v

    @model_validator(mode="after")
    def _one_eval_interval(self) -> "SweepConfig":
        if self.eval_every_steps is not None and "eval_every_epochs" in self.model_fields_set:
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
            info.options.model_validate(self.workload_options, strict=True)
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
    gpu_model: Optional[Str] = None
    gpus_per_node: Int = Field(0, ge=0, le=1024)
    nodes: Int = Field(1, ge=1, le=100_000)
    interconnect: Optional[Str] = None
    cpu_model: Optional[Str] = None
    price_per_gpu_hour: Optional[Float] = Field(None, ge=0.0)


# Ray's resource names are case-sensitive; a lower-case "gpu" would be a custom resource no node
# has, and the workers would wait for it forever.
_RAY_RESOURCE_NAMES = {"cpu": "CPU", "gpu": "GPU", "tpu": "TPU", "memory": "memory",
                       "num_cpus": "CPU", "num_gpus": "GPU", "num_tpus": "TPU"}
RESOURCE_PRECISION = 0.0001  # Ray: "the precision of the fractional quantity ... cannot go beyond 0.0001"
MAX_RESOURCE_AMOUNT = 1_000_000  # CPUs, GPUs, custom resources per worker
MAX_MEMORY_BYTES = 2**50  # resources_per_worker.memory is in bytes (Ray's unit)


def check_ray_address(address: str) -> str:
    """``auto`` or ``host:port`` (Ray's GCS address, e.g. 10.0.0.5:6379). Raises ValueError for
    anything else, with what to do instead: ``ray://`` (Ray Client) is refused -- Ray's own docs
    say Ray Client "may not work as expected when using Ray for ML workloads (like Ray Tune or
    Ray Train)" and recommend Ray Jobs; and batchscale's driver writes and reads the results
    folder on its own disk, so it has to run on the cluster: ``ray job submit``."""
    if address == "auto":
        return address
    scheme, sep, rest = address.partition("://")
    if sep and scheme.lower() == "ray":
        raise ValueError("ray:// (Ray Client) is not supported: Ray Train does not work reliably through it and "
                         "the results would be written on the cluster, not here. Run batchscale on the cluster "
                         "with `ray job submit --address http://HEAD:8265 --working-dir . -- batchscale run SWEEP "
                         "--cluster FILE` and address: auto in FILE (see docs/clusters.md)")
    if sep and scheme.lower() in ("http", "https"):
        raise ValueError(f"{scheme}:// is the address of Ray's dashboard and job server (port 8265): give it to "
                         "`ray job submit --address`, and use address: auto (or the head's host:port, e.g. "
                         "10.0.0.5:6379) in the cluster file")
    if sep:
        raise ValueError(f"unknown scheme {scheme[:20]!r}; allowed: auto, or host:port such as 10.0.0.5:6379")
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535 \
            or any(c.isspace() or c == "/" for c in host):
        raise ValueError("must be auto or host:port with a port 1..65535, e.g. 10.0.0.5:6379; "
                         "leave it out (null) to start a local Ray")
    return address


class ClusterConfig(_Strict):
    name: Str
    description: Str = ""
    address: Optional[Str] = Field(None, description="Ray address: auto or host:port; none: local Ray")
    use_gpu: Bool = False
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="collective backend; auto: nccl with GPUs, gloo without. Workers sharing "
        "one GPU (resources_per_worker.GPU < 1) need gloo: two NCCL ranks on one GPU fail")
    resources_per_worker: dict[Str, Float] = Field(default_factory=lambda: {"CPU": 1})
    local_num_cpus: Optional[Int] = Field(None, ge=1, le=4096, description="logical CPUs for a local Ray")
    connect_timeout_s: Float = Field(10.0, gt=0.0, le=600.0)
    storage_path: Optional[Str] = Field(None, description="shared storage for results on multi-node clusters")
    max_failures: Int = Field(0, ge=-1, le=1000, description="Ray Train worker-group restarts; -1 forever")
    checkpoint_every_epochs: Int = Field(0, ge=0, le=100_000, description="0: no checkpoints")
    hardware: HardwareConfig = HardwareConfig()
    launcher: Optional[Str] = Field(None, description="cluster-launcher YAML or KubeRay manifest, relative to this file")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v, "cluster name")

    @field_validator("address")
    @classmethod
    def _address(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else check_ray_address(v)

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: Optional[str]) -> Optional[str]:
        # Ray Train hands it to pyarrow, which refuses a relative path ("URI has empty scheme").
        if v is not None and "://" not in v and not v.startswith(("/", "~")):
            raise ValueError("must be an absolute path (on storage every node shares) or a URI such as "
                             "s3://bucket/path")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            canonical = _RAY_RESOURCE_NAMES.get(name.lower())
            if canonical is not None and name != canonical:
                raise ValueError(f"{name}: Ray's resource names are case-sensitive: write {canonical}")
            if not name.strip():
                raise ValueError("a resource name must not be empty")
            limit = MAX_MEMORY_BYTES if name == "memory" else MAX_RESOURCE_AMOUNT
            if not 0 <= amount <= limit:
                raise ValueError(f"{name}: {amount:g} is outside 0..{limit:g}"
                                 + (" (bytes)" if name == "memory" else ""))
            if 0 < amount < RESOURCE_PRECISION:
                raise ValueError(f"{name}: {amount:g} is finer than Ray's resource precision ({RESOURCE_PRECISION})")
            if name == "GPU" and amount > 1 and amount != int(amount):
                raise ValueError(f"GPU: {amount:g}; Ray allocates more than one GPU only in whole GPUs "
                                 "(a fraction is allowed below 1, to share a GPU)")
        if v.get("TPU", 0) > 0:
            raise ValueError("TPU: batchscale runs workers on CPUs or GPUs (Ray Train needs use_tpu, "
                             "which batchscale does not set)")
        return v

    @model_validator(mode="after")
    def _gpu(self) -> "ClusterConfig":
        """What Ray Train's ScalingConfig (and Ray's placement groups) would refuse, refused here."""
        gpus = self.resources_per_worker.get("GPU")
        if not self.use_gpu and gpus:
            raise ValueError(f"resources_per_worker.GPU is {gpus:g} but use_gpu is false (Ray Train refuses "
                             "that); set use_gpu: true, or remove GPU")
        if self.use_gpu and gpus is not None and gpus <= 0:
            raise ValueError("use_gpu is true but resources_per_worker.GPU is 0")
        if not self.use_gpu and not any(q > 0 for q in self.resources_per_worker.values()):
            raise ValueError("resources_per_worker asks for nothing; Ray cannot place a worker that needs no "
                             "resource (e.g. {CPU: 1})")
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend nccl needs use_gpu: true (NCCL runs on GPUs only)")
        if self.backend != "gloo" and self.use_gpu and self.resources_per_worker.get("GPU", 1) < 1:
            raise ValueError("workers sharing a GPU (resources_per_worker.GPU < 1) need backend: gloo; "
                             "two NCCL ranks on one GPU fail")
        per_node = self.hardware.gpus_per_node
        if self.use_gpu and per_node and (gpus or 1) > per_node:
            raise ValueError(f"resources_per_worker.GPU is {gpus or 1:g} but hardware.gpus_per_node is {per_node}: "
                             "no node can hold one worker")
        cpus = self.resources_per_worker.get("CPU", 0 if self.use_gpu else 1)
        if self.address is None and self.local_num_cpus is not None and cpus > self.local_num_cpus:
            raise ValueError(f"resources_per_worker.CPU is {cpus:g} but local_num_cpus is {self.local_num_cpus}: "
                             "not even one worker fits in the local Ray")
        return self


# --- loading -------------------------------------------------------------------------------

def _kind(value: Any) -> str:
    """What YAML value a user wrote, in words (never the value itself)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"  # date, datetime, bytes (!!binary), set


_TYPE_ERRORS = {"int_type", "float_type", "bool_type", "string_type", "dict_type", "list_type", "tuple_type",
                "literal_error", "model_type", "model_attributes_type", "int_from_float"}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (a key)"
        else:
            out += ("." if out else "") + str(part)
    return out


def _got(e: dict) -> str:
    """What the user wrote instead: a short word for a refused choice, else its kind."""
    value = e.get("input")
    if e["type"] == "literal_error" and isinstance(value, str) and len(value) <= 40 and value.isprintable():
        return repr(value)
    return _kind(value)


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] in _TYPE_ERRORS:
        msg += f" (got {_got(e)})"
    more = len(err.errors()) - 1
    where = _where(e["loc"])
    return (f"{where}: " if where else "") + msg + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def read_yaml(path: Path) -> dict[str, Any]:
    """Safe-load a config file through bench.safeio (a regular file, at most MAX_YAML_BYTES, no
    duplicate keys, at most MAX_YAML_VALUES values); every failure becomes one ConfigError line
    naming ``path``. A symbolic link the user names is followed (it is their own file)."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        data = safeio.parse_yaml(safeio.read_text(target, "config"), path=path, max_nodes=MAX_YAML_VALUES)
    except safeio.UnsafeFile as err:
        raise ConfigError(f"{path}: {err.reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {_kind(data)}")
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
