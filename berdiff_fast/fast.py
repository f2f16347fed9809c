"""The fast sampling path: a compiled U-Net and, on CUDA, a CUDA-graph-captured sampling step.

Almost all sampling time is the U-Net (DESIGN §2); the rest is what happens between its calls.
On CUDA one whole step (U-Net in bf16 autocast + the fused step kernel writing y_s back into a
static buffer + a device-side step counter) is captured once as a CUDA graph and replayed S - 1
times; timesteps, the Philox offset and the seed are read on the device, so the loop never
synchronises with the host. The last step (y0_hat instead of a draw) is a second graph.
The U-Net is compiled with one pass of ours added to Inductor's (ChannelsLastConcat).

Compiled modules and graphs are cached per (model, rows, image shape, steps, sampler, eta,
dtype, device, backend) and reused across calls. A cached entry is rebuilt when the model's
U-Net, schedule or parameter tensors are no longer the ones it was built from (a replaced
``model.unet``, ``load_state_dict(..., assign=True)``); in-place updates such as an optimiser
step are seen as they are. ``clear_cache()`` drops everything, e.g. to free graph memory.
"""
from __future__ import annotations

import os
import warnings
import weakref
from contextlib import contextmanager, nullcontext

import torch
from torch._inductor import list_mode_options
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

COMPILE_MODE_CUDA = "max-autotune-no-cudagraphs"  # CUDA graphs are ours: one per sampling step
_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_graphs: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
stats = {"compiles": 0, "graph_captures": 0}


def clear_cache() -> None:
    """Forget every compiled U-Net and captured sampling graph."""
    _compiled.clear()
    _graphs.clear()
    torch._dynamo.reset()


def enabled(fast: bool | None) -> bool:
    """``fast=None`` means on, unless the environment sets BERDIFF_FAST to 0, false, off or no."""
    if fast is None:
        return os.environ.get("BERDIFF_FAST", "1").strip().lower() not in ("0", "false", "off", "no")
    return bool(fast)


