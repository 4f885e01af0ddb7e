"""One rank of the torch distributed scenarios; run by ``test_torch_distributed.py`` (not collected).

``python torch_worker.py RANK WORLD INIT_FILE OUT_DIR`` runs every scenario on the gloo backend and
saves, per scenario and rank, the trained parameters (``torch.save``) or the error each rank saw
(JSON), for the tests to compare against one process. Threads are pinned to 1 so that a rank and
the single-process reference run identical kernels.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Partial
from torch.nn.parallel import DistributedDataParallel

import precond_ref.adapters.torch as pt
import precond_ref.adapters.torch_distributed as ptd

GLOBAL_BATCH, STEPS = 8, 3

# One configuration per torch optimizer; root-free methods get the *global* batch size.
CONFIGS = {
    "agd": ("AGD", dict(lr=3e-2)),
    "asgo": ("ASGO", dict(lr=3e-2, weight_decay=1e-3)),
    "dasgo": ("DASGO", dict(lr=3e-2, weight_decay=1e-3)),
    "sketchy": ("Sketchy", dict(lr=3e-2, rank=2, weight_decay=1e-3, precondition_1d=True)),
    "s_adagrad": ("SAdaGrad", dict(lr=3e-1, rank=2, momentum=0.5)),
    "rf_rmsprop": ("RFRMSProp", dict(lr=5e-2, alpha=0.99, damping=1e-2, momentum=0.9, batch_size=GLOBAL_BATCH)),
    "rf_adamw": ("RFAdamW", dict(lr=5e-2, damping=1e-2, weight_decay=1e-3, batch_size=GLOBAL_BATCH)),
    "if_shampoo": ("IFShampoo", dict(lr=5e-2, preconditioner_lr=0.2, damping=1e-2, batch_size=GLOBAL_BATCH)),
    "mbf": ("MBF", dict(lr=3e-3, damping=0.1, statistics_every=1, precondition_every=2)),
}


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, GLOBAL_BATCH, 6, generator=gen), torch.randn(STEPS, GLOBAL_BATCH, 3, generator=gen)


def loss_fn(net, x, y):
    return torch.nn.functional.mse_loss(net(x), y)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    size = t.shape[0] // world
    return t[rank * size:(rank + 1) * size]


def plain(net) -> dict:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in net.named_parameters()}


def full_batch_grads() -> dict:
    net = model()
    xs, ys = data()
    loss_fn(net, xs[0], ys[0]).backward()
    return {n: p.grad for n, p in net.named_parameters()}


def head_model() -> torch.nn.Module:
    """A head of one output: on 2 ranks, FSDP2 gives rank 1 an empty shard of its weight and bias,
    and the first layer's 5 rows are split 3 + 2."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def references(name: str, world: int, make_model=model, outputs: int = 3) -> dict:
    """One process: the global batch's loss (``full``), and the mean of the ranks' shard gradients
    computed one shard at a time (``mean``: the numbers DDP/FSDP reduce, in the same order)."""
    cls, kwargs = CONFIGS[name]
    xs, ys = data()
    ys = ys[..., :outputs]
    out = {}
    for how in ("full", "mean"):
        net = make_model()
        opt = getattr(pt, cls)(net.named_parameters(), **kwargs)
        for x, y in zip(xs, ys):
            opt.zero_grad()
            if how == "full":
                loss_fn(net, x, y).backward()
            else:
                grads = []
                for r in range(world):
                    net.zero_grad()
                    loss_fn(net, shard(x, r, world), shard(y, r, world)).backward()
                    grads.append([p.grad.clone() for p in net.parameters()])
                for p, *gs in zip(net.parameters(), *grads):
                    p.grad = sum(gs[1:], gs[0]) / world
            opt.step()
        out[how] = plain(net)
    return out


