"""``bench --peers``: other libraries' optimizers a user would pick instead, timed beside ours.

HeavyBall (a compile-first torch optimizer library: Muon, SOAP, PSGD-Kron and a Shampoo-family
optimizer, with its AdamW as a same-library reference) and, where it imports, pytorch_optimizer
(Shampoo, SOAP). They are the optional extra ``peers`` (``pip install -e ".[peers]"``). Each
runs at its library's defaults with learning rate 1e-3, on the same models and layer cases, through
the same measurement as our torch rows. A peer that raises while it is built or stepped (HeavyBall's
compiled optimizers can fail inside Inductor) gets the row ``crashes: <error type>`` and the run goes
on; it does not make the run fail.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any, Callable, Optional

from ..cli import UserError, pip_install

__all__ = ["PEERS", "PeerCode", "select", "check_available", "set_compile", "peer_rows", "INSTALL_HINT"]

INSTALL_HINT = pip_install("peers") + ", which installs HeavyBall and pytorch_optimizer"
LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class PeerCode:
    """One peer: the first of ``names`` that ``module`` has, built as ``cls(params, lr=1e-3, **kwargs)``."""

    key: str
    label: str
    module: str
    names: tuple[str, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()
    period: int = 1  # the window of steps that holds its refreshes (its preconditioner interval)


PEERS = (
    PeerCode("hb-adamw", "HeavyBall AdamW", "heavyball", ("AdamW", "ForeachAdamW")),
    PeerCode("hb-muon", "HeavyBall Muon", "heavyball", ("Muon", "ForeachMuon")),
    PeerCode("hb-soap", "HeavyBall SOAP (precondition_frequency 10)", "heavyball", ("SOAP", "ForeachSOAP"),
             (("precondition_frequency", 10),), period=10),
    PeerCode("hb-psgdkron", "HeavyBall PSGDKron", "heavyball", ("PSGDKron", "ForeachPSGDKron")),
    PeerCode("hb-klshampoo", "HeavyBall KLShampoo (precondition_frequency 10)", "heavyball", ("KLShampoo", "Shampoo", "ForeachShampoo"),
             (("precondition_frequency", 10),), period=10),
    PeerCode("po-shampoo", "pytorch_optimizer Shampoo", "pytorch_optimizer", ("Shampoo",), period=1),
    PeerCode("po-soap", "pytorch_optimizer SOAP", "pytorch_optimizer", ("SOAP",), period=10),
)


def _import(module: str) -> Optional[Any]:
    try:
        return importlib.import_module(module)
    except Exception:  # an optional library that fails to import is simply absent
        return None


def _version(module: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return getattr(sys.modules.get(module), "__version__", None)


def select(spec: str) -> tuple[PeerCode, ...]:
    """The peers named by ``--peers`` (``all``, or comma-separated keys of :data:`PEERS`)."""
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    if keys == ["all"]:
        return PEERS
    known = {p.key: p for p in PEERS}
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        raise UserError(f"--peers: unknown peer(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"use all or some of {', '.join(known)}")
    return tuple(known[k] for k in dict.fromkeys(keys))


def check_available(peers: tuple[PeerCode, ...] = PEERS) -> list[str]:
    """The peer libraries that import; a ``UserError`` naming the extra if none does."""
    found = [m for m in dict.fromkeys(p.module for p in peers) if _import(m) is not None]
    if not found:
        raise UserError(f"--peers needs the optional extra 'peers', which is not installed: {INSTALL_HINT}")
    return found


def set_compile(mode: str) -> None:
    """``library``: HeavyBall compiles its steps as it does by default (Inductor, max-autotune: minutes
    of compilation per optimizer on a small CPU); ``off``: its steps run eagerly."""
    if mode == "off":
        heavyball = _import("heavyball")
        if heavyball is not None and hasattr(heavyball, "utils"):
            heavyball.utils.compile_mode = None


def _crash_row(label: str, err: BaseException) -> dict:
    return {"crashed": type(err).__name__, "crash_message": str(err).splitlines()[0][:300] if str(err) else ""}


def peer_rows(
    measure: Callable[[Callable[[Any, list], tuple[Any, list[str]]], dict, dict], dict],
    timing: Callable[[Any], dict],
    peers: tuple[PeerCode, ...] = PEERS,
) -> tuple[list[dict], list[str]]:
    """Rows of the peers that import (method ``"peer"``), and notes on those skipped.

    ``measure(make, extra, timing)`` times ``make(module, named) -> (optimizer, notes)`` as our torch
    rows are timed; ``timing(None)`` is the baselines' window, lengthened to the peer's period.
    """
    rows, skipped = [], []
    for peer in peers:
        library = _import(peer.module)
        if library is None:
            skipped.append(f"{peer.label}: {peer.module} is not installed ({INSTALL_HINT})")
            continue
        cls = next((getattr(library, n) for n in peer.names if hasattr(library, n)), None)
        if cls is None:
            skipped.append(f"{peer.label}: {peer.module} {_version(peer.module) or ''} has none of {', '.join(peer.names)}")
            continue
        version = _version(peer.module)

        def make(module: Any, named: list, cls: Any = cls, peer: PeerCode = peer) -> tuple[Any, list[str]]:
            return cls([p for _, p in named], lr=LEARNING_RATE, **dict(peer.kwargs)), []

        row: dict[str, Any] = {"framework": "torch", "method": "peer", "variant": None, "label": peer.label,
                               "library": f"{peer.module} {version}" if version else peer.module}
        window = {**timing(None), "period": peer.period}
        try:
            row.update(measure(make, {}, window))
        except Exception as err:  # a peer's failure is its row, not the run's
            row.update(_crash_row(peer.label, err))
        rows.append(row)
    return rows, skipped