class ChannelsLastConcat(CustomGraphPass):
    """Inductor post-grad pass: every 4-D concatenation along channels is stored channels_last.

    Inductor lowers a two-input cat on CUDA to a pointwise kernel whose layout it picks later,
    and the GroupNorm reading it reshapes it to (N, groups, -1), which fixed that layout as NCHW
    between NHWC convolutions: each U-Net decoder block wrote its cat NCHW, read it back
    transposed and wrote an NHWC copy for its skip convolution. Requiring the strides at the cat
    keeps the block NHWC (lidc, 16 rows, H200: 8.18 instead of 9.03 ms per forward, measured with
    the same prim inserted in the U-Net's forward; benchmarks/RESULTS.md). The requirement is
    Inductor's own prim, which its freezing pass uses. As a pass of the sampler's compile, the
    model's code stays plain: torch.export and other compilers never see the prim.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        force = torch.ops.prims.inductor_force_stride_order.default
        for node in list(graph.nodes):
            val = node.meta.get("val")
            if node.target is not torch.ops.aten.cat.default or not hasattr(val, "fake_mode") \
                    or val.dim() != 4 or (node.args[1] if len(node.args) > 1 else 0) % 4 != 1 \
                    or not all(isinstance(d, int) for d in val.shape):
                continue
            with val.fake_mode:
                cl_val = val.contiguous(memory_format=torch.channels_last)
            with graph.inserting_after(node):
                cl = graph.call_function(force, (node, cl_val.stride()))
            node.replace_all_uses_with(cl, delete_user_cb=lambda user: user is not cl)
            cl.meta["val"] = cl_val

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))  # Inductor's cache key: changes with this file


def inductor_options(mode: str | None) -> dict:
    """torch.compile options of the sampler's U-Net: Inductor mode ``mode`` (None: default) plus
    the ChannelsLastConcat pass."""
    return {**list_mode_options(mode or "default"), "post_grad_custom_post_pass": ChannelsLastConcat()}


class CompiledUNet:
    """``torch.compile(unet)`` (fullgraph, static shapes), with the eager U-Net for the shapes
    Dynamo refuses.

    Dynamo keeps the compiled versions of a forward on its code object, shared by every model of
    the class in the process, and with fullgraph=True it fails once more shapes than
    ``torch._dynamo.config.recompile_limit`` have been compiled: a service sampling ever new
    batch sizes would crash there. Those shapes run eagerly instead, after one warning.
    """

    def __init__(self, unet: torch.nn.Module, mode: str | None):
        self.unet = unet
        self.compiled = torch.compile(unet, fullgraph=True, dynamic=False, options=inductor_options(mode))
        self.eager_shapes: set[tuple] = set()

    def __call__(self, y_t: torch.Tensor, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dev = image.device.type
        key = (tuple(y_t.shape), tuple(image.shape), image.dtype, torch.is_autocast_enabled(dev),
               torch.get_autocast_dtype(dev))
        if key not in self.eager_shapes:
            try:
                return self.compiled(y_t, image, t)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                self.eager_shapes.add(key)
                warnings.warn(f"berdiff_fast: torch.compile reached its recompile limit "
                              f"(torch._dynamo.config.recompile_limit = {torch._dynamo.config.recompile_limit}); "
                              f"U-Net inputs of shape {tuple(image.shape)} run eagerly. Fewer distinct batch "
                              "sizes (max_batch), a higher limit or berdiff_fast.fast.clear_cache() avoid it.",
                              stacklevel=2)
        return self.unet(y_t, image, t)


def compiled_unet(model, device: torch.device, mode: str | None = None) -> CompiledUNet:
    """The model's U-Net compiled (see CompiledUNet), cached per model, U-Net and mode.

    The mode defaults to max-autotune-no-cudagraphs on CUDA (its autotuning takes minutes on
    the first call) and to Inductor's default on CPU; $BERDIFF_COMPILE_MODE overrides it.
    """
    mode = mode or os.environ.get("BERDIFF_COMPILE_MODE") or (COMPILE_MODE_CUDA if device.type == "cuda" else None)
    per_model = _compiled.setdefault(model, {})
    net = per_model.get(mode)
    if net is None or net.unet is not model.unet:
        if mode and "max-autotune" in mode and device.type == "cuda":
            warnings.warn(
                f"berdiff_fast: the first fast sample() compiles the U-Net with torch.compile mode {mode!r}, "
                "which tunes its kernels for many minutes (lidc on an H200: still tuning after 8 minutes); "
                "Inductor caches the results on disk for later processes. "
                "BERDIFF_COMPILE_MODE=default compiles lidc in about 40 s.", stacklevel=3)
        net = CompiledUNet(model.unet, mode)
        per_model[mode] = net
        stats["compiles"] += 1
    return net


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


class GraphSampler:
    """One chunk of ``n`` rows sampled by replaying captured CUDA graphs (see module docstring)."""

    def __init__(self, net: CompiledUNet, ops, sched, n: int, image_shape, ts: torch.Tensor, sampler: str,
                 eta: float, dtype: torch.dtype, device: torch.device):
        C, H, W = image_shape
        self.net, self.ops, self.sched, self.n = net, ops, sched, n
        # The graphs read the parameters at their capture-time addresses.
        self.tensors = [weakref.ref(p) for p in _state(net.unet)]
        self.sampler, self.eta, self.dtype, self.device = sampler, eta, dtype, device
        self.steps = len(ts)
        self.ts = ts.to(device)
        self.ss = torch.cat([self.ts[1:], self.ts.new_zeros(1)])
        z = lambda *shape, dt=torch.float32: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        self.x = z(n, C, H, W).contiguous(memory_format=torch.channels_last)
        self.y = z(n, 1, H, W)
        self.out = z(n, 1, H, W)
        self.step, self.seed, self.base, self.n_total, self.offset = (z(1, dt=torch.int64) for _ in range(5))

        # Warm up on a side stream (compilation, autotuning, cached tables), then capture. cuDNN
        # times its convolution algorithms for these shapes during the warm-up and the graphs
        # keep the fastest; the global flag is restored after.
        with _cudnn_benchmark():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step.zero_()
                    self._step()
                    self.step.zero_()  # _last reads ts[step], and a one-step loop has no ts[1]
                    self._last()
            torch.cuda.current_stream(device).wait_stream(side)
            self.g_step, self.g_last = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.g_step):
                self._step()
            with torch.cuda.graph(self.g_last):
                self._last()
        stats["graph_captures"] += 1

    def built_for(self, net: CompiledUNet, sched) -> bool:
        """Whether this graph still computes with ``net`` and ``sched`` and their current tensors."""
        state = _state(net.unet)
        return (net is self.net and sched is self.sched and len(state) == len(self.tensors)
                and all(r() is p for r, p in zip(self.tensors, state)))

    def _t(self, table: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, self.step).expand(self.n).contiguous()

    def _logits(self, t):
        with autocast(self.device, self.dtype):
            return self.net(self.y, self.x, t)

    def _step(self):
        t = self._t(self.ts)
        torch.add(self.base, (self.step + 1) * self.n_total, out=self.offset)
        logits = self._logits(t)
        if self.sampler == "ddpm":
            y = self.ops.ddpm_step(logits, self.y, t, self.sched, self.seed, self.offset, False)
        else:
            y = self.ops.ddim_step(logits, self.y, t, self._t(self.ss), self.sched, self.seed, self.offset,
                                   self.eta, False)
        self.y.copy_(y)
        self.step.add_(1)

    def _last(self):
        self.out.copy_(self.ops.predict_y0(self._logits(self._t(self.ts)), self.y))

    def run(self, x: torch.Tensor, seed: int, base: int, n_total: int) -> torch.Tensor:
        """y0_hat (n, 1, H, W) for the rows ``x`` whose draws start at stream offset ``base``."""
        self.x.copy_(x)
        self.seed.fill_(seed)
        self.base.fill_(base)
        self.n_total.fill_(n_total)
        self.step.zero_()
        self.y.copy_(self.ops.init_noise(tuple(self.y.shape), self.seed, self.base, self.device, torch.float32))
        for _ in range(self.steps - 1):
            self.g_step.replay()
        self.g_last.replay()
        return self.out.clone()


@contextmanager
def _cudnn_benchmark():
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _state(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def graph_sampler(model, net, ops, n, image_shape, ts, sampler, eta, dtype, device, backend_name) -> GraphSampler:
    key = (n, tuple(image_shape), tuple(ts.tolist()), sampler, eta, dtype, str(device), backend_name)
    per_model = _graphs.setdefault(model, {})
    g = per_model.get(key)
    if g is None or not g.built_for(net, model.schedule):
        g = GraphSampler(net, ops, model.schedule, n, image_shape, ts, sampler, eta, dtype, device)
        per_model[key] = g
    return g
