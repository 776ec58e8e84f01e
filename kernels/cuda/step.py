"""The whole training step of an MLP on the GPU: twin of ``fastgrad.kernels.cpu.step``.

``forward_backward`` and ``train_step`` take the CPU twins' arguments in the
same order (see that module for the layout of ``sizes, codes, alphas,
offsets, acts, zs, delta``).  Arrays the kernels touch are cupy arrays;
``sizes, codes, alphas, offsets`` are host NumPy arrays (they drive launch
shapes, so reading them never syncs) and ``hp`` is the host array
``fastgrad.optim`` fills (sent by an asynchronous pinned copy) or a device
one.  Every launch goes, in order, on the current stream; nothing waits for
the device: the loss, norm, scale and skip flag come back as 0-d float64
cupy arrays.

Scratch (bias-gradient block sums, loss terms, norm partials, the device
``hp`` and the result scalars) lives in a :class:`Workspace`, allocated once
per batch size; without one, each call takes it from CuPy's stream-ordered
pool (no sync, but not capturable).

CUDA graphs
-----------
:class:`GraphedTrainStep` captures one ``train_step`` with
``stream.begin_capture()`` / ``end_capture()`` on fixed input buffers and
replays it with ``graph.launch()``.  CuPy refuses calls into cuBLAS while a
stream is capturing (cupy/cupy issue 6290, open: its cuBLAS binding raises
NotImplementedError), so by default the graphed step runs its GEMMs through
fastgrad's own kernel (``gemm.cu``, meant for the small widths where a step
is bound by launches), eager calls included, so that a replay gives the
eager call's bits; ``gemm="cublas"`` keeps ``cupy.matmul`` and shows
whether capture fails.  The capture is attempted once and, if anything
raises, the step falls back to plain launches for good
(``fallback_reason`` says why).

To measure on a GPU (``cupyx.profiler.benchmark`` or CUDA events, never a
host timer around a launch):
  * per step: eager launches vs graph replay (when capture succeeds), for
    the bench shapes (mnist 784-256-256-10 at B=128, 8x256 deep, wide 4096);
  * host launch overhead: ``benchmark(..., n_warmup=10).cpu_times`` against
    ``gpu_times`` -- at small widths the step is launch-bound (~5 us/launch,
    ~6 launches per layer + 5 for loss/norm/update);
  * the bias-gradient pass (64 rows per block) and the 1-D bias_act grid
    (``i % cols``) against the memory-bandwidth floor;
  * the hp upload: the host must never block in ``transfer.Uploader.upload``
    (``cupyx.profiler.time_range`` around it) with 16 slots;
  * that a step holds no implicit sync: run under
    ``cupy.cuda.set_pinned_memory_allocator`` defaults with
    ``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM`` unset and check with nsys that
    the host issues step k+1 before step k finishes.
"""
import cupy
import numpy as np

from ..layout import layer_slots
from ..spec import BCE_WITH_LOGITS, CROSS_ENTROPY, LOSS_CODES, MSE
from . import _module as _m
from . import losses as _losses
from . import optim as _optim
from . import reduce as _reduce
from .activations import bias_act, bias_act_grad, grad_partials_shape

__all__ = ["CROSS_ENTROPY", "MSE", "BCE_WITH_LOGITS", "LOSS_CODES", "Workspace",
           "forward_backward", "train_step", "GraphedTrainStep"]

_LOSS_NAMES = {v: k for k, v in LOSS_CODES.items()}


def _host(a, dtype):
    if isinstance(a, cupy.ndarray):
        a = cupy.asnumpy(a)                 # a sync: pass host arrays
    return np.ascontiguousarray(a, dtype=dtype)


