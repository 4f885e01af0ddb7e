"""The torch optimizers for multi-process training: FSDP2 parameters and a distributed preconditioner.

Plain ``DistributedDataParallel`` needs nothing from this module: DDP averages the gradients
before ``step``, every rank then runs the same deterministic update on the same numbers, and the
classes of :mod:`precond_ref.adapters.torch` already give the parameters of one process trained on
the global batch (root-free methods: pass the *global* batch size as ``batch_size``; with
``model=`` the counted batch sizes are summed over the DDP module's process group, and over
``process_group`` in the classes here).

The classes here (same names and arguments as in :mod:`precond_ref.adapters.torch`, plus
``process_group=`` and ``split_preconditioner=``) add two things:

* **Distributed preconditioner.** The parameters are cut into blocks (a parameter, or a Linear
  weight with its bias, the coarsest grouping any method uses), each block gets an estimated cost
  (:func:`estimated_cost`), and the blocks are dealt greedily, most expensive first, to the least
  loaded rank of ``process_group``. Each rank runs the core update (statistics, roots, inverses,
  sketches) of its own blocks only, holds only their state, and broadcasts their updates; every
  rank then adds every update, so all ranks keep identical parameters, equal bit for bit to one
  process's (the owner runs exactly the single-process computation on the same gradients).
  The element-wise methods (AGD, RF-RMSProp, RF-AdamW) are not split: their update costs less
  than sending it.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``, DTensor parameters). The element-wise
  methods run on each rank's local shard (state sharded like the parameter). The matrix methods
  gather the gradient and parameter of a block (``full_tensor()``), compute the update on the
  block's owner (or on every rank with ``split_preconditioner=False``) and each rank adds its own
  shard of it. Partial placements, or a DTensor whose mesh reaches ranks outside
  ``process_group``, raise ``ValueError`` naming the parameter.

Whether a step is skipped for a non-finite gradient is agreed by all ranks (one all-reduce), so a
NaN on one rank's shard never lets the ranks drift apart. Construction is collective over the
default process group: every rank must build its optimizer at the same point, and a rank whose
process group, parameters (shapes, dtypes, values of unsharded parameters) or hyperparameters
differ from those of its group makes every rank raise ``ValueError``.

Checkpoints: with ``split_preconditioner=True`` each rank's ``state_dict()`` holds the state of
the blocks it owns (and the step counters of all); save one file per rank and load each into the
rank of the same number, with the same world size and parameters (ownership is a deterministic
function of those). With FSDP2 the element-wise methods keep their state on local shards, as the
parameters are, and ``state_dict()`` gives it as DTensors sharded like the parameters (as torch's
optimizers do), so torch DCP saves and reshards it; ``load_state_dict`` reshards such state saved
under another sharding of the parameters (``fully_shard``'s ``shard_placement_fn``) where every
rank's checkpoint holds it so. ``load_state_dict`` is collective: a checkpoint that one rank
refuses is refused on every rank, and no rank loads.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from array_api_compat import array_namespace
from torch.distributed.tensor import DTensor, Partial, distribute_tensor

from precond_ref.adapters import _torch_state as _base_state
from precond_ref.adapters import torch as _base
from precond_ref.adapters._torch_core import decision_carried
from precond_ref.engine import gradient_ok, weight_bias_groups
from precond_ref.engine.skip import first_bad_gradient
from precond_ref.transform import PrecondState, Transform
from precond_ref.tree import path_str, tree_flatten, tree_unflatten

__all__ = [
    "DistributedOptimizer",
    "estimated_cost",
    "AGD",
    "ASGO",
    "DASGO",
    "MBF",
    "RFRMSProp",
    "RFAdamW",
    "IFShampoo",
    "Sketchy",
    "SAdaGrad",
]

# How a leaf enters the core: as it is, as its local shard, or gathered to the full tensor.
_PLAIN, _LOCAL, _FULL = "plain", "local", "full"
# What a parameter whose block another rank owns keeps in ``self.state``.
_COUNTERS = ("step", "nonfinite_count", "calls")
# Checkpoint entries of the split classes (DistributedOptimizer.state_dict): the token of the
# optimizer that saved the counters (every parameter), and of the one that saved a block's state
# (its first parameter, on the rank that owns it).
_COUNTERS_OF, _STATE_OF = _base_state.MARKS


def estimated_cost(shapes: list[tuple[int, ...]]) -> int:
    """A block's preconditioner cost in flops, up to a constant: what the greedy split balances.

    A matrix parameter of shape ``(m, n...)`` (trailing dimensions merged) costs
    ``m**3 + n**3`` (a root or inverse per side) plus ``m*n*(m+n)`` (the two statistics); a vector
    costs its size. Blocking (``block_size``) and sketch ranks are ignored: the estimate only has
    to order blocks roughly.
    """
    cost = 0
    for shape in shapes:
        if len(shape) >= 2:
            m, n = shape[0], math.prod(shape[1:])
            cost += m**3 + n**3 + m * n * (m + n)
        else:
            cost += math.prod(shape)
    return cost


def _fingerprint(p: torch.Tensor) -> Optional[str]:
    """Digest of an unsharded parameter's bytes (None for a DTensor, whose shards differ by rank)."""
    if isinstance(p, DTensor):
        return None
    data = p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