def train(name: str, rank: int, world: int, wrap: str, distributed: bool, maximize: bool = False) -> tuple[dict, dict]:
    """``maximize``: the optimizer made with ``maximize=True`` and stepped on the negated loss."""
    cls, kwargs = CONFIGS[name]
    if maximize:
        kwargs = {**kwargs, "maximize": True}
    net = model()
    if wrap == "ddp":
        net = DistributedDataParallel(net)
        named = list(net.module.named_parameters())
    else:
        mesh = init_device_mesh("cpu", (world,))
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        named = list(net.named_parameters())
    make = getattr(ptd if distributed else pt, cls)
    opt = make(named, **kwargs)
    xs, ys = data()
    first_grads = None
    for step, (x, y) in enumerate(zip(xs, ys)):
        if distributed and step == 2:  # restart from this rank's checkpoint before the last step
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt = make(named, **kwargs)
            opt.load_state_dict(torch.load(buffer, weights_only=False))
        opt.zero_grad()
        loss = loss_fn(net, shard(x, rank, world), shard(y, rank, world))
        (-loss if maximize else loss).backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in named if not isinstance(p.grad, DTensor)}
        opt.step()
    info = {"first_grads": first_grads}
    if distributed:
        ids = {id(p): n for n, p in named}
        info |= {
            "owned": opt.owned_parameters(),
            "state": {ids[id(p)]: sorted(k for k in s if k not in ("step", "nonfinite_count", "calls", "core_group"))
                      for p, s in opt.state.items()},
        }
    return plain(net.module if wrap == "ddp" else net), info


def zero_redundancy(rank: int, world: int) -> dict:
    """Per method, the parameters after ``STEPS`` steps under DDP: of torch's
    ``ZeroRedundancyOptimizer`` wrapping the plain class (``"zero"``: each rank steps the parameters
    of its partition and broadcasts them; restarted before the last step from the state that
    ``consolidate_state_dict`` gathers on rank 0, sent to every rank), and of the plain class
    stepping every parameter on each rank (``"plain"``). Both take the parameters without names,
    as ``ZeroRedundancyOptimizer`` does (a block is then one tensor: MBF pairs no bias)."""
    out = {}
    for name, (cls, kwargs) in CONFIGS.items():
        make = getattr(pt, cls)
        runs = {}
        for how in ("plain", "zero"):
            net = DistributedDataParallel(model())
            params = list(net.module.parameters())
            if how == "zero":
                build = lambda: ZeroRedundancyOptimizer(params, optimizer_class=make, **kwargs)  # noqa: E731
            else:
                build = lambda: make(params, **kwargs)  # noqa: E731
            opt = build()
            xs, ys = data()
            for step, (x, y) in enumerate(zip(xs, ys)):
                if how == "zero" and step == 2:
                    opt.consolidate_state_dict(to=0)
                    saved = [opt.state_dict() if rank == 0 else None]
                    dist.broadcast_object_list(saved, src=0)
                    opt = build()
                    opt.load_state_dict(saved[0])
                opt.zero_grad()
                loss_fn(net, shard(x, rank, world), shard(y, rank, world)).backward()
                opt.step()
            runs[how] = plain(net.module)
        out[name] = runs
    return out