class Workspace:
    """Every scratch buffer of one step at batch size ``B`` (device arrays).

    ``optim`` (optional) holds the optimizer's own device buffers (the
    control block ``ctl``, the device step count ``step``, the ``hp`` row,
    ``table``, ``total`` and ``norm_work``: ``fastgrad.optim`` passes them so
    that the step's record
    lands where the optimizer reads it back); without it the workspace has
    its own ``ctl`` and ``hp``.  The step's loss is written into
    ``ctl[CTL_LOSS]`` and a bad label raises ``ctl[CTL_STATUS]``; results
    are 0-d views of ``ctl``, overwritten by the next step (copy them to
    keep them).
    """

    def __init__(self, B, sizes, offsets, loss_kind, dtype, optim=None):
        sizes = _host(sizes, np.int64)
        self.B = int(B)
        dtype = np.dtype(dtype)
        grad_elems = 0
        for w in sizes[1:]:
            shape = grad_partials_shape(B, int(w))
            if shape is not None:
                grad_elems = max(grad_elems, shape[0] * shape[1])
        self.grad_work = cupy.empty(grad_elems, dtype)
        self.loss_work = cupy.empty(
            _losses.work_size(_LOSS_NAMES[int(loss_kind)], (B, int(sizes[-1]))), np.float64)
        # The update's buffers: the optimizer's when given (they depend on
        # the layer offsets only, not on B), else this workspace's own.
        self._optim = dict(optim or {})
        if "norm_work" not in self._optim:
            self._optim["norm_work"] = cupy.empty(_reduce.partial_size(offsets), np.float64)
        for name, size in (("total", 1), ("ctl", _optim.CTL_SIZE), ("hp", _optim.HP_SIZE)):
            if name not in self._optim:
                self._optim[name] = cupy.zeros(size, np.float64)
        self.ctl, self.hp = self._optim["ctl"], self._optim["hp"]
        self.loss = self.ctl[_optim.CTL_LOSS:_optim.CTL_LOSS + 1]
        self.status = self.ctl[_optim.CTL_STATUS:_optim.CTL_STATUS + 1]

    def grad_partials(self, rows, cols):
        shape = grad_partials_shape(rows, cols)
        return None if shape is None else self.grad_work[:shape[0] * shape[1]].reshape(shape)

    def optim_buffers(self):
        return self._optim


def loss_and_grad(loss_kind, h, labels, target, grad, ws):
    """The mean loss of the network output ``h`` into ``ws.loss`` (returned)
    and its gradient into ``grad``: twin of the CPU step's ``loss_and_grad``."""
    if loss_kind == CROSS_ENTROPY:
        _losses.softmax_cross_entropy(h, labels, grad, out=ws.loss, work=ws.loss_work,
                                      status=ws.status)
    elif loss_kind == MSE:
        _losses.mse(h, target, grad, out=ws.loss, work=ws.loss_work)
    elif loss_kind == BCE_WITH_LOGITS:
        _losses.bce_with_logits(h, target, grad, out=ws.loss, work=ws.loss_work)
    else:
        raise ValueError(f"unknown loss code {loss_kind}; known: {LOSS_CODES}")
    return ws.loss


def _views(params, grads, acts, zs, offsets, sizes, B, l, act_off):
    n_in, n_out = int(sizes[l]), int(sizes[l + 1])
    o, ob, _, _, _, _ = layer_slots(int(offsets[l]), n_in, n_out, False, False)
    W = params[o:ob].reshape(n_in, n_out)
    b = params[ob:ob + n_out]
    dW = grads[o:ob].reshape(n_in, n_out)
    db = grads[ob:ob + n_out]
    a = acts[act_off:act_off + B * n_out].reshape(B, n_out)
    z = zs[act_off:act_off + B * n_out].reshape(B, n_out)
    return W, b, dW, db, a, z


def _cublas(a, b, out):
    return cupy.matmul(a, b, out=out)