class _SplitTransform:
    """A core transform run across ranks: the tree's leaves become local shards or full tensors,
    each rank runs the core on the blocks it owns, and the updates are broadcast by their owners.

    It is handed to :class:`precond_ref.adapters.torch.CoreOptimizer`'s step in place of the core
    transform, so the step bookkeeping (counters, state on each block's first parameter) is the
    base class's; the state it returns holds the owned blocks only.
    """

    def __init__(self, core: Transform, opt: "DistributedOptimizer", on_nonfinite: str) -> None:
        self.core = core
        self.opt = opt
        self.on_nonfinite = on_nonfinite

    def _views(self, leaves) -> list:
        """What the core sees of each leaf: itself, its local shard, or the gathered full tensor
        (a collective: every rank gathers every gathered leaf, in the tree's order)."""
        views = []
        for leaf in leaves:
            kind = self.opt._kind(leaf)
            views.append(leaf.to_local() if kind == _LOCAL else leaf.full_tensor() if kind == _FULL else leaf)
        return views

    def _owned(self, paths, leaves) -> list[int]:
        rank = self.opt._rank
        return [
            i for i, (path, leaf) in enumerate(zip(paths, leaves))
            if self.opt._kind(leaf) == _LOCAL or self.opt._owner.get(path_str(path), rank) == rank
        ]

    def init(self, params: Any) -> PrecondState:
        leaves, treedef = tree_flatten(params)
        views = self._views(leaves)
        owned = self._owned(treedef.paths, leaves)
        if owned:
            sub = _base.CoreOptimizer._tree([treedef.paths[i] for i in owned], [views[i] for i in owned])
            return self.core.init(sub)
        device = views[0].device
        zero = torch.zeros((), dtype=torch.int32, device=device)
        return PrecondState(zero, zero, {})

    def warm_start(self, state: PrecondState, grads_batches: Any) -> PrecondState:
        """MBF's warm start (:meth:`precond_ref.adapters.torch.MBF.warm_start`) of the owned blocks."""
        if not state.groups:
            for _ in grads_batches:  # the batches are consumed as on the other ranks
                pass
            return state

        def owned_tree(tree: Any) -> dict:
            leaves, treedef = tree_flatten(tree)
            if any(isinstance(leaf, DTensor) for leaf in leaves):
                raise ValueError(f"{type(self.opt).__name__}.warm_start does not support DTensor parameters")
            owned = self._owned(treedef.paths, leaves)
            return _base.CoreOptimizer._tree([treedef.paths[i] for i in owned], [leaves[i] for i in owned])

        return self.core.warm_start(state, (owned_tree(tree) for tree in grads_batches))

    def update(self, grads: Any, state: PrecondState, params: Any = None, **extra: Any):
        leaves, treedef = tree_flatten(grads)
        paths = treedef.paths
        grad_views = self._views(leaves)
        param_views = None if params is None else self._views(tree_flatten(params)[0])
        # The step's decision (DistributedOptimizer._step_groups, equal on every rank), then this
        # group's own (a gathered leaf's full norm); both all-reduced, so every rank decides alike.
        finite = self.opt._step_finite is not False and self.opt._all_finite(grad_views)
        if not finite and self.on_nonfinite == "raise":
            bad = next((path_str(p) for p, v in zip(paths, grad_views) if not bool(torch.isfinite(v).all())), None)
            if bad is not None:
                bad = self.opt._torch_names_by_path().get(bad, bad)  # named as torch names it
            where = f"in parameter {bad!r}" if bad else "on another rank of the process group or in another param group"
            raise FloatingPointError(f"{type(self.opt).__name__}: non-finite gradient {where}")
        owned = self._owned(paths, leaves)
        updates: list = [None] * len(leaves)
        if owned:
            sub_paths = [paths[i] for i in owned]
            sub_grads = [grad_views[i] for i in owned]
            if not finite:
                # A non-finite gradient anywhere skips the step everywhere: the decision reaches
                # the core on the owned blocks as the single-process step's does, even where their
                # gradients are finite or all empty (a rank owning only empty parameters).
                ok = torch.zeros((), dtype=torch.bool, device=sub_grads[0].device)
                sub_grads, extra, _ = decision_carried(sub_grads, ok, extra)
            sub_params = None if params is None else _base.CoreOptimizer._tree(sub_paths, [param_views[i] for i in owned])
            sub_updates, new_state = self.core.update(
                _base.CoreOptimizer._tree(sub_paths, sub_grads), state, sub_params, **extra
            )
            update_leaves, update_def = tree_flatten(sub_updates)
            by_path = dict(zip(update_def.paths, update_leaves))
            for i in owned:
                updates[i] = by_path[paths[i]]
        else:
            step = int(finite)
            new_state = PrecondState(state.count + step, state.nonfinite_count + (1 - step), {})
        self.opt._exchange(paths, leaves, grad_views, updates, finite)
        out = []
        for leaf, update in zip(leaves, updates):
            kind = self.opt._kind(leaf)
            if kind == _LOCAL:
                update = DTensor.from_local(
                    update, leaf.device_mesh, leaf.placements, run_check=False, shape=leaf.shape, stride=leaf.stride()
                )
            elif kind == _FULL:
                update = distribute_tensor(update, leaf.device_mesh, leaf.placements, src_data_rank=None)
            out.append(update)
        return tree_unflatten(treedef, out), new_state


