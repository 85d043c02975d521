"""``enable`` / ``disable`` and the handle that carries one transformer's STA settings.

The handle swaps the processors of the attention layers sta_dist serves, keeps the
replaced ones to put back, and reads each call's canvas (latent shape / patch size), text
and shard plan in a forward pre-hook on the transformer, so the processors need nothing
the model does not pass them.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..api import sliding_tile_attention
from ..config import check_triple
from ..distributed import DistributedSlidingTileAttention
from ..geometry import Triple
from ..integrations import training
from ..parallel.comm import Comm
from ..parallel.plan import MODES, ShardPlan
from ..validation import TextLength, check_head_dim, check_text_length
from .models import ModelSpec, model_spec
from .sharding import TransformerSharding
from .windows import WindowTable

_ATTR = "_sta_dist_handle"


@dataclass(frozen=True)
class CallContext:
    """What every attention layer of one transformer forward shares."""

    canvas: Triple
    """Video tokens per axis after patching."""
    text_len: int
    """Text tokens in each attention sequence (0 for Wan's self-attention)."""
    text_length: Optional[TextLength]
    """Valid text tokens: one int, or one per batch sample; ``None`` until the first layer
    reads them from the text mask it is given (HunyuanVideo-1.5)."""
    plan: Optional[ShardPlan]
    """sta_dist's own sharding of this forward (``parallel=...``), else ``None``."""


def _with_text_from_mask(ctx: CallContext, text_mask) -> CallContext:
    """The context with its valid text counts read from ``text_mask [B, L]`` (valid tokens
    first; one read to the host per forward)."""
    if text_mask is None:
        raise ValueError("this model hands its text validity to the attention blocks, but the processor got "
                         "attention_mask=None")
    mask = text_mask.bool()
    if mask.dim() != 2 or mask.shape[1] != ctx.text_len:
        raise ValueError(f"the text mask must be [B, L] with L = {ctx.text_len} text tokens, got shape "
                         f"{tuple(mask.shape)}")
    counts = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None, :] < counts[:, None]):
        raise ValueError("sta_dist attends the first text_length text tokens of each sample: the text mask must "
                         "hold its valid tokens first")
    return dataclasses.replace(ctx, text_length=check_text_length(counts, ctx.text_len, mask.shape[0]))