def elementwise_checkpoints(rank: int, world: int, out: str) -> dict:
    """AGD and RF-AdamW under FSDP2 on :func:`head_model` (uneven and empty shards), restarted
    before the last step into a fresh optimizer from: this rank's own ``state_dict()`` through
    ``torch.save`` (``rank``), a sharded DCP checkpoint (``dcp``), a full-state one (``dcp-full``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    xs, ys = data()
    ys = ys[..., :1]
    results = {}
    for name in ("agd", "rf_adamw"):
        cls, kwargs = CONFIGS[name]
        for how in ("rank", "dcp", "dcp-full"):
            net = head_model()
            mesh = init_device_mesh("cpu", (world,))
            for layer in (net[0], net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(net, mesh=mesh)
            make = lambda: getattr(ptd, cls)(net.named_parameters(), **kwargs)  # noqa: E731
            opt = make()
            try:
                for step, (x, y) in enumerate(zip(xs, ys)):
                    if step == 2 and how == "rank":
                        buffer = io.BytesIO()
                        torch.save(opt.state_dict(), buffer)
                        buffer.seek(0)
                        opt = make()
                        opt.load_state_dict(torch.load(buffer, weights_only=False))
                    elif step == 2:
                        # No gradients left over: DCP makes a fresh optimizer's state only when
                        # no parameter has a gradient (a step at lr=0), and loads nothing otherwise.
                        opt.zero_grad()
                        options = StateDictOptions(full_state_dict=how == "dcp-full")
                        where = os.path.join(out, f"{name}-{how}")
                        dcp.save({"optim": get_optimizer_state_dict(net, opt, options=options)}, checkpoint_id=where)
                        opt = make()
                        loaded = {"optim": get_optimizer_state_dict(net, opt, options=options)}
                        dcp.load(loaded, checkpoint_id=where)
                        set_optimizer_state_dict(net, opt, loaded["optim"], options=options)
                    opt.zero_grad()
                    loss_fn(net, shard(x, rank, world), shard(y, rank, world)).backward()
                    opt.step()
                results[f"{name}-{how}"] = plain(net)
            except Exception as err:  # noqa: BLE001 - recorded for the test to judge
                results[f"{name}-{how}"] = f"{type(err).__name__}: {err}"
        if rank == 0:
            results[f"{name}-one"] = references(name, world, head_model, outputs=1)["mean"]
    return results


def split_full_state(rank: int, world: int, out: str) -> dict:
    """ASGO with the split preconditioner under DDP, two steps, then torch's full-state pattern:
    ``get_state_dict(full_state_dict=True, cpu_offload=True)`` saved by rank 0, loaded into a fresh
    optimizer with ``set_optimizer_state_dict(full_state_dict=True, broadcast_from_rank0=True)``:
    the error each rank saw, or None (``error``); the same with the checkpoint's marks taken out
    (``unmarked``: as a split class saved it without them), and with those of the full state after
    the first step (``unmarked-one-step``). And each rank's own ``state_dict()``
    without the marks, loaded with ``load_state_dict`` (``rank-file``), and this optimizer's own
    ``state_dict()`` loaded back after a further step (``rollback``): the error, or whether the
    state is the one saved."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    marks = ("counters_saved_by", "state_saved_by")

    def unmarked(state_dict: dict) -> dict:
        if "state" not in state_dict:  # a full state: empty on the ranks other than 0
            return state_dict
        return {**state_dict, "state": {k: {n: v for n, v in e.items() if n not in marks}
                                        for k, e in state_dict["state"].items()}}

    def tensors(opt) -> dict:
        return {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}

    def same(opt, saved: dict) -> bool:
        now = tensors(opt)
        return now.keys() == saved.keys() and all(
            now[p].keys() == saved[p].keys() and all(torch.equal(now[p][k], v) for k, v in saved[p].items())
            for p in saved)

    cls, kwargs = CONFIGS["asgo"]
    xs, ys = data()
    net = DistributedDataParallel(model())
    opt = ptd.ASGO(net.module.named_parameters(), **kwargs)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for step, (x, y) in enumerate(zip(xs[:2], ys[:2])):
        opt.zero_grad()
        loss_fn(net, shard(x, rank, world), shard(y, rank, world)).backward()
        opt.step()
        if step == 0:
            one_step = get_optimizer_state_dict(net.module, opt, options=options)
    results = {}
    saved_state = tensors(opt)
    fresh = ptd.ASGO(net.module.named_parameters(), **kwargs)
    try:
        fresh.load_state_dict(unmarked(opt.state_dict()))
        results["rank-file"] = same(fresh, saved_state)
    except ValueError as err:
        results["rank-file"] = str(err)
    saved = get_optimizer_state_dict(net.module, opt, options=options)
    for label, checkpoint in (("error", saved), ("unmarked", unmarked(saved)),
                              ("unmarked-one-step", unmarked(one_step))):
        where = os.path.join(out, f"asgo-full-{label}.pt")
        if rank == 0:
            torch.save(checkpoint, where)
        dist.barrier()
        opt.zero_grad()
        fresh = ptd.ASGO(net.module.named_parameters(), **kwargs)
        full = torch.load(where, weights_only=False) if rank == 0 else {}
        try:
            set_optimizer_state_dict(net.module, fresh, full, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
            results[label] = None
        except ValueError as err:
            results[label] = str(err)
    own = opt.state_dict()
    opt.zero_grad()
    loss_fn(net, shard(xs[2], rank, world), shard(ys[2], rank, world)).backward()
    opt.step()
    try:
        opt.load_state_dict(own)
        results["rollback"] = same(opt, saved_state)
    except ValueError as err:
        results["rollback"] = str(err)
    return results

def snapshot(opt) -> list:
    """A copy of ``opt.state``: (parameter, entries) pairs."""
    return [(p, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()})
            for p, s in opt.state.items()]