class DistributedOptimizer:
    """Mixin that makes a :class:`precond_ref.adapters.torch.CoreOptimizer` subclass distributed.

    Takes the base class's arguments and two keyword-only ones.

    Parameters
    ----------
    process_group:
        The ranks that share the parameters and split the preconditioner work (default: the
        default process group). ``torch.distributed`` must be initialised.
    split_preconditioner:
        ``True``: each block's update is computed by one rank and broadcast (see the module
        docstring). ``False``: every rank computes every block (still handles DTensor parameters).
    """

    #: Element-wise methods run on local shards and are never split.
    elementwise: bool = False
    _accepts_dtensor = True
    #: The step exchanges blocks between ranks: the core update runs eagerly.
    compile_by_default = False

    def __init__(
        self,
        *args: Any,
        process_group: Optional[dist.ProcessGroup] = None,
        split_preconditioner: bool = True,
        **kwargs: Any,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{type(self).__name__}: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (or use precond_ref.adapters.torch)"
            )
        if not isinstance(split_preconditioner, bool):
            raise ValueError(f"split_preconditioner must be True or False, got {split_preconditioner!r}")
        if kwargs.get("compile") not in (None, False):
            raise ValueError(
                f"{type(self).__name__}: compile={kwargs['compile']!r} is not supported by the distributed classes "
                "(their step exchanges blocks between ranks and runs the core eagerly)"
            )
        self._pg = process_group if process_group is not None else dist.group.WORLD
        self._group_ranks = dist.get_process_group_ranks(self._pg)
        self._rank = dist.get_rank(self._pg)
        self._world = dist.get_world_size(self._pg) if self._rank >= 0 else 0
        self._split = split_preconditioner and not self.elementwise
        self._owner: dict[str, int] = {}
        self._kinds: dict[str, str] = {}
        self._split_transforms: dict[int, tuple[Transform, _SplitTransform]] = {}
        self._ready = False
        super().__init__(*args, **kwargs)
        self._check_across_ranks()
        self._ready = True
        self._assign_owners()

    # -- construction ----------------------------------------------------------------------

    def _leaves(self) -> list[tuple[tuple, torch.Tensor]]:
        """(path, parameter) for every parameter, with the paths the base step gives them."""
        out, index = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                out.append((self._path(p, index), p))
                index += 1
        return out

    def _describe(self) -> dict:
        params = []
        for path, p in self._leaves():
            placements = None
            if isinstance(p, DTensor):
                placements = (repr(p.placements), sorted(p.device_mesh.mesh.flatten().tolist()))
            params.append((".".join(str(k) for k in path), tuple(p.shape), str(p.dtype), placements, _fingerprint(p)))
        # Callables (schedules, filters) are compared by type: their reprs hold addresses.
        hyper = [
            repr(sorted((k, type(v).__name__ if callable(v) else repr(v)) for k, v in self.core_kwargs(g).items()))
            for g in self.param_groups
        ]
        return {"group": self._group_ranks, "params": params, "hyper": hyper}

    def _check_across_ranks(self) -> None:
        """Every rank gathers every rank's description and reaches the same verdict (no hang, no
        rank left training alone)."""
        world = dist.get_world_size()
        described = [None] * world
        dist.all_gather_object(described, {**self._describe(), "token": int.from_bytes(os.urandom(8), "little")})
        # One token for this optimizer on every rank (rank 0's): what its checkpoints are marked with.
        self._token = described[0]["token"]
        problems = []
        for r, info in enumerate(described):
            for s in info["group"]:
                if s >= world or described[s]["group"] != info["group"]:
                    theirs = described[s]["group"] if s < world else None
                    problems.append(
                        f"mismatched process groups: rank {r} uses ranks {info['group']}, rank {s} uses {theirs}"
                    )
        if not problems:
            for r, info in enumerate(described):
                s = info["group"][0]
                if s == r:
                    continue
                mine, theirs = info["params"], described[s]["params"]
                if len(mine) != len(theirs):
                    problems.append(f"rank {r} has {len(mine)} parameters, rank {s} has {len(theirs)}")
                    continue
                for a, b in zip(mine, theirs):
                    if a != b:
                        what = "values" if a[:4] == b[:4] else "name, shape, dtype or sharding"
                        problems.append(f"parameter {a[0]!r} differs between rank {s} and rank {r} ({what})")
                        break
                if info["hyper"] != described[s]["hyper"]:
                    problems.append(f"hyperparameters differ between rank {s} and rank {r}")
        if problems:
            raise ValueError(f"{type(self).__name__}: inconsistent across ranks: " + "; ".join(sorted(set(problems))))
        if self._rank < 0:  # pragma: no cover - only ranks of the group construct consistently
            raise ValueError(f"{type(self).__name__}: this rank is not in process_group")
        for path, p in self._leaves():
            self._check_sharding(path, p)

    def _check_sharding(self, path: tuple, p: torch.Tensor) -> None:
        if not isinstance(p, DTensor):
            return
        name = ".".join(str(k) for k in path)
        if any(isinstance(pl, Partial) for pl in p.placements):
            raise ValueError(f"{type(self).__name__}: parameter {name!r} has a Partial placement {p.placements}; "
                             "only Shard and Replicate parameters are supported")
        mesh_ranks = set(p.device_mesh.mesh.flatten().tolist())
        if not mesh_ranks <= set(self._group_ranks):
            raise ValueError(
                f"{type(self).__name__}: parameter {name!r} is sharded over ranks {sorted(mesh_ranks)}, "
                f"outside the optimizer's process group {self._group_ranks}"
            )

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_ready", False):
            self._assign_owners()

    def _assign_owners(self) -> None:
        """Deal the blocks to ranks, most expensive first, each to the least loaded rank."""
        self._owner.clear()
        self._kinds.clear()
        if not self._split:
            return
        leaves = self._leaves()
        paths = [path for path, _ in leaves]
        tensors = [p for _, p in leaves]
        blocks = weight_bias_groups(paths, tensors)
        costs = [estimated_cost([tuple(tensors[i].shape) for i in b.indices]) for b in blocks]
        load = [0] * self._world
        for k in sorted(range(len(blocks)), key=lambda k: (-costs[k], k)):
            rank = min(range(self._world), key=lambda r: (load[r], r))
            load[rank] += costs[k]
            for path in blocks[k].paths:
                self._owner[path_str(path)] = rank

    def owned_parameters(self) -> list[str]:
        """Dotted names (or ``param<i>``) of the parameters whose preconditioner this rank computes."""
        return [
            ".".join(str(k) for k in path) for path, p in self._leaves()
            if self._owner.get(path_str(path), self._rank) == self._rank
        ]

    def state_dict(self) -> dict:
        """The base class's ``state_dict``, with the state of each parameter that the core steps as
        its local shard (element-wise methods under FSDP2) as a DTensor of the parameter's mesh,
        placements and global shape, as ``torch.optim`` optimizers hold it under FSDP2.

        torch DCP treats a plain tensor as replicated: every rank would save and load one copy, so
        the shards of other ranks would be lost or mixed. As DTensors, DCP saves each rank's shard
        and reshards on load. A rank whose shard is empty gets that parameter's entries as empty
        shards (the core keeps no state for a zero-size leaf), so every rank's state dict has the
        same keys, which DCP's collectives over them need. The optimizer's own state is unchanged.
        """
        state_dict = super().state_dict()
        if self._split:
            return self._marked(state_dict)
        if not self.elementwise:
            return state_dict
        state = dict(state_dict["state"])
        for index, (path, p) in enumerate(self._leaves()):
            entries = state.get(index)
            if not entries or self._kind(p) != _LOCAL:
                continue
            entries = {**entries, **self._empty_shard_state(path, p, entries)}
            state[index] = {
                name: self._as_dtensor(value, p, own_storage=True)
                if name not in _COUNTERS and self._is_shard_state(value, p) else value
                for name, value in entries.items()
            }
        return {**state_dict, "state": state}

    def _marked(self, state_dict: dict) -> dict:
        """``state_dict`` with this optimizer's token on every parameter's entries (the counters, the
        same on every rank) and on the first parameter of each block whose state this rank holds.

        A full-state checkpoint (torch DCP's ``full_state_dict=True``, e.g. with
        ``broadcast_from_rank0``) takes the plain tensors of rank 0 only, so the state of the blocks
        other ranks own is not in it, while DCP keeps the loading optimizer's own entries for keys
        the checkpoint lacks: a rank's blocks would resume from whatever state it held before. The
        two tokens then differ, and :meth:`load_state_dict` refuses the checkpoint on every rank.
        Both are the same on every rank (one optimizer), as DCP needs of a key saved by several.

        A mark also holds the parameter's ``calls``: DCP completes a checkpoint that carries no
        marks (a split class's checkpoint saved without them) with the loading optimizer's own
        marks, whose ``calls`` are then not the checkpoint's (:meth:`_missing_block_state`)."""
        state = {}
        for index, entries in state_dict["state"].items():
            mark = f"{self._token:016x}/{entries.get('calls', 0)}"
            entries = {**entries, _COUNTERS_OF: mark}
            if entries.get("core_group"):
                entries[_STATE_OF] = mark
            state[index] = entries
        return {**state_dict, "state": state}

    def _missing_block_state(self, state_dict: dict) -> dict:
        """The parameters whose block this rank steps and which took steps by the checkpoint's
        counters, where the checkpoint does not hold the block's state (``"missing"``:
        :meth:`_marked`'s tokens differ) or carries no marks of its own (``"unmarked"``: the mark
        beside the counters, which torch DCP took from the loading optimizer, is of other
        ``calls``); empty where neither."""
        found: dict = {}
        index = 0
        try:
            saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        except (KeyError, TypeError):
            return found  # not a state_dict: the base class's check says so
        for saved_group, group in zip(saved_groups, self.param_groups):
            for saved_id, p in zip(saved_group.get("params", ()), group["params"]):
                path = self._path(p, index)
                index += 1
                entries = saved_state.get(saved_id) or {}
                calls = entries.get("calls", 0)
                if (_COUNTERS_OF not in entries or not entries.get("core_group") or not calls
                        or self._owner.get(path_str(path), self._rank) != self._rank):
                    continue
                name = ".".join(str(k) for k in path)
                mark = entries[_COUNTERS_OF]
                if isinstance(mark, str) and (not mark.endswith(f"/{int(calls)}") or self._own_other_state(p, mark, entries)):
                    found.setdefault("unmarked", []).append(name)
                elif entries.get(_STATE_OF) != mark:
                    found.setdefault("missing", []).append(name)
        return found

    def _own_other_state(self, p: torch.Tensor, mark: str, entries: dict) -> bool:
        """Whether ``mark`` is this optimizer's own of the ``calls`` it holds now for ``p``, while
        ``entries`` hold other state than it holds: the marks of a checkpoint without marks of its
        own, completed by torch DCP with this optimizer's current entries, where the checkpoint's
        ``calls`` equal this optimizer's (saved after one step, loaded after DCP's initialising
        step). This optimizer's own ``state_dict()`` of the step it holds (a reload, no step since)
        holds the same state; no collective."""
        own = self.state.get(p, {})
        if mark != f"{self._token:016x}/{own.get('calls', 0)}":
            return False
        held = {k: v for k, v in own.items() if k not in _base_state.BOOKKEEPING}
        saved = {k: v for k, v in entries.items() if k not in _base_state.BOOKKEEPING + _base_state.MARKS}
        return saved.keys() != held.keys() or not all(
            isinstance(v, torch.Tensor) and v.shape == held[k].shape and v.dtype == held[k].dtype
            and torch.equal(v.to(held[k].device), held[k]) for k, v in saved.items())

    def _other_ranks_file(self, state_dict: dict) -> dict:
        """``{"rank_file": r}`` where ``state_dict`` is rank ``r``'s own ``state_dict()``, not this
        rank's: it holds the state of blocks (marked by :meth:`_marked` on their first parameter), all
        of them blocks that rank ``r`` owns, and none of those this rank owns, some of which took steps
        by its counters; empty otherwise (the ownership is that of this optimizer, the same as the
        saving one's for a checkpoint of the same world size and parameters)."""
        try:
            saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        except (KeyError, TypeError):
            return {}
        holders, stepped, index = set(), False, 0
        for saved_group, group in zip(saved_groups, self.param_groups):
            for saved_id, p in zip(saved_group.get("params", ()), group["params"]):
                path = self._path(p, index)
                index += 1
                entries = saved_state.get(saved_id) or {}
                owner = self._owner.get(path_str(path))
                if owner is None or _COUNTERS_OF not in entries:
                    continue
                if entries.get(_STATE_OF) is not None:
                    holders.add(owner)
                elif owner == self._rank and entries.get("calls", 0):
                    stepped = True
        if stepped and len(holders) == 1 and self._rank not in holders:
            return {"rank_file": holders.pop()}
        return {}

    @staticmethod
    def _is_shard_state(value: Any, p: DTensor) -> bool:
        """Whether ``value`` is a plain tensor of ``p``'s local shard's shape: its element-wise state."""
        return (isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.ndim == p.ndim
                and value.shape == p.to_local().shape)

    @staticmethod
    def _as_dtensor(value: torch.Tensor, p: DTensor, own_storage: bool = False) -> DTensor:
        """``value`` as ``p``'s local shard of a DTensor like ``p``; ``own_storage``: a copy where
        ``value`` starts inside a larger allocation (the state entries are views of one stack),
        since ``torch.save`` cannot pickle a DTensor over a view at a storage offset."""
        if own_storage and value.storage_offset():
            value = value.clone()
        return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())

    def _empty_shard_state(self, path: tuple, p: DTensor, entries: dict) -> dict:
        """Empty local shards of the state entries the core keeps for ``p`` on a rank whose shard
        of ``p`` is empty, where it has stepped (``"core_group"``) and holds none (the core keeps no
        state for a zero-size leaf); nothing otherwise. The entries' names and dtypes are those
        ``init`` gives a one-element leaf of ``p``'s dtype (element-wise state does not depend on
        the shape); no collective."""
        local = p.to_local()
        if local.numel() or not entries.get("core_group") or any(k not in _COUNTERS and k != "core_group" for k in entries):
            return {}
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        probe = torch.zeros((1,) * p.ndim, dtype=local.dtype, device=local.device)
        layout = super()._transform(group).init(self._tree([path], [probe])).groups
        return {name: torch.zeros(local.shape, dtype=like.dtype, device=local.device)
                for arrays in layout.values() for name, like in arrays.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this rank's own checkpoint (see the module docstring).

        The base class checks a checkpoint against the layout ``init`` gives every block, with the
        parameters as they are (DTensors included). So, for that check only: the blocks other
        ranks own get their initial state, and local-shard state (element-wise methods under
        FSDP2), saved as DTensors (:meth:`state_dict`, or DCP's reshard of them) or as local
        shards (the earlier layout), is presented as DTensors of the parameters' global shape;
        both are undone after loading.

        Collective: every rank loads at the same point, and the ranks agree before any of them
        changes: a checkpoint that one rank refuses (another optimizer's, another configuration's,
        another rank's blocks, not a state_dict) is refused on every rank with that rank's reason
        (:meth:`_agree_to_load`), and no rank loads. One rank raising alone would leave the others
        training on, to wait in the next step's collectives. Between the first check that can
        refuse and the agreement no rank runs a collective, so every rank reaches the agreement
        whatever its checkpoint holds; local-shard state saved under another sharding of the
        parameter (``fully_shard``'s ``shard_placement_fn``) is resharded (a collective) after the
        ranks agree, in an order every rank agreed on.
        """
        # The gathered parameters (FSDP2, matrix methods) do not depend on the checkpoint: gathered
        # first, by every rank, before anything that could raise on one rank only.
        full = {path_str(path): p.full_tensor() for path, p in self._leaves() if self._kind(p) == _FULL}  # in order
        agreed = []  # set once this rank has taken part in the agreement (its one collective)

        def agree(refusal: Optional[dict]) -> None:
            agreed.append(True)
            self._agree_to_load(refusal)

        try:
            missing = self._missing_block_state(state_dict) or self._other_ranks_file(state_dict)
            if missing:
                agree(missing)
            self._load_agreed(state_dict, full, lambda reshard: agree({"reshard": reshard} if reshard else None))
        except Exception as error:
            if agreed:  # refused in the agreement, or after it (nothing raises there)
                raise
            try:
                agree({"error": (type(error).__name__, str(error))})
            except Exception as refused:  # always: this rank refused
                raise refused from error
            raise

    def _agree_to_load(self, refusal: Optional[dict]) -> None:
        """One all-gather of every rank's verdict on its checkpoint (``None``, or ``{"reshard": [...]}``:
        it can load, resharding those entries), then the same error on every rank where some rank
        refused: the blocks whose state a checkpoint lacks (:meth:`_missing_block_state`), named with
        their ranks, or each refusing rank's reason; or where the ranks would reshard different
        entries (:meth:`_load_agreed`), whose collectives would not pair up."""
        verdicts: list = [None] * self._world
        dist.all_gather_object(verdicts, refusal, group=self._pg)
        cls = type(self).__name__

        def blocks(key: str) -> str:
            """The blocks the ranks' verdicts list under ``key``, each named with its rank."""
            return ", ".join(f"{name!r} (rank {r})" for r, v in enumerate(verdicts) if v for name in v.get(key, ()))

        names = blocks("missing")
        if names:
            raise ValueError(
                f"{cls}.load_state_dict: the checkpoint lacks the state of the blocks of {names}, "
                "which took steps: it holds one rank's blocks only (a full state, full_state_dict=True or "
                "broadcast_from_rank0, takes rank 0's). The split classes' checkpoints are each rank's own "
                "state_dict(), loaded into the rank of the same number, or a sharded torch DCP checkpoint"
            )
        swapped = [(r, v["rank_file"]) for r, v in enumerate(verdicts) if v and "rank_file" in v]
        if swapped:
            given = "; ".join(f"rank {r} was given rank {saver}'s state_dict (it holds the state of the blocks "
                              f"rank {saver} owns)" for r, saver in swapped)
            raise ValueError(
                f"{cls}.load_state_dict: {given}. Each rank of a split optimizer loads the file it saved, its own "
                "state_dict(), into the rank of the same number; no rank of the process group loaded"
            )
        names = blocks("unmarked")
        if names:
            raise ValueError(
                f"{cls}.load_state_dict: the counters of {names}, which took steps, carry the marks of this "
                "optimizer, not of the one that saved them: the checkpoint has no marks (a split class's "
                "checkpoint saved without them) and torch DCP's set_optimizer_state_dict completed it with this "
                "optimizer's own entries, so whether it holds the state of each rank's blocks cannot be told (a "
                "full state, full_state_dict=True or broadcast_from_rank0, holds rank 0's only). Load each "
                "rank's own state_dict() with load_state_dict, into the rank of the same number"
            )
        errors = [(r, v["error"]) for r, v in enumerate(verdicts) if v and "error" in v]
        if not errors:
            self._agree_to_reshard(verdicts)
            return
        prefix = f"{cls}.load_state_dict: "
        reasons = {}
        for r, (kind, message) in errors:
            reason = message[len(prefix):] if message.startswith(prefix) else f"{kind}: {message}"
            reasons.setdefault(reason, []).append(r)
        if len(errors) == self._world and len(reasons) == 1:
            where = "every rank"
        else:
            where = ", ".join(f"rank {r}" for r, _ in errors)
        said = "; ".join(
            reason if len(reasons) == 1 else f"rank {', '.join(map(str, ranks))}: {reason}"
            for reason, ranks in reasons.items()
        )
        # The refusing ranks' exception type where they agree on ValueError or TypeError (the base
        # class's refusals), else ValueError; the same on every rank.
        kinds = {kind for _, (kind, _) in errors}
        kind = TypeError if kinds == {"TypeError"} else ValueError
        raise kind(f"{prefix}the checkpoint was refused on {where}, so no rank of the process group loaded: {said}")

    def _agree_to_reshard(self, verdicts: list) -> None:
        """Raise the same ValueError on every rank where the ranks would reshard different entries
        (:meth:`_load_agreed`): their checkpoints hold a parameter's local-shard state under
        different shardings, and each entry is resharded by a collective of every rank, which one
        rank's part of another sharding, or no part, would pair with the wrong data or with nothing.
        Names the first such parameter and each rank's entries of it."""
        plans = [v.get("reshard", []) if v else [] for v in verdicts]
        if all(plan == plans[0] for plan in plans):
            return

        def held(plan: list, key: tuple) -> list:
            return [move for move in plan if tuple(move[:2]) == key]

        keys = sorted({tuple(move[:2]) for plan in plans for move in plan})
        index, name = next(key for key in keys if any(held(plan, key) != held(plans[0], key) for plan in plans))
        placements = self._leaves()[index][1].placements
        said = "; ".join(
            f"rank {r}: " + (", ".join(f"{entry!r} of shape {shape}, {dtype}, as {saved} over ranks {list(ranks)}"
                                       for _, _, entry, saved, shape, dtype, ranks in held(plan, (index, name)))
                             or f"as the parameter, {placements}")
            for r, plan in enumerate(plans))
        raise ValueError(
            f"{type(self).__name__}.load_state_dict: the ranks' checkpoints hold the state of {name!r} under "
            f"different shardings ({said}); resharding it to the parameter's placements takes the part of one "
            "sharding from every rank, so each rank loads its own file of one checkpoint; no rank of the "
            "process group loaded"
        )

    def _load_agreed(self, state_dict: dict, full: dict, before_commit) -> None:
        """The base class's load of this rank's checkpoint, with ``before_commit(reshard)`` (the
        agreement of the ranks) run after every check and before the optimizer changes.

        No collective runs before ``before_commit``: a rank refusing its checkpoint goes straight
        to the agreement, which every other rank must reach next. Local-shard state saved as a
        DTensor of other placements than the parameter's is checked as it is (its global shape,
        its local values) and listed in ``reshard`` as ``(parameter index, parameter, entry,
        placements, global shape, dtype, mesh ranks)``, sorted; the ranks agree on that list with
        the rest, and every rank reshards those entries in that order once loaded."""
        if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
                and isinstance(state_dict.get("param_groups"), list)):
            # Not a state_dict: the base class's check refuses it, in its words.
            self._base_load(state_dict, lambda: before_commit([]))
            return
        filled = {key: {k: v for k, v in value.items() if k not in (_COUNTERS_OF, _STATE_OF)}
                  for key, value in state_dict["state"].items()}
        leaves = self._leaves()
        reshard = []
        index = 0
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            others = []
            for saved_id, p in zip(saved_group["params"], group["params"]):
                path = self._path(p, index)
                index += 1
                entries = filled.get(saved_id)
                if not entries:
                    continue
                if self._kind(p) == _LOCAL:
                    # A rank with an empty shard saved before state_dict() gave it empty entries.
                    entries.update(self._empty_shard_state(path, p, entries))
                    for name, value in entries.items():
                        if name in _COUNTERS:
                            continue
                        if isinstance(value, DTensor):  # state_dict()'s layout, or DCP's load of it
                            if tuple(value.placements) != tuple(p.placements):
                                # Another sharding: resharded once the ranks agree (a collective).
                                reshard.append((index - 1, ".".join(str(k) for k in path), name,
                                                repr(value.placements), tuple(value.shape), str(value.dtype),
                                                tuple(value.device_mesh.mesh.flatten().tolist())))
                                continue
                            value = value.to_local()
                        if self._is_shard_state(value, p):  # re-wrapped on this rank's own mesh
                            entries[name] = self._as_dtensor(value, p)
                elif self._owner.get(path_str(path), self._rank) != self._rank:
                    others.append((path, full.get(path_str(path), p), saved_id))
            if others:
                core = super()._transform(group)
                tree = self._tree([path for path, _, _ in others], [p.detach() for _, p, _ in others])
                ids = {path_str(path): saved_id for path, _, saved_id in others}
                for key, arrays in core.init(tree).groups.items():
                    filled[ids[key]].update(arrays)
        reshard.sort()
        self._base_load({**state_dict, "state": filled}, lambda: before_commit(reshard))
        # Every rank reshards the same entries in the same order (agreed): each collective pairs up.
        for index, _, name, *_ in reshard:
            p = leaves[index][1]
            value = self.state[p][name]
            self.state[p][name] = value.redistribute(value.device_mesh, p.placements)
        for path, p in leaves:
            entries = self.state.get(p)
            if not entries:
                continue
            if self._owner.get(path_str(path), self._rank) != self._rank:
                for key in [k for k in entries if k not in _COUNTERS]:
                    del entries[key]
            for key, value in entries.items():
                if isinstance(value, DTensor):
                    entries[key] = value.to_local()
            if self._kind(p) == _LOCAL and not p.to_local().numel():
                # An empty shard: no state arrays, as the step keeps it.
                for key in [k for k in entries if k not in _COUNTERS and k != "core_group"]:
                    del entries[key]

    def _base_load(self, state_dict: Any, before_commit) -> None:
        """The base class's ``load_state_dict``, with ``before_commit`` run before anything changes."""
        with _base_state.torch_names_in_errors(self._torch_names_by_path):
            _base_state.load_state_dict(self, state_dict, self._build, before_commit=before_commit)
        self._drop_graphs()
        self._restack = True

    # -- step ----------------------------------------------------------------------------------

    def _transform(self, group: dict) -> Any:
        core = super()._transform(group)
        if not getattr(self, "_ready", False):
            return core
        cached = self._split_transforms.get(id(group))
        if cached is None or cached[0] is not core:
            cached = (core, _SplitTransform(core, self, group.get("on_nonfinite", "skip")))
            self._split_transforms[id(group)] = cached
        return cached[1]

    def _core_shape(self, p: torch.Tensor) -> tuple:
        """The shape the core steps (:meth:`_SplitTransform._views`): the local shard's (element-wise
        methods under FSDP2) or the full parameter's."""
        return tuple(p.to_local().shape) if self._kind(p) == _LOCAL else tuple(p.shape)

    def _kind(self, leaf: torch.Tensor) -> str:
        if not isinstance(leaf, DTensor):
            return _PLAIN
        return _LOCAL if self.elementwise else _FULL

    #: The non-finite decision of the step being taken, for all its param groups (``None`` outside a step).
    _step_finite: Optional[bool] = None

    def _step_groups(self, extra: dict) -> None:
        """The base class's step, with one non-finite decision for every param group, agreed by all
        ranks (:meth:`_all_finite` of every local gradient shard): a NaN in one group skips (or
        raises before) every group's update, as in one process. A gradient no method steps is
        refused first, as the base class refuses it (the same on every rank: the ranks hold the
        same parameters)."""
        named, index = [], 0
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    self._refuse_gradient(p, index, group_index)
                    named.append((self._param_names.get(p, str(index)), group, p.grad))
                index += 1
        views = [g.to_local() if isinstance(g, DTensor) else g for _, _, g in named]
        self._step_finite = self._all_finite(views)
        if not self._step_finite and any(group.get("on_nonfinite", "skip") == "raise" for _, group, _ in named):
            # Raised for the step as a whole before any group steps, as the base class does: a
            # group that skips would otherwise count a skipped step before a later one raised.
            self._step_finite = None
            where = "non-finite gradient on another rank of the process group"
            if not bool(gradient_ok(array_namespace(*views), views)):
                where = first_bad_gradient(array_namespace(*views), views, [(name,) for name, _, _ in named], "parameter")
            raise FloatingPointError(f"{type(self).__name__}: {where}")
        try:
            super()._step_groups(extra)
        finally:
            self._step_finite = None

    def _all_finite(self, views: list[torch.Tensor]) -> bool:
        """Whether the gradients of every rank pass the core's skip rule (finite, and a squared
        norm below the overflow margin; on a local shard, the shard's norm): one all-reduce."""
        local = gradient_ok(array_namespace(*views), views) if views else torch.tensor(True)
        flag = local.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._pg)
        return bool(flag.item())

    def _exchange(self, paths, leaves, grad_views, updates: list, finite: bool) -> None:
        """Fill ``updates`` of blocks owned elsewhere: one broadcast per owner and dtype.

        After a skipped step every update is zero on every rank, so nothing is sent.
        """
        if not self._owner:
            return
        for i, view in enumerate(grad_views):
            if updates[i] is None and not finite:
                updates[i] = torch.zeros_like(view)
        if not finite:
            return
        by_owner: dict[tuple[int, str], list[int]] = {}
        for i, (path, leaf) in enumerate(zip(paths, leaves)):
            if self._kind(leaf) == _LOCAL:
                continue
            owner = self._owner[path_str(path)]
            by_owner.setdefault((owner, str(grad_views[i].dtype)), []).append(i)
        for (owner, _), indices in sorted(by_owner.items()):
            like = grad_views[indices[0]]
            if owner == self._rank:
                flat = torch.cat([updates[i].reshape(-1) for i in indices])
            else:
                flat = torch.empty(sum(grad_views[i].numel() for i in indices), dtype=like.dtype, device=like.device)
            dist.broadcast(flat, src=dist.get_global_rank(self._pg, owner), group=self._pg)
            if owner != self._rank:
                for i, chunk in zip(indices, flat.split([grad_views[i].numel() for i in indices])):
                    updates[i] = chunk.view(grad_views[i].shape)


def _distributed(base: type, elementwise: bool = False) -> type:
    doc = (
        f"{base.__name__} (see :class:`precond_ref.adapters.torch.{base.__name__}`) for multi-process "
        "training: ``process_group=`` and ``split_preconditioner=`` as in :class:`DistributedOptimizer`."
    )
    cls = type(base.__name__, (DistributedOptimizer, base), {"__doc__": doc, "__module__": __name__,
                                                              "elementwise": elementwise})
    # The signature ``inspect.signature`` and ``help`` show: the base class's, then the mixin's own
    # keyword-only arguments (the mixin's ``__init__`` takes the base's as ``*args, **kwargs``).
    own = inspect.signature(DistributedOptimizer.__init__).parameters
    signature = inspect.signature(base.__init__)
    cls.__signature__ = signature.replace(
        parameters=[*list(signature.parameters.values())[1:], own["process_group"], own["split_preconditioner"]])
    return cls


AGD = _distributed(_base.AGD, elementwise=True)
RFRMSProp = _distributed(_base.RFRMSProp, elementwise=True)
RFAdamW = _distributed(_base.RFAdamW, elementwise=True)
ASGO = _distributed(_base.ASGO)
DASGO = _distributed(_base.DASGO)
IFShampoo = _distributed(_base.IFShampoo)
MBF = _distributed(_base.MBF)
Sketchy = _distributed(_base.Sketchy)
SAdaGrad = _distributed(_base.SAdaGrad)
