"""Links by name: the nominal interconnect table, the reading of a cluster file's free-text
``hardware.interconnect``, and which link an all-reduce over W workers crosses.

Owns: ``NOMINAL`` (documented peak figures, one source per entry), ``parse_interconnect`` (text
-> the intra- and inter-node links it names, with what was assumed), ``Links`` (intra/inter link
and workers per node -> all-reduce seconds at any W) and ``links_for`` (a measured link wins over
a nominal one inside a node). Nominal figures are peaks: an all-reduce reaches less (nccl-tests'
busbw on NVLink is typically well below the datasheet), so times built on them are optimistic.

Must not import: torch, ray, pandas; from bench only bench.comm.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Sequence

from bench.comm import GB, Link, hierarchical_allreduce_s, ring_allreduce_s

# NCCL's own cost model (NVIDIA/nccl src/graph/tuning.cc, ncclTunerConstantsDefaults, master of
# 2026-06): latency per ring step for the Simple protocol (the one large gradient buckets use) by
# hardware class, and the base latency of a Ring/Simple call. Microseconds.
NCCL_RING_STEP_US = {"nvlink": 3.4, "pci": 5.7, "net": 14.0}
NCCL_RING_BASE_US = 8.4


@dataclass(frozen=True)
class NominalLink:
    key: str
    label: str
    scope: Literal["intra", "inter"]  # inside a node (per GPU) or between nodes (per port)
    hw: Literal["nvlink", "pci", "net"]  # NCCL's latency class
    bandwidth_bytes_per_s: float | None  # one direction; None: depends on the instance, state it
    pattern: str  # regular expression, matched case-insensitively
    source: str


_ETH = r"\b{n}\s*(?:g|gb|gbit)?(?:e|ige|\s*(?:gb/s|gbps)?\s*ethernet)\b"
NOMINAL: tuple[NominalLink, ...] = (
    NominalLink("nvlink3", "NVLink 3", "intra", "nvlink", 300 * GB, r"\bnvlink\s*-?\s*(?:v?3|3\.0)\b",
                "NVIDIA A100 datasheet: NVLink 600 GB/s per GPU, both directions together"),
    NominalLink("nvlink4", "NVLink 4", "intra", "nvlink", 450 * GB, r"\bnvlink\s*-?\s*(?:v?4|4\.0)\b",
                "NVIDIA H100 and H200 datasheets: NVLink 900 GB/s per GPU, both directions together"),
    NominalLink("nvlink5", "NVLink 5", "intra", "nvlink", 900 * GB, r"\bnvlink\s*-?\s*(?:v?5|5\.0)\b",
                "NVIDIA DGX B200 / GB200 NVL72 datasheets: NVLink 1.8 TB/s per GPU, both directions together"),
    NominalLink("pcie4", "PCIe Gen4 x16", "intra", "pci", 16 * 16 * 128 / 130 / 8 * GB,
                r"\bpci-?e?\s*(?:gen\s*)?4(?:\.0)?\b",
                "PCI-SIG PCIe 4.0: 16 GT/s per lane, 128b/130b encoding, x16 = 31.5 GB/s per direction"),
    NominalLink("pcie5", "PCIe Gen5 x16", "intra", "pci", 32 * 16 * 128 / 130 / 8 * GB,
                r"\bpci-?e?\s*(?:gen\s*)?5(?:\.0)?\b",
                "PCI-SIG PCIe 5.0: 32 GT/s per lane, 128b/130b encoding, x16 = 63.0 GB/s per direction"),
    NominalLink("ib_hdr", "InfiniBand HDR", "inter", "net", 25 * GB, r"\bhdr\b",
                "InfiniBand Trade Association HDR: 200 Gb/s per 4x port (NVIDIA ConnectX-6)"),
    NominalLink("ib_ndr", "InfiniBand NDR", "inter", "net", 50 * GB, r"\bndr\b",
                "InfiniBand Trade Association NDR: 400 Gb/s per 4x port (NVIDIA ConnectX-7, Quantum-2)"),
    NominalLink("ib_xdr", "InfiniBand XDR", "inter", "net", 100 * GB, r"\bxdr\b",
                "InfiniBand Trade Association XDR: 800 Gb/s per port (NVIDIA ConnectX-8, Quantum-X800)"),
    NominalLink("eth100", "100 GbE", "inter", "net", 12.5 * GB, _ETH.format(n=100),
                "IEEE 802.3 (100GBASE): 100 Gb/s per port"),
    NominalLink("eth200", "200 GbE", "inter", "net", 25 * GB, _ETH.format(n=200),
                "IEEE 802.3bs: 200 Gb/s per port"),
    NominalLink("eth400", "400 GbE", "inter", "net", 50 * GB, _ETH.format(n=400),
                "IEEE 802.3bs: 400 Gb/s per port"),
    NominalLink("eth800", "800 GbE", "inter", "net", 100 * GB, _ETH.format(n=800),
                "IEEE 802.3df: 800 Gb/s per port"),
    NominalLink("efa", "AWS EFA", "inter", "net", None, r"\befa\b",
                "AWS instance specifications: per instance type (p4d 400 Gbps, p5 3200 Gbps): state the "
                "figure, e.g. 'EFA (3200 Gbps)'"),
)

_BANDWIDTH = re.compile(r"(\d+(?:\.\d+)?)\s*(Tb/s|Tbps|Tbit/s|Gb/s|Gbps|Gbit/s|TB/s|TBps|GB/s|GBps)")
_COUNT = r"(\d+)\s*[x×]\s*(?:[\w/.-]+\s+){0,3}$"  # "8x ", "8 x 400 Gb/s " just before the link name
_INTER = re.compile(r"between nodes|across nodes|inter-?node|node[- ]to[- ]node", re.I)
_INTRA = re.compile(r"within (?:a |the |one )?node|intra-?node|inside (?:a |the )?node|in a node", re.I)


def _bytes_per_s(number: str, unit: str) -> float:
    scale = 1e12 if unit[0] == "T" else 1e9
    return float(number) * scale / (1 if "B" in unit else 8)


@dataclass(frozen=True)
class ParsedInterconnect:
    intra: Link | None
    inter: Link | None
    notes: tuple[str, ...]  # what was assumed or not understood


def _link(entry: NominalLink, part: str, start: int, scope: str) -> tuple[Link | None, str | None]:
    """The Link a part of the text names; (None, why) when its bandwidth is not known."""
    stated = _BANDWIDTH.search(part)
    count = re.search(_COUNT, part[:start], re.I)
    ports = int(count[1]) if count and scope == "inter" else 1
    alpha_s, base_s = NCCL_RING_STEP_US[entry.hw] * 1e-6, NCCL_RING_BASE_US * 1e-6
    latency = f"alpha {NCCL_RING_STEP_US[entry.hw]:g} us per step + {NCCL_RING_BASE_US:g} us per call " \
              "(NCCL's Ring/Simple model, src/graph/tuning.cc)"
    if stated:
        per = _bytes_per_s(stated[1], stated[2])
        beta = per * ports
        what = (f"{ports} x {stated[0]} per node" if ports > 1 else
                f"{stated[0]} per node" if scope == "inter" else f"{stated[0]} per GPU")
        source, note = f"cluster file: '{part.strip()}' ({what}); {latency}", None
    elif entry.bandwidth_bytes_per_s is None:
        return None, f"'{part.strip()}': {entry.label} bandwidth not stated ({entry.source})"
    else:
        beta = entry.bandwidth_bytes_per_s * ports
        source = f"nominal {entry.label}: {entry.source}; {latency}"
        note = (f"one {entry.label} port per node assumed (write e.g. '8x {entry.label}' in "
                "hardware.interconnect for one per GPU)" if scope == "inter" and ports == 1 else None)
    name = f"{ports}x {entry.label}" if ports > 1 else entry.label
    kind = "per node" if scope == "inter" else "per GPU"
    how = "as stated" if stated else "nominal"
    return Link(f"{name} ({how} {beta / GB:.4g} GB/s {kind})", alpha_s, beta, source, base_s=base_s), note


def parse_interconnect(text: str | None) -> ParsedInterconnect:
    """The links a cluster file's ``hardware.interconnect`` names. Parts are separated by ';'.
    Each part's link is the first table entry it matches; 'within a node' / 'between nodes'
    decide where it serves, else the entry's own scope. A bandwidth written in the part (e.g.
    '3200 Gbps', '400 GB/s') replaces the nominal figure: per GPU inside a node; between nodes,
    per node, or per port when a count is given ('8x NDR 400 Gb/s'). Unknown stays unknown."""
    if text is None or not str(text).strip():
        return ParsedInterconnect(None, None, ("no hardware.interconnect in the cluster file",))
    found: dict[str, Link] = {}
    notes: list[str] = []
    for part in (p for p in str(text).split(";") if p.strip()):
        match = None
        for entry in NOMINAL:
            m = re.search(entry.pattern, part, re.I)
            if m and (match is None or m.start() < match[1].start()):
                match = (entry, m)
        if match is None:
            hint = " (NVLink generation not stated: write NVLink 3, 4 or 5)" if "nvlink" in part.lower() else ""
            notes.append(f"'{part.strip()}' not recognised{hint}")
            continue
        entry, m = match
        scope = "inter" if _INTER.search(part) else "intra" if _INTRA.search(part) else entry.scope
        link, note = _link(entry, part, m.start(), scope)
        if note:
            notes.append(note)
        if link is not None and scope not in found:
            found[scope] = link
    return ParsedInterconnect(found.get("intra"), found.get("inter"), tuple(notes))


@dataclass(frozen=True)
class Links:
    """The links an all-reduce over W workers crosses: ``intra`` between the workers of a node,
    ``inter`` between nodes (its bandwidth the node's aggregate). ``workers_per_node`` None:
    unknown, every W is taken to fit on one node (said in ``assumptions``)."""

    intra: Link | None
    inter: Link | None
    workers_per_node: int | None
    assumptions: tuple[str, ...] = ()

    def num_nodes(self, num_workers: int) -> int:
        return 1 if not self.workers_per_node else math.ceil(num_workers / self.workers_per_node)

    def allreduce_s(self, size_bytes: float, num_workers: int,
                    bucket_bytes: Sequence[float] | None = None) -> float | None:
        """Seconds to all-reduce ``size_bytes`` (in one call per bucket of ``bucket_bytes`` when
        given); None where a link it needs is unknown."""
        nodes = self.num_nodes(num_workers)
        if num_workers == 1:
            return 0.0
        if nodes == 1:
            return None if self.intra is None else ring_allreduce_s(size_bytes, num_workers, self.intra,
                                                                    bucket_bytes=bucket_bytes)
        if self.inter is None or (self.intra is None and num_workers > nodes):
            return None
        return hierarchical_allreduce_s(size_bytes, num_workers, nodes, self.intra, self.inter,
                                        bucket_bytes=bucket_bytes)

    def describe(self, num_workers: int) -> str:
        """Which link(s) serve W workers, for a row's note."""
        nodes = self.num_nodes(num_workers)
        if nodes == 1:
            return f"{self.intra.name if self.intra else 'unknown link'} within one node"
        intra = f"{self.intra.name if self.intra else 'unknown link'} within a node, " if num_workers > nodes else ""
        return f"{intra}{self.inter.name if self.inter else 'unknown link'} between {nodes} nodes"


def links_for(*, measured: Link | None = None, interconnect: str | None = None,
              workers_per_node: int | None = None) -> Links:
    """Links for planning: a ``measured`` link (``AllreduceResult.link``, taken on one node of the
    system planned for) serves inside a node, in place of the nominal one; between nodes, the
    cluster file's ``hardware.interconnect``."""
    parsed = parse_interconnect(interconnect)
    notes = list(parsed.notes)
    intra = measured or parsed.intra
    if measured is not None and parsed.intra is not None:
        notes.append(f"within a node the measured link is used, not the nominal {parsed.intra.name}")
    if not workers_per_node:
        notes.append("workers per node unknown: every worker count is taken to fit on one node")
    for where, link in (("within a node", intra), ("between nodes", parsed.inter)):
        if link is not None:
            notes.append(f"link {where}: {link.name}, from {link.source}")
    return Links(intra, parsed.inter, workers_per_node or None, tuple(notes))