def _ulysses(parallel_config):
    """``(group, degree)`` of diffusers' context parallelism, or ``None``; a ring is refused."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None
    if cp.ring_degree > 1:
        raise ValueError(
            "sta_dist's processors run head mode on diffusers' Ulysses group; ring attention is not supported, "
            f"got ContextParallelConfig(ring_degree={cp.ring_degree}, ulysses_degree={cp.ulysses_degree}): "
            "use ContextParallelConfig(ulysses_degree=P), or sta_dist's own parallel='tile' / 'head'")
    return cp._ulysses_mesh.get_group(), cp.ulysses_degree


class STAHandle:
    """sta_dist enabled on one transformer: ``set_step(i)``, ``callback`` (a pipeline's
    ``callback_on_step_end``), ``context`` (the current forward's), ``stats()``."""

    def __init__(self, transformer: torch.nn.Module, spec: ModelSpec, tile: Triple, windows: WindowTable,
                 parallel: Optional[str], group, mesh, backend: str, select=None, window_rule: str = "sta"):
        self.transformer, self.spec, self.tile, self.windows = transformer, spec, tile, windows
        self.select, self.window_rule = select, window_rule
        self.parallel, self.group, self.mesh, self.backend = parallel, group, mesh, backend
        self.step = 0
        self.context: Optional[CallContext] = None
        self.last_plan: Optional[ShardPlan] = None
        """The shard plan of the latest forward (``parallel=...``)."""
        self.measure = False
        """When True, every attention call is timed (with device syncs) into ``attention_seconds``."""
        self.attention_seconds = 0.0
        self._comm = Comm(group) if parallel is not None else None
        self._modules: dict = {}
        self._stock: list = []
        self._hooks: list = []
        self._signature = inspect.signature(transformer.forward)

    # -- the denoising step ------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Which step of the mask strategy the next forwards use (any step for a fixed window)."""
        self.step = self.windows.check_step(step)

    def callback(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` for diffusers pipelines: after step ``i`` the next forward
        is step ``i + 1`` (back to 0 after the pipeline's last step, for its next run).
        Returns ``callback_kwargs`` unchanged, as diffusers expects."""
        following = step_index + 1
        self.set_step(0 if following >= getattr(pipe, "num_timesteps", following + 1) else following)
        return callback_kwargs

    # -- one forward -------------------------------------------------------------------------
    def _begin(self, module, args, kwargs) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        latents = bound.get("hidden_states")
        canvas = self.spec.canvas(latents)
        text_len, text_length = 0, 0
        if self.spec.joint_text:
            text_len, text_length = self.spec.text(bound, latents.shape[0])
        plan = None
        if self.parallel is not None:
            self._check_shardable(bound)
            plan = ShardPlan(canvas=canvas, tile=self.tile, text_len=text_len, mode=self.parallel,
                             world_size=self._comm.world_size, mesh=self.mesh,
                             windows=self.windows.distinct(self.step))
        self.context = CallContext(canvas, text_len, text_length, plan)
        self.last_plan = plan
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and func is not None and torch.is_grad_enabled():
            module._gradient_checkpointing_func = _Recompute(self, self.context, func)

    def _end(self, module, args, kwargs, output) -> None:
        self.context = None
        func = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(func, _Recompute):
            module._gradient_checkpointing_func = func.func

    def _check_shardable(self, bound: dict) -> None:
        timestep = bound.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.dim() > 1:
            raise ValueError("parallel=... shards video tokens; a per-token timestep (Wan 2.2 TI2V) would need "
                             f"sharding too, got timestep.shape={tuple(timestep.shape)}")
        if getattr(self.transformer.config, "image_condition_type", None) == "token_replace":
            raise ValueError("parallel=... does not support HunyuanVideo's image_condition_type='token_replace' "
                             "(its blocks slice the first frame's tokens out of the full sequence)")

    # -- attention ---------------------------------------------------------------------------
    def attend(self, q_bshd, k_bshd, v_bshd, layer: int, parallel_config=None, text_mask=None) -> torch.Tensor:
        """STA for attention layer ``layer`` of the current forward: on this device, over
        sta_dist's shard plan, or head mode over diffusers' Ulysses group. ``text_mask``
        (``[B, L]``, valid tokens first): where a model hands its text validity to the
        blocks rather than to the transformer (read at the forward's first layer)."""
        ctx = self.context
        if ctx is None:
            raise RuntimeError("sta_dist's attention processors run inside the transformer's forward (which reads "
                               "the canvas and text of the call); the attention module was called on its own (to "
                               "checkpoint blocks, use the transformer's enable_gradient_checkpointing())")
        if ctx.text_length is None:
            ctx = self.context = _with_text_from_mask(ctx, text_mask)
        window = self.windows.layer(self.step, layer)
        start = self._sync_time() if self.measure else 0.0
        ulysses = _ulysses(parallel_config)
        kw = dict(window=window, text_length=ctx.text_length)
        if self.select is not None or self.window_rule != "sta":
            kw.update(select=self.select, window_rule=self.window_rule)
        if ctx.plan is not None:
            # training: the text rows' gradients between the core's contract and the model's
            q_bshd, k_bshd, v_bshd = training.text_inputs((q_bshd, k_bshd, v_bshd), ctx.text_len, self._comm)
            out = self._distributed(ctx.plan, None)(q_bshd, k_bshd, v_bshd, **kw)
            out = training.text_output(out, ctx.text_len, self._comm)
        elif ulysses is not None:
            if self.spec.layout != "natural":
                raise ValueError(f"{self.spec.name} orders its tokens in tiles; diffusers' Ulysses chunks are cut "
                                 "from the natural order, so sta_dist cannot run on them")
            group, degree = ulysses
            plan = ShardPlan(canvas=ctx.canvas, tile=self.tile, text_len=ctx.text_len, mode="head",
                             world_size=degree, order="natural")
            out = self._distributed(plan, group)(q_bshd, k_bshd, v_bshd, **kw)
        else:
            out = sliding_tile_attention(q_bshd, k_bshd, v_bshd, canvas=ctx.canvas, tile=self.tile, **kw,
                                         backend=self.backend, layout=self.spec.layout)
        if self.measure:
            self.attention_seconds += self._sync_time() - start
        return out

    def _distributed(self, plan: ShardPlan, group) -> DistributedSlidingTileAttention:
        """One module per plan (its construction is collective: every rank builds the same
        plans in the same order, since every rank runs the same forwards)."""
        key = (plan, group if group is not None else self.group)
        if key not in self._modules:
            self._modules[key] = DistributedSlidingTileAttention(self.spec.num_heads, self.spec.head_dim, plan,
                                                                 group=key[1], backend=self.backend)
        return self._modules[key]

    def _sync_time(self) -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def reduce_gradients(self) -> None:
        """After ``backward`` under ``parallel=``: sum the transformer's parameter gradients
        over the group (each rank holds its share), so every rank has the one-process
        gradient and the same optimizer step. A no-op in one process."""
        if self.parallel is not None:
            training.reduce_gradients(self.transformer.parameters(), self.group)

    def bytes_sent(self) -> dict:
        """Bytes this rank sent, per step name (attention exchanges and the output gather)."""
        total: dict = {}
        comms = [m.comm for m in self._modules.values()] + ([self._comm] if self._comm else [])
        for comm in comms:
            for step, n in comm.bytes_sent.items():
                total[step] = total.get(step, 0) + n
        return total

    def describe(self) -> str:
        mode = f"parallel={self.parallel}" if self.parallel else "one process"
        selection = f", select={self.select!r}, window_rule={self.window_rule}" if self.select is not None else ""
        return f"{self.spec.name}: tile={self.tile}{selection}, {mode}, backend={self.backend}"


class _Recompute:
    """diffusers' gradient-checkpointing function for one forward: each block it runs, and
    reruns in the backward (after the forward has ended), sees that forward's context."""

    def __init__(self, handle: STAHandle, context: CallContext, func):
        self.handle, self.context, self.func = handle, context, func

    def __call__(self, block, *args, **kwargs):
        return self.func(functools.partial(self._run, block), *args, **kwargs)

    def _run(self, block, *args, **kwargs):
        handle, outer = self.handle, self.handle.context
        handle.context = self.context
        try:
            return block(*args, **kwargs)
        finally:
            handle.context = outer


def enable(transformer: torch.nn.Module, *, tile=None, window=None, mask_strategy=None, parallel: Optional[str] = None,
           group=None, mesh=None, backend: str = "auto", select=None, window_rule: Optional[str] = None) -> STAHandle:
    """Run sliding tile attention in ``transformer`` (``WanTransformer3DModel``: self-attention;
    ``HunyuanVideoTransformer3DModel``: joint video + text attention).

    ``tile=(tt, th, tw)`` in latent tokens after patching; ``window`` one ``(kt, kh, kw)``
    in tiles, one per head, or one per (layer, head); or ``mask_strategy`` a FastVideo-format
    JSON (per step, layer, head: use ``handle.set_step`` or ``callback_on_step_end=handle.callback``).
    ``parallel`` (under torch.distributed): ``"head"``, ``"tile"``, ``"hybrid"`` (``mesh=(P_head,
    P_tile)``, default the squarest) or ``"auto"`` shards the whole transformer over ``group``
    (default the world); every rank calls the transformer with the full inputs and gets the
    full output. Under diffusers' own ``enable_parallelism(ContextParallelConfig(ulysses_degree=P))``
    leave ``parallel=None``: the processors run head mode on its Ulysses group.

    ``select`` / ``window_rule`` (window plus selected tiles, as in
    :func:`sta_dist.sliding_tile_attention`): HunyuanVideo-1.5's SSTA is
    ``select=sta_dist.TopK(k), window_rule="fastvideo"``. A model that ships its own sparse
    attention brings its defaults: ``Kandinsky6SRTransformer3DModel`` runs its NABLA (tile
    (1, 8, 8), its ``nabla_window``, ``window_rule="clipped"``, ``select=Mass(nabla_threshold)``)
    with no argument at all.
    """
    from ..selection.config import Mass, TopK, check_window_rule

    if getattr(transformer, _ATTR, None) is not None:
        raise ValueError("sta_dist is already enabled on this transformer: call sta_dist.diffusers.disable(transformer) first")
    spec = model_spec(transformer)
    if tile is None and spec.tile is None:
        raise ValueError(f"tile=(tt, th, tw) must be given for {spec.name}, got tile=None")
    tile = check_triple("tile", spec.tile if tile is None else tile)
    if spec.tile is not None and tile != spec.tile:
        raise ValueError(f"{spec.name} orders its tokens in tiles of {spec.tile}: tile must be {spec.tile} "
                         f"(or None), got tile={tile}")
    check_head_dim(spec.head_dim)
    if window is None and mask_strategy is None:
        window = spec.defaults.get("window")
    select = spec.defaults.get("select") if select is None else select
    window_rule = check_window_rule(spec.defaults.get("window_rule", "sta") if window_rule is None else window_rule)
    if select is not None and not isinstance(select, (TopK, Mass)):  # a tile mask fits one call, not a transformer
        raise TypeError(f"select must be sta_dist.TopK, sta_dist.Mass or None here, got select={select!r}")
    if window is None and mask_strategy is None and select is not None:
        windows = WindowTable.none(len(spec.attention))
    else:
        windows = WindowTable.build(window, mask_strategy, len(spec.attention), spec.num_heads)
    if parallel is not None and not spec.shardable:
        raise ValueError(f"parallel=... shards the natural token order; {spec.name} orders its tokens in tiles, "
                         f"so parallel must be None, got parallel={parallel!r}")
    mesh = _check_parallel(transformer, parallel, group, mesh)
    handle = STAHandle(transformer, spec, tile, windows, parallel, group, mesh, backend, select, window_rule)
    for layer, module in enumerate(spec.attention):
        stock = module.processor
        processor = spec.processor(handle, layer)
        processor._parallel_config = getattr(stock, "_parallel_config", None)  # enable_parallelism() came first
        handle._stock.append(stock)
        module.set_processor(processor)
    handle._hooks = [transformer.register_forward_pre_hook(handle._begin, with_kwargs=True),
                     transformer.register_forward_hook(handle._end, with_kwargs=True, always_call=True)]
    if parallel is not None:
        handle._hooks += TransformerSharding(handle, spec, handle._comm).install()
    setattr(transformer, _ATTR, handle)
    return handle


def _check_parallel(transformer, parallel, group, mesh):
    """``parallel`` and ``mesh`` for ``enable``; returns the mesh for the plan."""
    if parallel is None:
        if mesh is not None or group is not None:
            raise ValueError(f"group and mesh apply with parallel=..., got parallel=None, group={group!r}, mesh={mesh!r}")
        _ulysses(getattr(transformer, "_parallel_config", None))  # refuse a ring early
        return None
    if parallel not in MODES:
        raise ValueError(f"parallel must be None or one of {MODES}, got parallel={parallel!r}")
    if not dist.is_initialized():
        raise RuntimeError(f"parallel={parallel!r} needs torch.distributed: run under torchrun and call "
                           "sta_dist.init_distributed() first")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError("this transformer already runs diffusers' enable_parallelism(); use parallel=None (the "
                         "processors run head mode on its Ulysses group) or sta_dist's own parallel=, not both")
    if parallel != "hybrid":
        if mesh is not None:
            raise ValueError(f"mesh=(P_head, P_tile) applies with parallel='hybrid', got parallel={parallel!r}")
        return None
    if mesh is None:
        world = dist.get_world_size(group)
        p_head = max(d for d in range(1, int(world**0.5) + 1) if world % d == 0)
        return (p_head, world // p_head)
    return tuple(mesh)


def reduce_gradients(transformer: torch.nn.Module) -> None:
    """:meth:`STAHandle.reduce_gradients` of the transformer sta_dist is enabled on: call it
    after ``loss.backward()`` and before ``optimizer.step()``."""
    handle: Optional[STAHandle] = getattr(transformer, _ATTR, None)
    if handle is None:
        raise ValueError("sta_dist is not enabled on this transformer (sta_dist.diffusers.enable was not called)")
    handle.reduce_gradients()


def disable(transformer: torch.nn.Module) -> None:
    """Put the stock processors back (the same objects) and remove sta_dist's hooks."""
    handle: Optional[STAHandle] = getattr(transformer, _ATTR, None)
    if handle is None:
        raise ValueError("sta_dist is not enabled on this transformer (sta_dist.diffusers.enable was not called)")
    for module, stock in zip(handle.spec.attention, handle._stock):
        ours = module.processor
        if getattr(stock, "_parallel_config", None) is None and getattr(ours, "_parallel_config", None) is not None:
            stock._parallel_config = ours._parallel_config  # enable_parallelism() came while ours were in
        module.set_processor(stock)
    for hook in handle._hooks:
        hook.remove()
    delattr(transformer, _ATTR)
