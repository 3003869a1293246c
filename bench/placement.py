"""Will a worker group fit? Arithmetic on Ray resource dictionaries, before anything waits.

Owns: what one Ray Train worker asks Ray for (as Ray Train's ``ScalingConfig`` computes it:
amounts of 0 dropped, ``GPU: 1`` added with ``use_gpu``), and whether ``num_workers`` such
workers can be placed, each worker's bundle on a single node, on a set of nodes; or, where the
cluster's autoscaler publishes its node types, within the most the cluster can grow to.

Ray itself never says no: a placement group that cannot be satisfied waits forever. The launcher
asks here twice: before a local Ray starts (on the one node it would have) and after connecting,
before ``fit()`` (on the live nodes), so that a group that can never start fails in one line that
names the missing resource.

Must not import: ray, torch, pandas.
"""

from __future__ import annotations

from typing import Iterable, Mapping

EPS = 1e-9  # Ray keeps resource amounts to 1e-4; GPU: 0.5 twice must fit one GPU exactly


def worker_resources(resources_per_worker: Mapping[str, float], use_gpu: bool) -> dict[str, float]:
    """What Ray Train reserves for one worker (ray.air.ScalingConfig._resources_per_worker_not_none
    in Ray 2.60): the cluster file's amounts without the zeros, and one GPU when use_gpu asks for
    GPUs and names no amount."""
    need = {name: float(amount) for name, amount in resources_per_worker.items() if amount != 0}
    if use_gpu:
        need.setdefault("GPU", 1.0)
    return need


def workers_per_node(need: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many workers needing ``need`` one node with ``node`` resources holds."""
    if not need:
        return 1 << 30
    return min(int(node.get(name, 0.0) / amount + EPS) for name, amount in need.items())


def workers(n: int) -> str:
    return f"{n} worker{'s' * (n != 1)}"


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _names(totals: Mapping[str, float]) -> str:
    """Resource names a person can act on: Ray's per-node markers (node:IP, accelerator_type:X)
    left out."""
    shown = sorted(k for k, v in totals.items() if v > 0 and ":" not in k)
    return ", ".join(shown) if shown else "nothing"


def placement_problem(need: Mapping[str, float], num_workers: int, nodes: Iterable[Mapping[str, float]], *,
                      max_totals: Mapping[str, float] | None = None, where: str = "the cluster") -> str | None:
    """None if ``num_workers`` workers needing ``need`` each can be placed, else why not (a clause
    to put after "cannot start N workers:"; it names the resource).

    ``nodes``: the resources of each live node. ``max_totals``: what an autoscaler can grow the
    cluster to (per resource, summed over node types x their max count), or None where no
    autoscaler says so; then the nodes there are now are all there will be, and each worker's
    bundle must also fit on one of them.
    """
    nodes = [dict(n) for n in nodes]
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            totals[name] = totals.get(name, 0.0) + float(amount)
    if max_totals:
        for name, amount in max_totals.items():
            totals[name] = max(totals.get(name, 0.0), float(amount))
    ceiling = " at most" if max_totals else ""
    missing = [name for name in need if totals.get(name, 0.0) <= 0]
    if missing:
        return (f"each worker needs {_fmt(need)}, but {where} has no {missing[0]!r} resource"
                f"{' at all' if not max_totals else ', nor can its autoscaler add it'} (it has {_names(totals)})")
    for name, amount in sorted(need.items()):
        wanted = amount * num_workers
        if wanted > totals[name] + EPS:
            return (f"{workers(num_workers)} x {amount:g} {name} = {wanted:g} {name}, but {where} has{ceiling} "
                    f"{totals[name]:g} {name}")
    if max_totals is None:
        fit = sum(workers_per_node(need, node) for node in nodes)
        if fit < num_workers:
            shapes: dict[str, list[int]] = {}  # node shape (the needed names only) -> [nodes, workers each]
            for node in nodes:
                entry = shapes.setdefault(_fmt({k: node.get(k, 0.0) for k in need}), [0, workers_per_node(need, node)])
                entry[0] += 1
            held = "; ".join(f"{n} node{'s' * (n > 1)} with {shape}: {each} each" for shape, (n, each) in shapes.items())
            return (f"each worker needs {_fmt(need)} on one node, and the nodes of {where} hold only {fit} "
                    f"such workers ({held})")
    return None
