"""The cluster file's schema: where Ray is and what each worker asks of it.

Owns: ``ClusterConfig`` / ``HardwareConfig``, the rule for a Ray address (``check_ray_address``:
``auto`` or ``host:port``; ``ray://`` is refused in favour of ``ray job submit``), and the checks
that refuse, at validation, what Ray Train's ``ScalingConfig`` or Ray's resource and
placement-group checks would refuse only once Ray runs (GPU without ``use_gpu``, names in the
wrong case, empty bundles, fractions Ray cannot represent). Whether the cluster *has* the
resources is checked after connecting, by bench.launcher. Loaded through bench.config.

Must not import: torch, ray, pandas.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from bench.names import check_name
from bench.schema import Bool, Float, Int, Str, StrictModel


class HardwareConfig(StrictModel):
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


class ClusterConfig(StrictModel):
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
