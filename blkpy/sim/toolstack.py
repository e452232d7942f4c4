"""What libxl writes to xenstore to add and remove a vbd (sans-IO).

``disk_nodes`` returns the backend and frontend directories with their nodes and
permissions exactly as xl's `phy` backend type lays them out (xenbus-vbd spec §1, §3), so
the simulated host exercises the same handshake a real toolstack starts.
"""

from __future__ import annotations

import dataclasses

from blkpy.xenbus import XenbusState


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    """One disk of a guest, as an operator writes it in an xl disk line."""

    frontend_domid: int
    devid: int
    vdev: str
    target: str  # becomes `params` verbatim: a path, optionally `qcow2:`/`raw:` prefixed
    readonly: bool = False
    backend_domid: int = 0
    protocol: str | None = "x86_64-abi"  # libxl pre-writes it for PV guests
    script: str | None = None
    discard: bool = True
    #: backend kind: vbd (phy) or vbd3 (libxl's backendtype=tap since Xen 4.19)
    kind: str = "vbd"

    @property
    def backend_path(self) -> str:
        return (f"/local/domain/{self.backend_domid}/backend/{self.kind}/"
                f"{self.frontend_domid}/{self.devid}")

    @property
    def frontend_path(self) -> str:
        return f"/local/domain/{self.frontend_domid}/device/vbd/{self.devid}"


@dataclasses.dataclass(frozen=True)
class DirNodes:
    path: str
    perms: list[str]
    nodes: dict[str, str]


def disk_nodes(spec: DiskSpec) -> tuple[DirNodes, DirNodes]:
    """(backend, frontend) directories for ``spec``."""
    be, fe = spec.backend_domid, spec.frontend_domid
    backend = {
        "frontend": spec.frontend_path,
        "frontend-id": str(fe),
        # libxl's tap (vbd3) writes <format>:<target>, "aio" standing for raw
        "params": spec.target if spec.kind == "vbd" else f"aio:{spec.target}",
        "type": "phy" if spec.kind == "vbd" else "vbd3",
        "mode": "r" if spec.readonly else "w",
        "device-type": "disk",
        "online": "1",
        "removable": "0",
        "bootable": "1",
        "state": str(int(XenbusState.INITIALISING)),
        "dev": spec.vdev,
        "discard-enable": "1" if spec.discard and not spec.readonly else "0",
        "specification": "xen",
    }
    if spec.script:
        backend["script"] = spec.script
    frontend = {
        "backend": spec.backend_path,
        "backend-id": str(be),
        "state": str(int(XenbusState.INITIALISING)),
        "virtual-device": str(spec.devid),
        "device-type": "disk",
        "trusted": "1",
    }
    if spec.protocol:
        frontend["protocol"] = spec.protocol
    return (
        DirNodes(spec.backend_path, [f"n{be}", f"r{fe}"], backend),
        DirNodes(spec.frontend_path, [f"n{fe}", f"r{be}"], frontend),
    )


def removal_nodes(current_backend_state: XenbusState | None) -> dict[str, str]:
    """libxl's first removal step: online=0 and, unless already Closed, state=Closing."""
    nodes = {"online": "0"}
    if current_backend_state != XenbusState.CLOSED:
        nodes["state"] = str(int(XenbusState.CLOSING))
    return nodes