def forward_backward(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
                     offsets, acts, zs, delta, ws=None, gemm=None):
    """Forward, loss and backward; writes ``grads``; returns the mean loss
    (0-d float64 cupy array).  ``gemm(a, b, out)``: the GEMM to use
    (default cuBLAS through ``cupy.matmul``; ``kernels.cuda.gemm.gemm`` for
    a step captured in a CUDA graph)."""
    mm = _cublas if gemm is None else gemm
    sizes, codes = _host(sizes, np.int64), _host(codes, np.int64)
    alphas, offsets = _host(alphas, np.float64), _host(offsets, np.int64)
    B = x.shape[0]
    L = codes.shape[0]
    if ws is None:
        ws = Workspace(B, sizes, offsets, loss_kind, params.dtype)
    h = x
    act_off = 0
    for l in range(L):
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        if not _m.needs_z(codes[l]):
            z = a
        mm(h, W, z)
        bias_act(z, b, a, int(codes[l]), float(alphas[l]))
        h = a
        act_off += B * int(sizes[l + 1])

    n_out = int(sizes[L])
    half = delta.shape[0] // 2
    da = delta[:B * n_out].reshape(B, n_out)
    loss = loss_and_grad(loss_kind, h, labels, target, da, ws)

    ping = 0
    for l in range(L - 1, -1, -1):
        act_off -= B * int(sizes[l + 1])
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        if not _m.needs_z(codes[l]):
            z = a
        bias_act_grad(da, a, z, da, db, int(codes[l]), float(alphas[l]),
                      ws.grad_partials(B, int(sizes[l + 1])))
        if l > 0:
            h = acts[act_off - B * int(sizes[l]):act_off].reshape(B, int(sizes[l]))
            mm(h.T, da, dW)
            nxt = (1 - ping) * half
            dx = delta[nxt:nxt + B * int(sizes[l])].reshape(B, int(sizes[l]))
            mm(da, W.T, dx)
            da = dx
            ping = 1 - ping
        else:
            mm(x.T, da, dW)
    return ws.loss[0]


def train_step(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
               offsets, acts, zs, delta,
               rule, s0, s1, s2, hp, layer_sq, clip_norm, clip_value, ws=None, gemm=None):
    """forward_backward, then the optimizer's clipped update in place.

    Returns (loss, grad_norm, clip_scale, skipped) as 0-d float64 cupy arrays
    (``skipped`` is 1.0 or 0.0), views of ``ws.ctl``.  Reading them waits for
    the device; ``fastgrad.TrainStep`` copies the whole control block back
    asynchronously instead (``fastgrad.optim``).
    """
    if ws is None:
        ws = Workspace(x.shape[0], sizes, offsets, loss_kind, params.dtype)
    offsets = _host(offsets, np.int64)
    loss = forward_backward(x, labels, target, loss_kind, params, grads, sizes, codes,
                            alphas, offsets, acts, zs, delta, ws=ws, gemm=gemm)
    norm, scale, skipped = _optim.clipped_update(rule, params, grads, s0, s1, s2, hp, offsets,
                                                 layer_sq, clip_norm, clip_value,
                                                 ws=ws.optim_buffers())
    return loss, norm, scale, skipped


