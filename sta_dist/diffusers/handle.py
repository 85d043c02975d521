"""``enable`` / ``disable`` and the handle that carries one transformer's STA settings.

The handle swaps the processors of the attention layers sta_dist serves, keeps the
replaced ones to put back, and reads each call's canvas (latent shape / patch size), text
and shard plan in a forward pre-hook on the transformer, so the processors need nothing
the model does not pass them.

Legend: ``_bshd`` = ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

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
    text_length: TextLength
    """Valid text tokens: one int, or one per batch sample."""
    plan: Optional[ShardPlan]
    """sta_dist's own sharding of this forward (``parallel=...``), else ``None``."""


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
                 parallel: Optional[str], group, mesh, backend: str):
        self.transformer, self.spec, self.tile, self.windows = transformer, spec, tile, windows
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
            text_len = bound["encoder_hidden_states"].shape[1]
            mask = bound.get("encoder_attention_mask")
            # the model attends the first mask.sum() text tokens of each sample: read once per forward
            text_length = check_text_length(None if mask is None else mask.sum(1), text_len, latents.shape[0])
        plan = None
        if self.parallel is not None:
            self._check_shardable(bound)
            plan = ShardPlan(canvas=canvas, tile=self.tile, text_len=text_len, mode=self.parallel,
                             world_size=self._comm.world_size, mesh=self.mesh,
                             windows=self.windows.distinct(self.step))
        self.context = CallContext(canvas, text_len, text_length, plan)
        self.last_plan = plan

    def _end(self, module, args, kwargs, output) -> None:
        self.context = None

    def _check_shardable(self, bound: dict) -> None:
        timestep = bound.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.dim() > 1:
            raise ValueError("parallel=... shards video tokens; a per-token timestep (Wan 2.2 TI2V) would need "
                             f"sharding too, got timestep.shape={tuple(timestep.shape)}")
        if getattr(self.transformer.config, "image_condition_type", None) == "token_replace":
            raise ValueError("parallel=... does not support HunyuanVideo's image_condition_type='token_replace' "
                             "(its blocks slice the first frame's tokens out of the full sequence)")

    # -- attention ---------------------------------------------------------------------------
    def attend(self, q_bshd, k_bshd, v_bshd, layer: int, parallel_config=None) -> torch.Tensor:
        """STA for attention layer ``layer`` of the current forward: on this device, over
        sta_dist's shard plan, or head mode over diffusers' Ulysses group."""
        ctx = self.context
        if ctx is None:
            raise RuntimeError("sta_dist's attention processors run inside the transformer's forward (which reads "
                               "the canvas and text of the call); the attention module was called on its own")
        window = self.windows.layer(self.step, layer)
        start = self._sync_time() if self.measure else 0.0
        ulysses = _ulysses(parallel_config)
        if ctx.plan is not None:
            out = self._distributed(ctx.plan, None)(q_bshd, k_bshd, v_bshd, window=window,
                                                    text_length=ctx.text_length)
        elif ulysses is not None:
            group, degree = ulysses
            plan = ShardPlan(canvas=ctx.canvas, tile=self.tile, text_len=ctx.text_len, mode="head",
                             world_size=degree, order="natural")
            out = self._distributed(plan, group)(q_bshd, k_bshd, v_bshd, window=window, text_length=ctx.text_length)
        else:
            out = sliding_tile_attention(q_bshd, k_bshd, v_bshd, canvas=ctx.canvas, tile=self.tile, window=window,
                                         text_length=ctx.text_length, backend=self.backend)
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
        return f"{self.spec.name}: tile={self.tile}, {mode}, backend={self.backend}"


def enable(transformer: torch.nn.Module, *, tile, window=None, mask_strategy=None, parallel: Optional[str] = None,
           group=None, mesh=None, backend: str = "auto") -> STAHandle:
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
    """
    if getattr(transformer, _ATTR, None) is not None:
        raise ValueError("sta_dist is already enabled on this transformer: call sta_dist.diffusers.disable(transformer) first")
    spec = model_spec(transformer)
    tile = check_triple("tile", tile)
    check_head_dim(spec.head_dim)
    windows = WindowTable.build(window, mask_strategy, len(spec.attention), spec.num_heads)
    mesh = _check_parallel(transformer, parallel, group, mesh)
    handle = STAHandle(transformer, spec, tile, windows, parallel, group, mesh, backend)
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
                         f"processors run head mode on its Ulysses group) or sta_dist's own parallel=, not both")
    if parallel != "hybrid":
        if mesh is not None:
            raise ValueError(f"mesh=(P_head, P_tile) applies with parallel='hybrid', got parallel={parallel!r}")
        return None
    if mesh is None:
        world = dist.get_world_size(group)
        p_head = max(d for d in range(1, int(world**0.5) + 1) if world % d == 0)
        return (p_head, world // p_head)
    return tuple(mesh)


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