def same_state(opt, before: list) -> bool:
    """Whether ``opt.state`` holds exactly the entries of the :func:`snapshot` ``before``."""
    return len(before) == len(opt.state) and all(
        s.keys() == opt.state[p].keys() and all(
            torch.equal(v, opt.state[p][k]) if isinstance(v, torch.Tensor) else v == opt.state[p][k]
            for k, v in s.items())
        for p, s in before)


def refused_checkpoints(rank: int, world: int, out: str) -> dict:
    """ASGO with the split preconditioner under DDP, two steps, then checkpoints that rank 1 alone
    cannot load while rank 0 loads its own ``state_dict()``: DASGO's (``foreign``), rank 0's
    (``swapped``), not a state_dict (``not-a-dict``); then each rank given the other's file
    (``crossed``). Per case: the error each rank saw, whether
    its state is the one it held before, and then one more step on both ranks (no rank left
    waiting in a collective) and whether the ranks' parameters still agree."""
    cls, kwargs = CONFIGS["asgo"]
    xs, ys = data()
    net = DistributedDataParallel(model())
    opt = ptd.ASGO(net.module.named_parameters(), **kwargs)
    other = ptd.DASGO(net.module.named_parameters(), **CONFIGS["dasgo"][1])
    for x, y in zip(xs[:2], ys[:2]):
        for o in (opt, other):
            o.zero_grad()
            loss_fn(net, shard(x, rank, world), shard(y, rank, world)).backward()
            o.step()
    torch.save(opt.state_dict(), os.path.join(out, f"asgo-rank{rank}.pt"))
    dist.barrier()
    own = torch.load(os.path.join(out, f"asgo-rank{rank}.pt"), weights_only=False)
    bad = {
        "foreign": lambda: other.state_dict(),
        "swapped": lambda: torch.load(os.path.join(out, "asgo-rank0.pt"), weights_only=False),
        "not-a-dict": lambda: {"state": own["state"]},
    }
    # Each rank given the other rank's file (rank 0 too).
    crossed = torch.load(os.path.join(out, f"asgo-rank{1 - rank}.pt"), weights_only=False)

    results = {}
    for label, checkpoint in [*bad.items(), ("crossed", lambda: crossed)]:
        before = snapshot(opt)
        try:
            opt.load_state_dict(own if rank == 0 and label != "crossed" else checkpoint())
            error = None
        except Exception as err:  # noqa: BLE001 - recorded for the test to judge
            error = f"{type(err).__name__}: {err}"
        unchanged = same_state(opt, before)
        opt.zero_grad()
        loss_fn(net, shard(xs[2], rank, world), shard(ys[2], rank, world)).backward()
        opt.step()
        params = [None] * world
        dist.all_gather_object(params, plain(net.module))
        agree = all(torch.equal(params[0][k], params[1][k]) for k in params[0])
        results[label] = {"error": error, "unchanged": unchanged, "agree": agree}
    return results