class GraphedTrainStep:
    """``train_step`` at one batch size, replayed from a CUDA graph when possible.

    Holds fixed input buffers and a :class:`Workspace`; every pointer the
    step touches is fixed, so the graph stays valid across calls.  The first
    call runs eagerly (it compiles the kernels and initialises cuBLAS, which
    must not happen inside a capture); the second captures; if capture
    raises (cuBLAS under capture, cupy issue 6290) every later call runs
    eagerly on the same buffers.  Per call, ``hp`` is copied into the
    workspace's device ``hp`` before the replay, so each replay sees its own
    learning rate and bias corrections; ``clip_norm`` and ``clip_value``
    are frozen into the graph (build a new object to change them).

    Parameters: those of :func:`train_step` without ``x, labels, target, hp``,
    plus ``batch`` (B), ``use_graph``, ``gemm``: ``"fastgrad"`` (default,
    capturable) or ``"cublas"`` (``cupy.matmul``), and ``optim``: an
    optimizer's device buffers (``fastgrad.optim``: control block, step
    count, hp table), with which each call's ``hp`` is that optimizer's
    fixed-size table of rows and the step count stays on the device.
    """

    def __init__(self, loss_kind, params, grads, sizes, codes, alphas, offsets, acts, zs, delta,
                 rule, s0, s1, s2, layer_sq, clip_norm, clip_value, batch, use_graph=True,
                 gemm="fastgrad", optim=None):
        if gemm not in ("fastgrad", "cublas"):
            raise ValueError(f"gemm must be 'fastgrad' or 'cublas', got {gemm!r}")
        from .gemm import gemm as own_gemm
        self._gemm = own_gemm if gemm == "fastgrad" else None
        self.sizes = _host(sizes, np.int64)
        self.codes = _host(codes, np.int64)
        self.alphas = _host(alphas, np.float64)
        self.offsets = _host(offsets, np.int64)
        self.loss_kind = int(loss_kind)
        self.B = int(batch)
        dt = params.dtype
        self.x = cupy.empty((self.B, int(self.sizes[0])), dt)
        if self.loss_kind == CROSS_ENTROPY:
            self.labels = cupy.zeros(self.B, np.int64)
            self.target = cupy.empty((0, 0), dt)
        else:
            self.labels = cupy.zeros(0, np.int64)
            self.target = cupy.empty((self.B, int(self.sizes[-1])), dt)
        self.ws = self._workspace(dt, optim)
        # Where each call's hp goes: the row buffer, or the optimizer's table.
        self._hp = self.ws.hp if optim is None else optim["table"].reshape(-1, _optim.HP_SIZE)
        self._bufs = (params, grads, acts, zs, delta, rule, s0, s1, s2, layer_sq,
                      float(clip_norm), float(clip_value))
        self.use_graph = bool(use_graph)
        self.graph = None
        self.fallback_reason = None if use_graph else "use_graph=False"
        self._calls = 0

    def _workspace(self, dtype, optim):
        return Workspace(self.B, self.sizes, self.offsets, self.loss_kind, dtype, optim=optim)

    def _launch(self):
        (params, grads, acts, zs, delta, rule, s0, s1, s2, layer_sq,
         clip_norm, clip_value) = self._bufs
        return train_step(self.x, self.labels, self.target, self.loss_kind, params, grads,
                          self.sizes, self.codes, self.alphas, self.offsets, acts, zs, delta,
                          rule, s0, s1, s2, self._hp, layer_sq, clip_norm, clip_value,
                          ws=self.ws, gemm=self._gemm)

    def _capture(self):
        stream = cupy.cuda.Stream(non_blocking=True)
        # The eager first call ran on the caller's stream; capture must not
        # record work that depends on it still running.
        cupy.cuda.get_current_stream().synchronize()
        with stream:
            stream.begin_capture()
            try:
                self._launch()
            except Exception as exc:           # cuBLAS refused (cupy#6290), or other
                try:
                    stream.end_capture()
                except Exception:
                    pass
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                return None
            try:
                return stream.end_capture()
            except Exception as exc:
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                return None

    def __call__(self, x, labels, target, hp):
        """One step on device arrays ``x`` and ``labels`` or ``target``;
        returns (loss, norm, scale, skipped), 0-d float64 cupy arrays that
        the next call does not overwrite."""
        if x.shape[0] != self.B:
            raise ValueError(f"this step was built for batch {self.B}, got {x.shape[0]}")
        self.x[...] = x
        if self.loss_kind == CROSS_ENTROPY:
            self.labels[...] = labels
        else:
            self.target[...] = target
        _optim.upload_hp(hp, self._hp)
        self._calls += 1
        if self.use_graph and self.graph is None and self.fallback_reason is None \
                and self._calls >= 2:
            self.graph = self._capture()
        if self.graph is not None:
            self.graph.launch(cupy.cuda.get_current_stream())
        else:
            self._launch()
        out = self.ws.ctl.copy()               # stream-ordered, survives the next replay
        return (out[_optim.CTL_LOSS], out[_optim.CTL_NORM], out[_optim.CTL_SCALE],
                out[_optim.CTL_SKIP])
