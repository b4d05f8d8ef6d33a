"""Hand-rolled fully sharded data parallelism over `torch.distributed` collectives.

Usage (one CPU process, or `torchrun --nproc-per-node N` on one or several nodes: same code):
    info = init_distributed()
    model = FSDP(model, compute_dtype=torch.bfloat16, activation_checkpointing=True)
    opt = build_optimizer(model.trainable_parameters(), lr=1e-5)
    loss = model(x).mean(); loss.backward(); clip_grad_norm_(model, 1.0); opt.step(); opt.zero_grad()

Layout. The unit of sharding is a block (by default every entry of the module's top-level
ModuleLists) plus a root unit holding every parameter outside the blocks. A unit's
parameters are split into up to two `FlatGroup`s:
- trainable: an fp32 master flat buffer, padded to a multiple of the world size and split
  evenly; this rank's slice is an `nn.Parameter` the optimizer steps. When the group is
  smaller than `replicate_trainable_below` elements (LoRA) it is instead kept whole on every
  rank and its gradient all-reduced;
- frozen: the same flat sharding, stored in the compute dtype, gathered for forward (and
  for the backward through it) only.
Each group records its (name, shape, offset) table; checkpoints and exports use it.

Note [parameters as views of a resizable buffer]: during a unit's forward each module
parameter is a plain tensor view (written into the module's `__dict__`) of one gathered
compute-dtype buffer `full` per group. The real `nn.Parameter`s are removed from the
modules (a `meta` placeholder of the right shape stays in their place between forwards).
After the forward the buffer's *storage* is resized to 0: the views and every tensor
autograd saved from them stay valid objects, and when backward needs them again the storage
is resized back and re-gathered in place, so saved tensors see the right values without any
recompute. The gather writes through `full`, a separate tensor object aliasing the storage,
so it does not bump the version counter of the views autograd saved. Gradients reach a
fresh leaf per forward (aliasing the same storage) through one `split`, whose backward is a
single concatenation; the leaf's post-accumulate-grad hook reduce-scatters that flat
gradient into the fp32 shard gradient. A fresh leaf per forward lets a unit run several
forwards before one backward (GRPO) with each forward's gradient reduced as soon as it is
complete, so at most about two units are gathered at any time. This is the storage-resize
scheme of PyTorch's own FSDP; the alternatives (swapping `param.data`, which materialises a
gradient per parameter, or recomputing every unit in backward, which costs a third more
compute) were rejected.

Backward bookkeeping: a gradient hook on the unit's outputs fires before the unit's
backward (re-gather, prefetch the previous unit); an identity autograd Function on its
inputs fires after
(that and the trainable leaves' hooks release the buffer). A callback queued on the
autograd engine frees whatever is still gathered when backward ends.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils import checkpoint as torch_checkpoint
from torch.utils._pytree import tree_flatten, tree_unflatten

from idgrpo.engine.dist import _all_gather_single, _reduce_scatter_single, init_distributed


class FlatGroup:
    """One flat buffer of a unit: its trainable or its frozen parameters."""

    def __init__(self, key: str, named: list[tuple[str, nn.Parameter]], *, trainable: bool, replicated: bool,
                 compute_dtype: torch.dtype, reduce_dtype: torch.dtype, rank: int, world_size: int,
                 device: torch.device):
        self.key = key
        self.trainable = trainable
        self.replicated = replicated
        self.compute_dtype = compute_dtype
        self.reduce_dtype = reduce_dtype
        self.rank, self.world_size, self.device = rank, world_size, device
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = sum(self.numels)
        parts = 1 if replicated else world_size
        self.padded = math.ceil(max(self.numel, 1) / parts) * parts
        self.shard_numel = self.padded // parts
        self.shard_offset = 0 if replicated else rank * self.shard_numel
        master_dtype = torch.float32 if trainable else compute_dtype
        with torch.no_grad():
            flat = torch.zeros(self.padded, dtype=master_dtype, device=device)
            for (_, p), off, n in zip(named, self.offsets, self.numels):
                if not p.is_meta:  # meta: built without storage; filled later by load_full_state_dict
                    flat[off:off + n].copy_(p.detach().reshape(-1))
            shard = flat[self.shard_offset:self.shard_offset + self.shard_numel].clone()
        del flat
        self.master = nn.Parameter(shard, requires_grad=trainable)
        self.master._idgrpo_replicated = replicated  # read by clip_grad_norm_
        self.master._idgrpo_group = key
        if replicated and world_size > 1:
            dist.broadcast(self.master.data, src=0)  # replicas must start identical
        self.full = torch.empty(self.padded, dtype=compute_dtype, device=device)
        self._nbytes = self.full.untyped_storage().nbytes()
        self.full.untyped_storage().resize_(0)
        self.split_sizes = self.numels + ([self.padded - self.numel] if self.padded > self.numel else [])
        # (module, attribute, parameter index) for every place a parameter was registered
        self.slots: list[tuple[nn.Module, str, int]] = []
        self.grad_accum: torch.Tensor | None = None  # unsharded grad summed over no_sync micro-steps

    def table(self) -> list[dict]:
        return [{"name": n, "shape": list(s), "offset": o} for n, s, o in zip(self.names, self.shapes, self.offsets)]

    @property
    def gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def gather(self) -> None:
        """Fill `full` with the whole compute-dtype flat buffer (all-gather of the shards)."""
        storage = self.full.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(self._nbytes)
        src = self.master.detach()
        if self.replicated or self.world_size == 1:
            self.full.copy_(src)
            return
        if src.dtype != self.compute_dtype:
            src = src.to(self.compute_dtype)
        _all_gather_single(self.full, src)

    def free(self) -> None:
        self.full.untyped_storage().resize_(0)

    def bind_views(self, with_grad: bool) -> torch.Tensor | None:
        """Point every registered parameter slot at a view of the gathered buffer.

        Returns the leaf the views hang off when gradients are wanted (see the module Note).
        """
        # A fresh alias, not `full` itself: gathers write through `full`, and must not bump the
        # version counter of views autograd saved (frozen weights are saved too).
        base = torch.empty(0, dtype=self.compute_dtype, device=self.device)
        base.set_(self.full.untyped_storage(), 0, (self.padded,))
        if with_grad:
            base.requires_grad_(True)
        pieces = base.split(self.split_sizes)
        views = [pieces[i].view(shape) for i, shape in enumerate(self.shapes)]
        for module, attr, index in self.slots:
            module.__dict__[attr] = views[index]
        return base if with_grad else None

    def unbind_views(self) -> None:
        for module, attr, index in self.slots:
            module.__dict__[attr] = torch.empty(self.shapes[index], dtype=self.compute_dtype, device="meta")

    def reduce_grad(self, grad: torch.Tensor, sync: bool) -> None:
        """Add one forward's unsharded flat gradient (padded,) into the fp32 shard gradient."""
        if not sync:
            g = grad.to(torch.float32)
            self.grad_accum = g if self.grad_accum is None else self.grad_accum.add_(g)
            return
        if self.grad_accum is not None:
            grad = self.grad_accum.add_(grad)
            self.grad_accum = None
        grad = grad.to(self.reduce_dtype)
        if self.replicated:
            dist.all_reduce(grad)
            shard = grad
        elif self.world_size == 1:
            shard = grad
        else:
            shard = torch.empty(self.shard_numel, dtype=self.reduce_dtype, device=self.device)
            _reduce_scatter_single(shard, grad)
        if self.world_size > 1:
            shard = shard.div_(self.world_size)  # mean over ranks: N ranks match 1 rank on the global batch
        if self.master.grad is None:
            self.master.grad = shard.to(torch.float32)  # `shard` is never aliased by anyone else
        else:
            self.master.grad.add_(shard)