def resharded_checkpoints(rank: int, world: int) -> dict:
    """AGD under FSDP2 with a checkpoint (``torch.save`` of ``state_dict()``) saved by an optimizer
    over the model whose weights of an even number of columns are sharded along dim 1
    (``fully_shard``'s ``shard_placement_fn``), after two steps.

    ``loads``: loaded into a fresh optimizer over the model sharded along dim 0 (the default),
    rank 1's entries in reverse order: whether its state is the one the dim-0 run holds after the
    same two steps. Then loaded by rank 0 into the dim-0 run's optimizer while rank 1 is given a
    checkpoint it refuses before any resharding (``not-a-dict``), the checkpoint lacking the entry
    ``m`` (``lacking``: refused by the checks after those of the other entries), or the dim-0
    run's own file, which it could load alone (``mixed``). Per case: the error this rank saw,
    whether the state is the one it held before, the collectives the load ran on this rank
    (``CommDebugMode``'s counts), and whether, after one more step on both ranks, their
    parameters agree."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.debug import CommDebugMode

    cls, kwargs = CONFIGS["agd"]
    xs, ys = data()
    mesh = init_device_mesh("cpu", (world,))

    def trained(placement) -> tuple:
        net = model()
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
        fully_shard(net, mesh=mesh)
        opt = getattr(ptd, cls)(net.named_parameters(), **kwargs)
        for x, y in zip(xs[:2], ys[:2]):
            opt.zero_grad()
            loss_fn(net, shard(x, rank, world), shard(y, rank, world)).backward()
            opt.step()
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        return net, opt, torch.load(buffer, weights_only=False)

    # Along dim 1 where it splits evenly (FSDP2 shards dim 1 only so): layers 0 and 4.
    _, _, by_columns = trained(lambda p: Shard(1) if p.ndim == 2 and p.shape[1] % world == 0 else None)
    net, opt, by_rows = trained(None)

    def load(target, checkpoint: dict) -> tuple:
        try:
            with CommDebugMode() as comms:
                target.load_state_dict(checkpoint)
            error = None
        except Exception as err:  # noqa: BLE001 - recorded for the test to judge
            error = f"{type(err).__name__}: {err}"
        return error, {str(op): n for op, n in comms.get_comm_counts().items()}

    results = {}
    reordered = {**by_columns, "state": {k: dict(reversed(e.items())) for k, e in by_columns["state"].items()}}
    fresh = getattr(ptd, cls)(net.named_parameters(), **kwargs)
    error, comms = load(fresh, by_columns if rank == 0 else reordered)
    results["loads"] = {"error": error, "comms": comms, "same": same_state(fresh, snapshot(opt))}
    refused = {
        "not-a-dict": {"state": by_columns["state"]},
        "lacking": {**by_columns, "state": {k: {n: v for n, v in e.items() if n != "m"}
                                            for k, e in by_columns["state"].items()}},
        "mixed": by_rows,
    }
    for label, checkpoint in refused.items():
        before = snapshot(opt)
        error, comms = load(opt, by_columns if rank == 0 else checkpoint)
        unchanged = same_state(opt, before)
        opt.zero_grad()
        loss_fn(net, shard(xs[2], rank, world), shard(ys[2], rank, world)).backward()
        opt.step()
        params = [None] * world
        dist.all_gather_object(params, plain(net))
        agree = all(torch.equal(params[0][k], params[1][k]) for k in params[0])
        results[label] = {"error": error, "comms": comms, "unchanged": unchanged, "agree": agree}
    return results


def warm_start_and_resume(rank: int, world: int, out: str) -> dict:
    """MBF with the split preconditioner: warm start, 2 steps, save one state_dict per rank, load
    it into a fresh optimizer and model, 1 more step; and one process doing the same."""
    cls, kwargs = CONFIGS["mbf"]
    xs, ys = data()
    results = {}
    for how in ("split", "one") if rank == 0 else ("split",):
        net = model()
        make = (lambda n: ptd.MBF(n.named_parameters(), **kwargs)) if how == "split" else (
            lambda n: pt.MBF(n.named_parameters(), **kwargs))
        opt = make(net)
        batches = [{n: g for n, g in zip(dict(net.named_parameters()), torch.autograd.grad(
            loss_fn(net, xs[0], torch.randn(GLOBAL_BATCH, 3, generator=torch.Generator().manual_seed(k))),
            list(net.parameters())))} for k in range(2)]
        opt.warm_start(batches)
        for step in range(STEPS):
            if step == 2:  # restart from the checkpoint
                path = os.path.join(out, f"{how}-{rank}.pt")
                torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, path)
                saved = torch.load(path, weights_only=False)
                net = model(seed=123)
                net.load_state_dict(saved["model"])
                opt = make(net)
                opt.load_state_dict(saved["opt"])
            opt.zero_grad()
            # Every rank uses the whole global batch here: DDP's averaging is tested elsewhere.
            loss_fn(net, xs[step], ys[step]).backward()
            opt.step()
        results[how] = plain(net)
    return results


def bad_inputs(rank: int, world: int) -> dict:
    """Each construction below must raise on every rank; the message each rank saw is recorded."""
    seen = {}

    def attempt(label, build):
        try:
            build()
            seen[label] = None
        except Exception as err:  # noqa: BLE001 - recorded for the test to judge
            seen[label] = f"{type(err).__name__}: {err}"

    # Rank 0 shares its work with rank 1, rank 1 thinks it works alone.
    both, alone = dist.new_group([0, 1]), dist.new_group([1])
    attempt("groups", lambda: ptd.ASGO(model().named_parameters(), process_group=both if rank == 0 else alone))
    attempt("params", lambda: ptd.ASGO(model(seed=rank).named_parameters()))
    attempt("hyper", lambda: ptd.ASGO(model().named_parameters(), lr=0.1 * (rank + 1)))
    mesh = init_device_mesh("cpu", (world,))
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(2, 2), mesh, [Partial()]))
    attempt("partial", lambda: ptd.AGD([("w", partial)]))
    sharded = model()
    fully_shard(sharded, mesh=mesh)
    attempt("plain-class", lambda: pt.IFShampoo(sharded.named_parameters(), lr=0.1, batch_size=GLOBAL_BATCH))
    singles = [dist.new_group([r]) for r in range(world)]
    attempt("outside", lambda: ptd.ASGO(sharded.named_parameters(), process_group=singles[rank]))
    # A complex parameter in the second param group: refused by the step on every rank before any
    # group moves (ASGO, its blocks split across the ranks).
    net, z = model(), torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.complex64))
    opt = ptd.ASGO([{"params": list(net.named_parameters())}, {"params": [("z", z)]}], lr=0.1)
    before = plain(net)
    loss_fn(net, *[shard(t[0], rank, world) for t in data()]).backward()
    z.grad = torch.ones_like(z)
    attempt("complex", opt.step)
    seen["complex-unchanged"] = all(torch.equal(before[k], v) for k, v in plain(net).items()) and not any(opt.state.values())
    # A NaN in rank 1's shard only: every rank skips the step (skip) or raises (raise).
    for policy in ("skip", "raise"):
        net = model()
        fully_shard(net, mesh=mesh)
        opt = ptd.RFAdamW(net.named_parameters(), lr=0.1, batch_size=GLOBAL_BATCH, on_nonfinite=policy)
        before = plain(net)
        loss_fn(net, *[shard(t[0], rank, world) for t in data()]).backward()
        if rank == 1:
            next(net.parameters()).grad.to_local().view(-1)[0] = float("nan")
        attempt(f"nan-{policy}", opt.step)
        after = plain(net)
        seen[f"nan-{policy}-unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        counts = {int(s["nonfinite_count"]) for s in opt.state.values() if "nonfinite_count" in s}
        seen[f"nan-{policy}-nonfinite"] = sorted(counts)
    # A NaN in rank 0's gradient, while rank 1 steps empty parameters only: ASGO split, whose
    # greedy deal gives rank 1 the empty vector alone; RF-AdamW under FSDP2, whose second param
    # group (the one-output head) has empty shards on rank 1. Every rank's counters after it.
    g = torch.Generator().manual_seed(0)
    w, e = torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.zeros(0))
    opt = ptd.ASGO([("w", w), ("e", e)], lr=0.1)
    seen["empty-owned"] = opt.owned_parameters()
    w.grad, e.grad = torch.ones(4, 3), torch.zeros(0)
    if rank == 0:
        w.grad[0, 0] = float("nan")
    opt.step()
    seen["empty-owned-counters"] = [[int(opt.state[p][k]) for k in ("step", "nonfinite_count")] for p in (w, e)]
    net = head_model()
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = ptd.RFAdamW([{"params": list(net[0].named_parameters())}, {"params": list(net[2].named_parameters())}],
                      lr=0.1, batch_size=GLOBAL_BATCH)
    seen["empty-shards"] = [p.to_local().numel() for p in net[2].parameters()]
    loss_fn(net, shard(data()[0][0], rank, world), shard(data()[1][0][..., :1], rank, world)).backward()
    if rank == 0:
        net[0].weight.grad.to_local().view(-1)[0] = float("nan")
    opt.step()
    seen["empty-shards-counters"] = [[int(opt.state[p][k]) for k in ("step", "nonfinite_count")]
                                     for p in net.parameters()]
    # A NaN in the second of two param groups, in rank 1's shard only: every group of every rank
    # skips (ASGO, its blocks split across the ranks) or raises before any parameter moves.
    # "mixed": the first group skips, the second raises; the step raises before the first counts
    # a skipped step.
    for policy in ("skip", "raise", "mixed"):
        net = model()
        fully_shard(net, mesh=mesh)
        named = list(net.named_parameters())
        if policy == "mixed":
            opt = ptd.ASGO([{"params": named[:2], "on_nonfinite": "skip"},
                            {"params": named[2:], "weight_decay": 0.0, "on_nonfinite": "raise"}], lr=0.1)
        else:
            opt = ptd.ASGO([{"params": named[:2]}, {"params": named[2:], "weight_decay": 0.0}], lr=0.1,
                           on_nonfinite=policy)
        before = plain(net)
        loss_fn(net, *[shard(t[0], rank, world) for t in data()]).backward()
        if rank == 1:
            named[-1][1].grad.to_local().view(-1)[0] = float("nan")
        attempt(f"groups-nan-{policy}", opt.step)
        after = plain(net)
        seen[f"groups-nan-{policy}-unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        seen[f"groups-nan-{policy}-stepped"] = sum(bool(entries) for entries in opt.state.values())
    return seen


def weight_norm_warning(rank: int, world: int) -> list:
    """MBF and IF-Shampoo (``grouping="weight_bias"``) built over a model whose first layer's weight
    is kept by ``weight_norm`` as two tensors: the warnings each construction gave, as
    ``(class, message, file)``."""
    net = model()
    torch.nn.utils.parametrizations.weight_norm(net[0])
    seen = []
    for cls, kwargs in ((ptd.MBF, {}), (ptd.IFShampoo, {"batch_size": 4, "grouping": "weight_bias"})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls(net.named_parameters(), **kwargs)
        seen += [(cls.__name__, str(w.message), os.path.basename(w.filename)) for w in caught]
    return seen


def main() -> None:
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results: dict = {"ddp": {}, "split": {}, "fsdp": {}, "fsdp-maximize": {}, "info": {}}
        for name in CONFIGS:
            results["ddp"][name], ddp_info = train(name, rank, world, "ddp", distributed=False)
            results["ddp_grads"] = ddp_info["first_grads"]
            results["split"][name], results["info"][name] = train(name, rank, world, "ddp", distributed=True)
            results["fsdp"][name] = train(name, rank, world, "fsdp", distributed=True)[0]
            results["fsdp-maximize"][name] = train(name, rank, world, "fsdp", distributed=True, maximize=True)[0]
            if rank == 0:
                results.setdefault("reference", {})[name] = references(name, world)
        results["full_batch_grads"] = full_batch_grads()
        results["resume"] = warm_start_and_resume(rank, world, out)
        results["elementwise_checkpoints"] = elementwise_checkpoints(rank, world, out)
        results["split_full_state"] = split_full_state(rank, world, out)
        results["refused_checkpoints"] = refused_checkpoints(rank, world, out)
        results["resharded_checkpoints"] = resharded_checkpoints(rank, world)
        results["weight_norm_warning"] = weight_norm_warning(rank, world)
        results["zero_redundancy"] = zero_redundancy(rank, world)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        with open(os.path.join(out, f"bad{rank}.json"), "w") as f:
            json.dump(bad_inputs(rank, world), f)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