class _Unit:
    def __init__(self, name: str, module: nn.Module, groups: list[FlatGroup], checkpointed: bool):
        self.name, self.module, self.groups, self.checkpointed = name, module, groups, checkpointed
        self.active_backward = 0  # forward instances whose backward is running now
        self.gather_event = None  # CUDA event of an in-flight prefetch
        self.instance: _Instance | None = None  # the forward call in progress (between the two hooks)

    @property
    def gathered(self) -> bool:
        return any(g.gathered for g in self.groups)


class _Instance:
    """One forward call of a unit, tracked through its backward."""

    __slots__ = ("unit", "pending", "started")

    def __init__(self, unit: _Unit, pending: int):
        self.unit, self.pending, self.started = unit, pending, False


class _PostBackward(torch.autograd.Function):
    """Identity on a unit's inputs; its backward runs after the unit's backward."""

    @staticmethod
    def forward(ctx, fsdp, instance, *tensors):
        ctx.fsdp, ctx.instance = fsdp, instance
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        ctx.fsdp._signal_done(ctx.instance)
        return (None, None, *grads)


def _wrap_tensors(fn, fsdp, instance, tree):
    """Pass the tensors of `tree` that require grad through the identity Function `fn`."""
    leaves, spec = tree_flatten(tree)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not idx:
        return tree, False
    out = fn.apply(fsdp, instance, *[leaves[i] for i in idx])
    for i, t in zip(idx, out):
        leaves[i] = t
    return tree_unflatten(leaves, spec), True


class FSDP(nn.Module):
    """Shard `module` over the default process group (see the module docstring).

    Args:
        module: the model; its parameters must be identical on every rank. Parameters may be on
            the meta device (then call `load_full_state_dict` before use); buffers may not.
        units: the blocks to shard separately (default: every entry of the module's
            top-level ModuleLists). Everything else forms the root unit.
        compute_dtype: dtype of the gathered weights the forward computes with.
        reduce_dtype: dtype of gradient reductions (fp32 by default).
        activation_checkpointing: recompute each unit's activations in backward.
        replicate_trainable_below: a unit's trainable group with fewer elements than this
            stays replicated (all-reduced gradients) instead of sharded; 0 shards everything.
        device: where shards and gathered weights live (default: the current CUDA device, else CPU).
        prefetch: gather the next unit (forward) / previous unit (backward) ahead of use; default
            on CUDA only (on CPU it just moves the gather earlier, which tests use).
    """

    def __init__(self, module: nn.Module, *, units: list[nn.Module] | None = None,
                 compute_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32,
                 activation_checkpointing: bool = False, replicate_trainable_below: int = 0,
                 device: torch.device | str | None = None, prefetch: bool | None = None):
        super().__init__()
        if replicate_trainable_below < 0:
            raise ValueError(f"replicate_trainable_below must be >= 0, got {replicate_trainable_below}")
        if units is None:
            units = [m for child in module.children() if isinstance(child, nn.ModuleList) for m in child]
        module_names = {id(m): n for n, m in module.named_modules()}
        unit_ids = {id(u) for u in units}
        for u in units:
            if id(u) not in module_names:
                raise ValueError("every unit must be a submodule of the wrapped module")
            if u is module:
                raise ValueError("the root module cannot be a unit; it is always the root unit")
            for sub in u.modules():
                if sub is not u and id(sub) in unit_ids:
                    raise ValueError(f"unit {module_names[id(u)]} contains unit {module_names[id(sub)]}; "
                                     "units must not nest")
        meta_buffers = [n for n, b in module.named_buffers() if b.is_meta]
        if meta_buffers:
            raise ValueError(f"buffers {meta_buffers[:3]} are on the meta device: materialise buffers before "
                             "wrapping (parameters may stay on meta and be loaded with load_full_state_dict)")
        if not dist.is_initialized():
            init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.compute_dtype, self.reduce_dtype = compute_dtype, reduce_dtype
        self.activation_checkpointing = activation_checkpointing
        self.module = module

        group_kwargs = dict(compute_dtype=compute_dtype, reduce_dtype=reduce_dtype, rank=self.rank,
                            world_size=self.world_size, device=self.device)

        # Parameters by the unit that owns them: the first unit (in module order) that holds them.
        owner: dict[int, str] = {}
        ordered_units = sorted(units, key=lambda u: list(module_names).index(id(u)))
        for u in ordered_units:
            for p in u.parameters():
                owner.setdefault(id(p), module_names[id(u)])
        all_named = list(module.named_parameters(remove_duplicate=True))
        self._units: list[_Unit] = []
        self.groups: list[FlatGroup] = []

        def build_unit(name: str, unit_module: nn.Module, members: list[tuple[str, nn.Parameter]], checkpointed):
            groups = []
            for trainable in (True, False):
                named = [(n, p) for n, p in members if p.requires_grad == trainable]
                if not named:
                    continue
                numel = sum(p.numel() for _, p in named)
                replicated = trainable and numel < replicate_trainable_below
                key = f"{name or '<root>'}/{'trainable' if trainable else 'frozen'}"
                groups.append(FlatGroup(key, named, trainable=trainable, replicated=replicated, **group_kwargs))
            unit = _Unit(name, unit_module, groups, checkpointed)
            self._units.append(unit)
            self.groups.extend(groups)
            return unit

        root_members = [(n, p) for n, p in all_named if id(p) not in owner]
        self._root = build_unit("", module, root_members, False)
        for u in ordered_units:
            name = module_names[id(u)]
            members = [(n, p) for n, p in all_named if owner.get(id(p)) == name]
            build_unit(name, u, members, activation_checkpointing)

        # Replace every registered nn.Parameter by a placeholder; remember where it lived.
        index_of: dict[int, tuple[FlatGroup, int]] = {}
        by_name = dict(all_named)
        for group in self.groups:
            for i, n in enumerate(group.names):
                index_of[id(by_name[n])] = (group, i)
        for m in module.modules():
            for attr, p in list(m._parameters.items()):
                if p is None:
                    continue
                group, i = index_of[id(p)]
                group.slots.append((m, attr, i))
                del m._parameters[attr]
        for group in self.groups:
            group.unbind_views()
        del by_name, all_named, root_members
        module.to(self.device)  # buffers (the parameters are gone from the modules)

        self._masters = nn.ParameterList([g.master for g in self.groups if g.trainable])
        self._order: list[_Unit] = []  # units in first-seen forward order, for prefetching
        self._sync_grads = True
        self._callback_queued = False
        self._pending_reduce: list = []
        cuda = self.device.type == "cuda"
        self.prefetch = cuda if prefetch is None else prefetch
        self._gather_stream = torch.cuda.Stream(self.device) if cuda else None
        self._reduce_stream = torch.cuda.Stream(self.device) if cuda else None
        self._hooks = []
        for unit in self._units:
            if unit is not self._root and not unit.groups:
                continue
            self._hooks.append(unit.module.register_forward_pre_hook(self._make_pre_forward(unit), with_kwargs=True))
            self._hooks.append(unit.module.register_forward_hook(self._make_post_forward(unit), with_kwargs=True))
            if unit.checkpointed:
                original = unit.module.forward

                def checkpointed_forward(*args, _original=original, **kwargs):
                    if not torch.is_grad_enabled():
                        return _original(*args, **kwargs)
                    return torch_checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

                unit.module.forward = checkpointed_forward

    # ---------------------------------------------------------------- public API
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The fp32 master shards the optimizer steps (replicated groups: full copies)."""
        return list(self._masters)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (unsharded, fp32) without communication; the first
        backward outside the context reduces everything accumulated.

        Note: this holds an unsharded fp32 gradient per trainable group (4 bytes per trainable
        parameter on every rank): right for LoRA, too much for full fine-tuning of a large model,
        where plain backward per micro-step (reduce-scatter each time, sharded memory) is better
        (`GRPOConfig.grad_accumulation`, whose "auto" picks that for sharded trainable weights).
        """
        previous, self._sync_grads = self._sync_grads, False
        try:
            yield
        finally:
            self._sync_grads = previous

    def parameter_table(self) -> dict[str, dict]:
        """name -> {group, shape, offset} for every parameter."""
        return {row["name"]: {"group": g.key, "shape": row["shape"], "offset": row["offset"]}
                for g in self.groups for row in g.table()}

    @torch.no_grad()
    def full_state_dict(self, *, trainable_only: bool = False, device="cpu") -> dict[str, torch.Tensor]:
        """Every parameter, whole, by name (a collective: call on every rank). Trainable ones in
        fp32, frozen ones in the compute dtype they are stored in."""
        out = {}
        for g in self.groups:
            if trainable_only and not g.trainable:
                continue
            flat = self._gather_flat(g)
            for n, s, o, k in zip(g.names, g.shapes, g.offsets, g.numels):
                out[n] = flat[o:o + k].view(s).to(device, copy=True)
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Copy whole tensors by name into this rank's shards."""
        known = self.parameter_table()
        if strict:
            missing = sorted(set(known) - set(state))
            unexpected = sorted(set(state) - set(known))
            if missing or unexpected:
                raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for g in self.groups:
            flat = torch.zeros(g.padded, dtype=g.master.dtype, device=self.device)
            flat[g.shard_offset:g.shard_offset + g.shard_numel].copy_(g.master)
            for n, s, o, k in zip(g.names, g.shapes, g.offsets, g.numels):
                if n not in state:
                    continue
                t = state[n]
                if tuple(t.shape) != s:
                    raise ValueError(f"parameter {n}: expected shape {list(s)}, got {list(t.shape)}")
                flat[o:o + k].copy_(t.reshape(-1))
            g.master.data.copy_(flat[g.shard_offset:g.shard_offset + g.shard_numel])

    def _gather_flat(self, g: FlatGroup) -> torch.Tensor:
        """The whole (padded) flat buffer of `g` in its master dtype."""
        if g.replicated or self.world_size == 1:
            return g.master.detach()
        out = torch.empty(g.padded, dtype=g.master.dtype, device=self.device)
        _all_gather_single(out, g.master.detach().contiguous())
        return out

    # ---------------------------------------------------------------- gathering
    def _gather(self, unit: _Unit) -> None:
        if unit.gather_event is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.gather_event)
            unit.gather_event = None
            return
        if unit.gathered:
            return
        for g in unit.groups:
            g.gather()

    def _prefetch(self, unit: _Unit | None) -> None:
        """Start gathering `unit` on the side stream (CUDA; on CPU there is nothing to overlap)."""
        if unit is None or not self.prefetch or unit.gathered:
            return
        if self._gather_stream is None:  # CPU (tests of the bookkeeping): gather now
            for g in unit.groups:
                g.gather()
            return
        current = torch.cuda.current_stream(self.device)
        for g in unit.groups:  # allocate on the compute stream, which frees it later (no record_stream)
            storage = g.full.untyped_storage()
            if storage.nbytes() == 0:
                storage.resize_(g._nbytes)
        self._gather_stream.wait_stream(current)
        with torch.cuda.stream(self._gather_stream):
            for g in unit.groups:
                g.gather()
        unit.gather_event = self._gather_stream.record_event()

    def _free(self, unit: _Unit) -> None:
        if unit.gather_event is not None:  # never free under an in-flight gather
            torch.cuda.current_stream(self.device).wait_event(unit.gather_event)
            unit.gather_event = None
        for g in unit.groups:
            g.free()

    def _neighbour(self, unit: _Unit, step: int) -> _Unit | None:
        try:
            i = self._order.index(unit) + step
        except ValueError:
            return None
        return self._order[i] if 0 <= i < len(self._order) else None

    # ---------------------------------------------------------------- hooks
    def _make_pre_forward(self, unit: _Unit):
        def hook(module, args, kwargs):
            if unit not in self._order:
                self._order.append(unit)
            self._gather(unit)
            self._prefetch(self._neighbour(unit, +1))
            grad = torch.is_grad_enabled()
            leaves = [g.bind_views(grad and g.trainable) for g in unit.groups]
            if not grad:
                unit.instance = None
                return args, kwargs
            instance = _Instance(unit, pending=0)
            for g, leaf in zip(unit.groups, leaves):
                if leaf is not None:
                    instance.pending += 1
                    leaf.register_post_accumulate_grad_hook(self._make_grad_hook(g, instance))
            (args, kwargs), wrapped = _wrap_tensors(_PostBackward, self, instance, (args, kwargs))
            instance.pending += int(wrapped)
            unit.instance = instance
            return args, kwargs

        return hook

    def _make_post_forward(self, unit: _Unit):
        def hook(module, args, kwargs, output):
            self._free(unit)
            if unit is self._root:
                for u in self._units:  # a prefetched unit that the forward never used
                    if u.gather_event is not None or (u.gathered and u.active_backward == 0):
                        self._free(u)
            instance = unit.instance
            unit.instance = None
            if instance is None:
                return output
            # Note: a tensor hook rather than an identity Function, so that callers may modify a
            # unit's output in place (a hook stays with the node that produced the output).
            hook = self._make_pre_backward_hook(instance)
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(hook)
            return output

        return hook

    def _make_pre_backward_hook(self, instance: _Instance):
        def hook(grad: torch.Tensor) -> None:
            self._pre_backward(instance)

        return hook

    def _make_grad_hook(self, group: FlatGroup, instance: _Instance):
        def hook(leaf: torch.Tensor) -> None:
            grad, leaf.grad = leaf.grad, None
            self._reduce(group, grad)
            self._signal_done(instance)

        return hook

    def _reduce(self, group: FlatGroup, grad: torch.Tensor) -> None:
        if self._reduce_stream is None:
            group.reduce_grad(grad, self._sync_grads)
            return
        current = torch.cuda.current_stream(self.device)
        if self._pending_reduce:  # the previous reduction's input may be freed only once it is done
            event, _ = self._pending_reduce.pop(0)
            current.wait_event(event)
        self._reduce_stream.wait_stream(current)
        with torch.cuda.stream(self._reduce_stream):
            group.reduce_grad(grad, self._sync_grads)
        self._pending_reduce.append((self._reduce_stream.record_event(), grad))

    def _pre_backward(self, instance: _Instance) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if instance.started:
            return
        instance.started = True
        unit = instance.unit
        self._gather(unit)
        unit.active_backward += 1
        self._prefetch(self._neighbour(unit, -1))  # before this unit's reduce-scatter is issued

    def _signal_done(self, instance: _Instance) -> None:
        instance.pending -= 1
        if instance.pending == 0 and instance.started:
            unit = instance.unit
            unit.active_backward -= 1
            if unit.active_backward == 0:
                self._free(unit)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        for unit in self._units:
            unit.active_backward = 0
            if unit.gathered or unit.gather_event is not None:
                self._free(unit)
        if self._reduce_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._reduce_stream)
            self._pending_reduce.clear()
