"""One backend object per device (thinc's ``Ops`` pattern), chosen once.

A model, its optimizers and its TrainSteps hold the backend of the device
the model was built on (``model.backend``, :func:`backend_for`) and ask it
for everything that differs between devices: the array module (``xp``),
the kernel modules (``kernels_for``, ``model_kernels``, ``step_kernels``,
``epilogue_kernels``), scratch space (``step_workspace``), staging of host
inputs (``needs_staging``, ``upload``), read-back (``loss_result`` and the
optimizer's ``update_records``: a value on the CPU, a pending result on
CUDA that waits only when read) and the device's update entry points
(``update_pairs``).  Small predicates say which paths the device has
(``fuses_epilogue``, ``shards_threads``, ``graphs_steps``,
``compiled_epochs``, ``skip_known_on_host``).  Callers never test the
device string; ``name`` ("cpu" | "cuda") is for messages and
``model.device`` / ``opt.device``.

There is one instance per device: ``backend_for("cuda") is
backend_for("cuda")``.  Building the CUDA backend imports nothing; CuPy is
imported when it is first used.
"""
from collections import deque
import functools
import sys
import threading

import numpy as np

from . import _compile_worker
from . import blas as _blas
from . import device as _device
from . import registry as _registry
from . import threads as _threads
from .errors import NonFiniteGradientError
from .kernels.spec import FIRST_CUSTOM_CODE, HP_END, HP_SIZE, HP_UPDATE

__all__ = ["Backend", "CpuBackend", "CudaBackend", "backend_for", "backend_of"]


class Backend:
    """What every device provides; see the module docstring."""

    name = None
    #: the model's epilogue pieces (dropout, residual, norm, weight norm) run
    #: inside the fused compiled step (else TrainStep composes the layer path)
    fuses_epilogue = False
    #: TrainStep(threads=n) can shard the fused step over one thread pool
    shards_threads = False
    #: TrainStep(cuda_graph=True) can replay steps from a captured graph
    graphs_steps = False
    #: run_epoch can run whole chunks of steps in one compiled call
    compiled_epochs = False
    #: plain models and models with epilogue pieces run ONE step driver
    #: reading a step plan (``kernels/layout.py`` ``step_plan``)
    steps_by_plan = False
    #: a step's skip decision is a host value when its kernel returns (so
    #: the host may undo what the forward changed); else it stays on the device
    skip_known_on_host = True
    #: a fused step writes its loss into the optimizer's update record
    loss_in_record = False
    #: the device's labels are range-checked by the loss kernel (a bad one
    #: skips the update and raises at read-back) instead of on the host
    labels_checked_by_kernel = False
    #: a step may copy host inputs to the device (``needs_staging``); where
    #: False the step does not ask, per input (a call less each)
    stages_inputs = False

    def __repr__(self):
        return f"<fastgrad {self.name} backend>"

    # -- arrays ------------------------------------------------------------------
    @property
    def xp(self):
        """The array module: numpy or cupy."""
        raise NotImplementedError

    def holds(self, array, name="X"):
        """True when ``array`` lives in this device's memory (a device
        array to use in place), False for a host array; TypeError naming
        ``name`` for an array of another device."""
        raise NotImplementedError

    def needs_staging(self, array):
        """True when ``array`` is a host array a step must copy to the device."""
        return False

    def is_array(self, array):
        """True for this device's own array type (a NumPy array on the CPU)."""
        raise NotImplementedError

    def writeable(self, array):
        """False for a read-only array of this device."""
        return True

    def upload(self, host, dst):
        """Queue the copy of the host array ``host`` into ``dst``; returns ``dst``."""
        dst[...] = host
        return dst

    def loss_result(self, loss):
        """What a step returns for its loss: a float, or on CUDA a 0-d
        float64 device array (reading it waits for the step)."""
        raise NotImplementedError

    def to_device(self, array, dtype=None):
        """A C-contiguous array of this device holding ``array`` (a host or
        device array, a list or a scalar), converted to ``dtype`` if given;
        ``array`` itself when it is one already.  On CUDA a host array is
        copied synchronously."""
        raise NotImplementedError

    def to_host(self, array):
        """A NumPy array holding ``array`` (a host or device array); on
        CUDA this waits for the device."""
        raise NotImplementedError

    def address(self, array):
        """The address of ``array``'s first element (host or device)."""
        raise NotImplementedError

    def memory_span(self, array):
        """``(lo, hi)``: the bytes ``array``'s elements lie in, ``[lo, hi)``."""
        lo = hi = self.address(array)
        for n, stride in zip(array.shape, array.strides):
            if n == 0:
                return lo, lo
            if stride < 0:
                lo += stride * (n - 1)
            else:
                hi += stride * (n - 1)
        return lo, hi + array.itemsize

    def shares_memory(self, a, b):
        """Whether arrays ``a`` and ``b`` may have an element in common:
        their byte spans overlap (a device that can tell two interleaved
        views apart says so exactly)."""
        (alo, ahi), (blo, bhi) = self.memory_span(a), self.memory_span(b)
        return alo < bhi and blo < ahi

    def alloc(self, shape, dtype, fill=None):
        """A new C-contiguous array of this device: uninitialised, or every
        element ``fill`` (a scalar)."""
        if fill is not None and np.ndim(fill) != 0:
            raise TypeError(f"alloc: fill must be a scalar, got {type(fill).__name__}")
        xp = self.xp
        if fill is None:
            return xp.empty(shape, dtype)
        return xp.full(shape, fill, dtype)

    def add_into(self, dst, src):
        """``dst += src`` in place (arrays of this device, one shape and dtype)."""
        raise NotImplementedError

    def gather_rows(self, src, idx, out):
        """``out[r] = src[idx[r]]`` (numpy.take along axis 0 into ``out``);
        ``idx`` a host int64 array of indices in ``[0, len(src))``, or on
        CUDA one already uploaded; returns ``out``."""
        raise NotImplementedError

    def gatherable(self, array, dtype):
        """``array`` (this device's) as a source ``gather_rows`` takes: a
        dataset's labels or targets converted once, if at all (integer or
        bool labels to int64, other floats to ``dtype``, the model's)."""
        return array

    # -- kernels -----------------------------------------------------------------
    @property
    def kernels(self):
        """The device's kernel package (fastgrad.kernels.cpu / .cuda)."""
        return _device.kernels(self.name)

    def check_activations(self, codes):
        """Raise ValueError when activation ``codes`` cannot run here."""
        self.kernels_for(codes)

    def kernels_for(self, codes):
        """The kernel package that serves activation ``codes``."""
        if _registry.uses_registered(codes):
            for c in codes:
                if int(c) >= FIRST_CUSTOM_CODE and _registry.by_code(int(c)) is None:
                    raise ValueError(f"unknown activation code {int(c)} (not registered)")
            return self._registered_kernels(codes)
        return self.kernels

    def model_kernels(self, codes, rules=None, losses=None, features=None, team=False):
        """The kernel package a model with activation ``codes`` runs on
        (``rules``/``losses``: the update-rule and loss codes it needs, None
        for all; ``features``: the layer features, None for all; ``team``:
        with the host thread team's branches, :meth:`step_team`)."""
        return self.kernels_for(codes)

    def step_kernels(self, codes, rules=None, losses=None, features=None, team=False):
        """``(step, step_sharded)`` kernel modules of a model with
        activation ``codes`` and layer ``features``: ``step`` the one driver
        of plain models and models with epilogue pieces, ``step_sharded``
        the batch-sharded step of ``threads=`` (None where the device has
        none); ``team``: a driver that can run passes on the host thread
        team (:meth:`step_team`)."""
        raise NotImplementedError

    def step_team(self):
        """Whether a step driver should have the host thread team's
        branches now (CPU: ``fastgrad.threads.team_threads``); False where
        the device has no such team."""
        return False

    def update_kernels(self, rule=None):
        """The optimizer kernel module of update rule ``rule`` (None: all)."""
        return self.kernels.optim

    def epilogue_kernels(self, codes=()):
        """The ``(blocks, norm, wnorm)`` kernel modules (twins)."""
        raise NotImplementedError

    def step_workspace(self, B, sizes, offsets, loss_kind, dtype, records, plan=None):
        """The scratch space of a step driver's call at batch size ``B``
        (None when the device's driver needs none); ``plan``: the step
        plan's ``(plan, fplan)`` of that batch size (``kernels/layout.py``);
        ``loss_kind`` and ``records`` (the optimizer's read-back) may be
        None for the layer path's forward and backward."""
        return None

    def fill_pass_team(self, plan, kernels, dtype, update=True, team=True, defer=False,
                       shards=False):
        """Write the host thread team of the driver's passes into a step
        ``plan`` (``kernels/layout.py`` ``PLAN_POOL_*``) for the step module
        ``kernels``, the optimizer's update among them unless ``update`` is
        false; with ``team`` false, the members alone (every pass on the
        calling thread); with ``shards``, the sharded step's shard member
        too (the shards' header).  Devices without one leave the plan as
        it is.

        With ``defer``, the members may be left to worker processes that
        compile them (``fastgrad._compile_worker``): then the returned
        object must ``fill(plan)`` before the driver runs (the driver
        refuses a plan without them); None when the plan is complete."""

    # -- the optimizer ------------------------------------------------------------
    def update_records(self, opt, n_entries):
        """The read-back of ``opt``'s updates (see :class:`HostRecords`)."""
        raise NotImplementedError

    def parallel_update(self, rule=None):
        """The parallel twin of the update kernel; ValueError where there is none."""
        raise ValueError(f"parallel applies to the CPU kernels; {self.name} runs its own")

    def team_update(self, rule, dtype):
        """The update kernel of ``rule`` on the host thread team (the
        step's, ``kernels/cpu/pass_team.py``), or None where there is none."""
        return None

    def optimizer_built(self):
        """Called when an optimizer of this device is built."""

    def wants_parallel_update(self, n_params):
        """Whether an update of ``n_params`` left to choose runs in parallel."""
        return False

    def bind_pairs(self, pairs, offsets):
        """What ``update_pairs`` needs to update ``(param, grad)`` pairs in
        place (their addresses), or None when they must be copied through
        the flat buffers."""
        raise NotImplementedError

    def check_pair(self, i, p, g):
        """Raise when pair ``i`` cannot be updated on this device."""

    def update_pairs(self, opt):
        """One clipped update of ``opt``'s pairs in place:
        ``(norm, scale, skipped)`` for ``opt._commit``."""
        raise NotImplementedError

    def pairs_parallel(self, opt):
        """Whether ``update_pairs`` runs ``opt``'s update on several threads."""
        return False

    def undo_skipped_forward(self, model, snap, skipped, records):
        """After an update that was (``skipped``: a bool, or a callable
        giving it) skipped, undo what the forward changed besides the
        parameters (``model._step_snapshot()`` in ``snap``)."""
        raise NotImplementedError


def _pair_state_addresses(opt, buffers, address):
    """(3, n_pairs) int64: where each pair's slice of the flat state
    buffers ``s0, s1, s2`` starts (``address(buffer)`` its data pointer);
    0 for a buffer the rule does not keep."""
    itemsize = np.dtype(opt._params.dtype).itemsize
    s_addr = np.zeros((len(buffers), len(opt._pairs)), np.int64)
    for j, s in enumerate(buffers):
        if s.size:
            s_addr[j] = address(s) + opt._offsets[:-1] * itemsize
    return s_addr


def _pair_state(opt, s0, s1, s2, address, to_device=lambda a: a):
    """The pairs' state addresses, computed again only when the optimizer's
    buffers changed (a hyper-parameter that needs new ones)."""
    cached = opt._multi_state
    if cached is None or cached[0] is not s0 or cached[1] is not s1 or cached[2] is not s2:
        cached = opt._multi_state = (s0, s1, s2, to_device(
            _pair_state_addresses(opt, (s0, s1, s2), address)))
    return cached[3]


def _fill_team(plan, threads, start, blas, split_update):
    """A step plan's team (kernels/layout.py ``PLAN_POOL_*``): the members
    are kernels/cpu/pass_team.py's ``fill_members``."""
    from .kernels import layout as k
    plan[k.PLAN_POOL_THREADS], plan[k.PLAN_POOL_START] = threads, start
    plan[k.PLAN_POOL_BLAS], plan[k.PLAN_POOL_SPLIT_UPDATE] = blas, bool(split_update)
    # MKL's GEMMs run on the team's GNU OpenMP pool and take no mode from the
    # caller: the step gives the pool its FTZ/DAZ for its span
    plan[k.PLAN_POOL_GEMM_MODE] = int(threads > 1 and blas == 0 and
                                      _blas.mkl_handle() is not None)


class CpuBackend(Backend):
    """NumPy arrays and the Numba kernels of ``fastgrad.kernels.cpu``."""

    name = "cpu"
    fuses_epilogue = True
    shards_threads = True
    compiled_epochs = True
    steps_by_plan = True

    def shares_memory(self, a, b):
        # exactly: two interleaved views of one buffer share no element
        return super().shares_memory(a, b) and bool(np.shares_memory(a, b))

    @property
    def xp(self):
        return np

    def holds(self, array, name="X"):
        if _device.device_of(array) != "cpu":
            raise TypeError(f"{name} is a CUDA array but the model is on cpu")
        return False

    def is_array(self, array):
        return isinstance(array, np.ndarray)

    def writeable(self, array):
        return bool(array.flags.writeable)

    def loss_result(self, loss):
        return float(loss)

    def to_device(self, array, dtype=None):
        if _device.device_of(array) == "cuda":
            raise TypeError("to_device: a CUDA array given to the cpu backend "
                            "(use backend_for('cuda').to_host)")
        return np.ascontiguousarray(array, dtype=dtype)

    def to_host(self, array):
        if _device.device_of(array) == "cuda":
            raise TypeError("to_host: a CUDA array given to the cpu backend")
        return np.asarray(array)

    def address(self, array):
        return array.ctypes.data

    def add_into(self, dst, src):
        np.add(dst, src, out=dst)
        return dst

    def gather_rows(self, src, idx, out):
        return np.take(src, idx, axis=0, out=out)

    def _registered_kernels(self, codes):
        # with the team's branches, as the package itself (the host fills
        # every plan of such a driver with the team's members)
        return _registry.cpu_kernels(team=True)

    def check_activations(self, codes):
        pass                    # any registered activation runs on the CPU

    def model_kernels(self, codes, rules=None, losses=None, features=None, team=False):
        # a copy of the package compiled for these activations, rules,
        # losses and layer features alone: a cold first step compiles only
        # what the model uses
        pkg = self.kernels_for(codes)       # unknown registered codes raise
        if _device.kernel_copies() == "shared":
            # one package for every model of the process (test suites, sweeps)
            return _registry.full_cpu_kernels() if pkg is self.kernels else pkg
        return _registry.cpu_kernels(codes, rules=rules, losses=losses, features=features,
                                     team=team)

    def step_kernels(self, codes, rules=None, losses=None, features=None, team=False):
        # one driver for plain models and models with epilogue pieces (kernels/cpu/step.py)
        pkg = self.model_kernels(codes, rules=rules, losses=losses, features=features, team=team)
        return pkg.step, pkg.step_sharded

    def step_team(self):
        # the team's branches run only where fill_pass_team gives the plan a team
        return _threads.team_threads() > 0

    def update_kernels(self, rule=None):
        # a copy compiled for this rule alone (no activation, no loss)
        if _device.kernel_copies() == "shared":
            return _registry.full_cpu_kernels().optim
        return _registry.cpu_kernels((), rules=None if rule is None else (rule,),
                                     losses=()).optim

    def epilogue_kernels(self, codes=()):
        if not len(codes):                  # no activation involved (weight norm alone)
            from .kernels.cpu import blocks, norm, wnorm
            return blocks, norm, wnorm
        pkg = self.model_kernels(codes)
        return pkg.blocks, pkg.norm, pkg.wnorm

    def update_records(self, opt, n_entries):
        return HostRecords(opt)

    def parallel_update(self, rule=None):
        return self.update_kernels(rule).clipped_update_parallel

    def team_update(self, rule, dtype):
        # a plan of the pool's threads and the update's two members (those
        # alone are compiled: the rule's copy of the kernels has no activation)
        from .kernels import layout
        threads, start, blas = _threads.pass_team()
        if not threads:
            return None
        team_kernels = sys.modules[self.update_kernels(rule).__package__].pass_team
        plan = np.zeros(layout.PLAN_HEADER, np.int64)
        team_kernels.fill_members(plan, dtype, ("norm", "update"))
        _fill_team(plan, threads, start, blas, split_update=True)
        return functools.partial(team_kernels.clipped_update_on_team, plan)

    def optimizer_built(self):
        _threads.share_blas_pool_if_asked()
        _blas.set_blas_if_asked()

    def fill_pass_team(self, plan, kernels, dtype, update=True, team=True, defer=False,
                       shards=False):
        # OpenBLAS's own workers, or the shared pool's threads: one pool
        # either way.  A driver with the team's branches runs its activation,
        # loss and update passes through the members even without a team:
        # always given.
        jobs = (("members",) if kernels.TEAM else ()) + (("shard",) if shards else ())
        pending = []
        for job in jobs:
            worker = _compile_worker.start(kernels, dtype, job) if defer else None
            if worker is None:
                _compile_worker.fill(plan, kernels, dtype, job)
            pending.append(worker)
        if kernels.TEAM:
            if team:
                threads, start, blas = _threads.pass_team()
            elif shards:
                # the shards' team (each shard's own plan has none)
                threads, start, blas = _threads.shard_team()
            else:
                threads, start, blas = 0, 0, 0
            _fill_team(plan, threads, start, blas, split_update=update)
        return _compile_worker.together(pending)

    def wants_parallel_update(self, n_params):
        # on the step's team (one pool), never on a second one: that slowed the loop
        return n_params >= _threads.PARALLEL_UPDATE_MIN_PARAMS and _threads.team_threads() > 0

    def bind_pairs(self, pairs, offsets):
        # Contiguous pairs are updated where they are (kernels.cpu.multi_tensor),
        # their addresses taken once: the pairs are held by the optimizer, so
        # NumPy cannot move their data (resize refuses arrays with other references).
        if not all(p.flags.c_contiguous and p.flags.aligned and g.flags.c_contiguous
                   and g.flags.aligned for p, g in pairs):
            return None
        from .kernels.cpu import multi_tensor as mt
        return (mt.addresses([p for p, _ in pairs]), mt.addresses([g for _, g in pairs]),
                np.diff(offsets), np.zeros(len(pairs), np.int64))

    def check_pair(self, i, p, g):
        if not p.flags.writeable:
            raise ValueError(f"pair {i}: param is read-only")

    def pairs_parallel(self, opt):
        # Numba's parfor kernel when asked for, or chosen on the shared pool
        # (OpenMP's threads are the BLAS's there); never by default on
        # OpenBLAS's own workers, whose spinning it would fight
        asked = opt._parallel_asked
        if asked is not None:
            return asked
        return (_threads.blas_pool_shared()
                and opt._chosen_update() is not opt._serial_update)

    def update_pairs(self, opt):
        from .kernels.cpu import multi_tensor as mt
        rule, s0, s1, s2, hp = opt._kernel_args()
        p_addr, g_addr, sizes, rows = opt._multi
        s_addr = _pair_state(opt, s0, s1, s2, mt.address)
        if hp.ndim == 2:
            # parameter groups: one row per segment of the flat layout, and a
            # group holds whole pairs, so each pair lies in one segment
            rows = np.searchsorted(hp[:, HP_END], opt._offsets[:-1], side="right")
        else:
            hp = hp.reshape(1, -1)
        update = (mt.multi_clipped_update_parallel if self.pairs_parallel(opt)
                  else mt.multi_clipped_update)
        return update(rule, opt._empty, p_addr, g_addr, s_addr, sizes, hp, rows,
                      opt._layer_sq, opt._clip_norm, opt._clip_value)

    def undo_skipped_forward(self, model, snap, skipped, records):
        if skipped() if callable(skipped) else skipped:
            model._restore_snapshot(snap)


class CudaBackend(Backend):
    """CuPy arrays and the kernels of ``fastgrad.kernels.cuda``: a step
    queues its launches and nothing waits for the device until a result
    is read."""

    name = "cuda"
    fuses_epilogue = True
    graphs_steps = True
    steps_by_plan = True
    skip_known_on_host = False
    loss_in_record = True
    labels_checked_by_kernel = True
    stages_inputs = True

    @property
    def xp(self):
        import cupy
        return cupy

    def holds(self, array, name="X"):
        return _device.device_of(array) == "cuda"

    def needs_staging(self, array):
        return _device.device_of(array) != "cuda"

    def is_array(self, array):
        return _device.device_of(array) == "cuda"

    def upload(self, host, dst):
        # an asynchronous copy through pinned memory: cupy.asarray would wait
        from .kernels.cuda.transfer import uploader
        return uploader().upload(host, dst)

    def loss_result(self, loss):
        return self.xp.array(loss, dtype=np.float64)

    def to_device(self, array, dtype=None):
        return self.xp.ascontiguousarray(self.xp.asarray(array, dtype=dtype))

    def to_host(self, array):
        if _device.device_of(array) == "cuda":
            return self.xp.asnumpy(array)
        return np.asarray(array)

    def address(self, array):
        return array.data.ptr

    def add_into(self, dst, src):
        from .kernels.cuda import arrays
        return arrays.add_into(dst, src)

    def gather_rows(self, src, idx, out):
        from .kernels.cuda import arrays
        if not self.is_array(idx):
            idx = self.to_device(idx, np.int64)     # a synchronous copy: upload it yourself
        return arrays.gather_rows(src, idx, out)

    def gatherable(self, array, dtype):
        from .kernels.cuda import arrays
        if np.dtype(array.dtype) not in arrays.DTYPES:
            array = array.astype(np.int64 if array.dtype.kind in "biu" else dtype)
        return array if array.flags.c_contiguous else array.copy()

    def _registered_kernels(self, codes):
        missing = sorted({_registry.by_code(int(c)).name for c in codes
                          if int(c) >= FIRST_CUSTOM_CODE
                          and _registry.by_code(int(c)).cuda is None})
        if missing:
            raise ValueError(f"registered activation(s) {missing} cannot run on CUDA: "
                             "registered without CUDA forms (register_activation(..., "
                             "cuda=(forward_expr, derivative_expr)))")
        from .kernels.cuda import _module
        _module.set_registered_activations(_registry.cuda_table())
        return self.kernels

    def step_kernels(self, codes, rules=None, losses=None, features=None, team=False):
        # One Python driver issuing the step's launches on the current
        # stream (no host sync inside), for plain models and models with
        # epilogue pieces, as on the CPU; threads= has no CUDA step.
        self.kernels_for(codes)
        from .kernels.cuda import step
        return step, None

    def epilogue_kernels(self, codes=()):
        self.kernels_for(codes)             # refuses registered activations without CUDA forms
        from .kernels.cuda import blocks, norm, wnorm
        return blocks, norm, wnorm

    def step_workspace(self, B, sizes, offsets, loss_kind, dtype, records, plan=None):
        from .kernels.cuda import step
        plan, fplan = plan if plan is not None else (None, None)
        return step.Workspace(B, sizes, offsets, loss_kind, dtype,
                              optim=None if records is None else records.buffers,
                              plan=plan, fplan=fplan)

    def update_records(self, opt, n_entries):
        # at most one segment per parameter, whatever the groups
        return DeviceRecords(opt, n_entries)

    def check_pair(self, i, p, g):
        # CuPy has no read-only arrays; the CUDA kernel takes data
        # addresses, so the arrays must be contiguous
        if not (p.flags.c_contiguous and g.flags.c_contiguous):
            raise ValueError(f"pair {i}: CuPy param and grad must be C-contiguous")

    def bind_pairs(self, pairs, offsets):
        # The device address arrays of the pairs, uploaded once: the pairs
        # are held by the optimizer, so their memory stays where it is.
        import cupy
        from .kernels.cuda import multi_tensor as kmt
        dt = pairs[0][0].dtype
        sizes = np.diff(offsets)
        return (cupy.asarray(kmt.addresses([p for p, _ in pairs], dt)),
                cupy.asarray(kmt.addresses([g for _, g in pairs], dt)),
                sizes, cupy.asarray(sizes), {})

    def update_pairs(self, opt):
        """The CUDA multi-tensor update on the user's arrays and per-pair
        slices of the flat state buffers, with the table of hp rows and the
        read-back of :class:`DeviceRecords`; nothing waits for the device."""
        import cupy
        from .kernels.cuda import multi_tensor as kmt
        rule, s0, s1, s2, table = opt._kernel_args()
        p_addr, g_addr, sizes, dev_sizes, rows_of = opt._multi
        s_addr = _pair_state(opt, s0, s1, s2, lambda s: s.data.ptr, cupy.asarray)
        # parameter groups hold whole pairs: each pair lies in one segment
        seg_ends = None if opt._seg_group is None else opt._seg_ends
        if rows_of.get("ends", False) is not seg_ends:
            rows = (np.zeros(sizes.size, np.int64) if seg_ends is None else
                    np.searchsorted(seg_ends, opt._offsets[:-1], side="right").astype(np.int64))
            rows_of["ends"], rows_of["rows"] = seg_ends, cupy.asarray(rows)
        return kmt.multi_clipped_update(
            rule, opt._params.dtype, p_addr, g_addr, s_addr, sizes, table, rows_of["rows"],
            opt._layer_sq, opt._clip_norm, opt._clip_value, ws=opt._records.buffers,
            dev_sizes=dev_sizes)

    def undo_skipped_forward(self, model, snap, skipped, records):
        # The layer path (TrainStep with loss options): the skip decision is
        # in device memory, the running statistics are restored by a
        # device-side select on it (no host wait); the dropout counter lives
        # on the host there and keeps its advance.  (The fused step settles
        # both on the device: kernels/cuda/step.py, commit.)
        _, mean, var = snap
        if mean is None:
            return
        from .kernels.cuda import arrays
        skip = records.skip_flag()
        arrays.copy_if(model._running_mean, mean, skip)
        arrays.copy_if(model._running_var, var, skip)


# -- read-back of an optimizer's updates --------------------------------------------

class HostRecords:
    """The read-back of a CPU optimizer: every update's values are on the
    host when its kernel returns, so ``commit`` books them at once."""

    buffers = None

    def __init__(self, opt):
        from .optim import StepStats            # (fastgrad.optim imports this module)
        self._opt, self._stats = opt, StepStats
        self.layer_sq = np.zeros(opt._offsets.size - 1, np.float64)
        self._layer_sq_view = memoryview(self.layer_sq)

    update_kwargs = property(lambda self: {})

    def check_segments(self, n_seg):
        pass

    def set_layout(self, hp_shape, lr_segment):
        pass

    def set_step(self, k):
        pass

    def settle(self):
        pass

    def hp_rows(self):
        """The ``hp`` of the next update ``k = step_count``."""
        opt = self._opt
        if opt._seg_group is None:          # one group: its row (_fill_update, a call less)
            opt._lr_now = opt._fill_row(opt._hp, opt._step_count)
        else:
            opt._lr_now = opt._fill_update(opt._hp, opt._step_count)
        return opt._hp

    def commit(self, norm, scale, skipped, layer_sq, with_loss=False):
        opt = self._opt
        skipped = bool(skipped)
        norm, scale = float(norm), float(scale)
        if skipped:
            opt._n_skipped += 1
        else:
            opt._step_count += 1
        # the squares' bytes, rooted when read: a cached view's copy is the
        # cheapest call just after the kernel (bench/RESULTS.md, "Python just after the kernel")
        view = self._layer_sq_view if layer_sq is self.layer_sq else memoryview(layer_sq)
        stats = self._stats._of(int(opt._step_count), float(opt._lr_now), norm, scale,
                                (not skipped) and scale < 1.0, skipped, view.tobytes())
        opt.last_stats = stats
        if skipped and not opt.skip_nonfinite:
            raise NonFiniteGradientError(
                f"non-finite gradient norm {norm} at update {opt._step_count}; "
                "parameters and optimizer state were left unchanged")
        return stats


class DeviceRecords:
    """A CUDA optimizer's device-side book-keeping (see ``fastgrad.optim``).

    ``record`` is one device buffer: the control block (``CTL_*``) followed
    by the squared layer norms, so that one asynchronous copy brings an
    update's StepStats back.  ``queue`` lists the updates in flight, oldest
    first: ``(slot, stats, call, with_loss)``.  The device keeps the step
    count; ``hp_rows`` gives a table of ``hp`` rows for every count it can
    be at, and pending StepStats fill themselves from here when read.
    """

    DEPTH = 16              # updates in flight before the host waits

    def __init__(self, opt, max_segments=1):
        import cupy
        from .kernels.cuda import optim as kopt
        from .kernels.cuda import reduce as kreduce
        from .kernels.cuda import transfer
        from .optim import StepStats            # (fastgrad.optim imports this module)
        offsets = opt._offsets
        self._opt, self._stats = opt, StepStats
        self.k = kopt
        self.record = cupy.zeros(kopt.CTL_SIZE + offsets.size - 1, np.float64)
        self.buffers = {"ctl": self.record[:kopt.CTL_SIZE],
                        "step": cupy.zeros(1, np.float64),
                        # room for one hp block per segment (parameter groups)
                        "hp": cupy.zeros(max_segments * HP_SIZE, np.float64),
                        "table": cupy.zeros((self.DEPTH + 1) * max_segments * HP_SIZE,
                                            np.float64),
                        # the segment whose lr the record reports (group 0's);
                        # a host array, updated in place when groups change
                        "lr_segment": np.zeros(1, np.int64),
                        "total": cupy.zeros(1, np.float64),
                        "norm_work": cupy.zeros(kreduce.partial_size(offsets), np.float64)}
        self.layer_sq = self.record[kopt.CTL_SIZE:]
        self.table = np.zeros((self.DEPTH + 1, HP_SIZE), np.float64)
        self.reader = transfer.RecordReader(self.record.size, self.DEPTH)
        self.queue = deque()

    update_kwargs = property(lambda self: {"ws": self.buffers})

    def skip_flag(self):
        """The last update's skip decision (no wait): a one-element float64
        device view, nonzero when the update was skipped."""
        return self.buffers["ctl"][self.k.CTL_SKIP:self.k.CTL_SKIP + 1]

    def check_segments(self, n_seg):
        if n_seg * HP_SIZE > self.buffers["hp"].size:
            raise ValueError(f"parameter groups: {n_seg} segments do not fit this CUDA "
                             "optimizer (one per parameter at most)")

    def set_layout(self, hp_shape, lr_segment):
        # a table row per update count the device may be at, holding one hp
        # block per segment with several groups
        self.table = np.zeros((self.DEPTH + 1,) + tuple(hp_shape), np.float64)
        self.buffers["lr_segment"][0] = lr_segment

    def set_step(self, k):
        self.buffers["step"].fill(float(k))

    def settle(self):
        """Read back every update in flight (waits for the device)."""
        while self.queue:
            self._read_oldest()

    def _poll(self):
        """Read back the updates that have finished, without waiting; wait
        for the oldest only when the ring of records is full."""
        while self.queue and self.reader.ready(self.queue[0][0]):
            self._read_oldest()
        if self.reader.full:
            self._read_oldest()

    def hp_rows(self):
        opt = self._opt
        self._poll()
        table = self.table
        used = len(self.queue) + 1
        for r in range(used):
            opt._fill_update(table[r], opt._step_count + r)
        table[used:] = 0.0
        table[used:, ..., HP_UPDATE] = -1.0       # no update index: never chosen
        return table

    def commit(self, norm, scale, skipped, layer_sq, with_loss=False):
        """Queue the copy of the update's record; the StepStats returned
        fill themselves from it (``with_loss``: the record holds the step's loss)."""
        opt = self._opt
        if self.reader.full:
            self._read_oldest()
        stats = self._stats._pending(self)
        self.queue.append((self.reader.push(self.record), stats, opt.n_calls, with_loss))
        opt.last_stats = stats
        if not opt.skip_nonfinite:
            self.settle()        # raise at the update that failed, as on the CPU
        return stats

    def _read_oldest(self):
        """Fill the oldest in-flight StepStats from its record and book it
        in the optimizer; raise what that update reported."""
        opt = self._opt
        slot, stats, call, with_loss = self.queue.popleft()
        rec = self.reader.take(slot)
        k = self.k
        skipped = rec[k.CTL_SKIP] != 0.0
        error = int(rec[k.CTL_ERROR])
        scale = float(rec[k.CTL_SCALE])
        opt._step_count = int(rec[k.CTL_STEP])
        if skipped and error == k.ERR_NONE:
            opt._n_skipped += 1
        stats._fill((opt._step_count, float(rec[k.CTL_LR]), float(rec[k.CTL_NORM]), scale,
                     (not skipped) and scale < 1.0, bool(skipped),
                     np.sqrt(rec[k.CTL_SIZE:])),
                    float(rec[k.CTL_LOSS]) if with_loss else None)
        if error == k.ERR_BAD_LABEL:
            raise ValueError(
                f"labels: a class index outside [0, n_classes) reached the GPU in training "
                f"call {call}; that update was not applied (parameters and optimizer state "
                "unchanged)")
        if error != k.ERR_NONE:
            raise RuntimeError(f"fastgrad: the device found no hyper-parameters for its step "
                               f"count in call {call} (error {error}); the update was skipped")
        if skipped and not opt.skip_nonfinite:
            raise NonFiniteGradientError(
                f"non-finite gradient norm {stats.grad_norm} at update {opt._step_count}; "
                "parameters and optimizer state were left unchanged")

    # what a pending StepStats calls
    def _fetch_stats(self, stats):
        while stats._values is None:
            self._read_oldest()

    def _stats_ready(self, stats):
        for slot, queued, _, _ in self.queue:
            if queued is stats:
                return self.reader.ready(slot)
        return stats._values is not None


_BACKENDS = {}
_LOCK = threading.Lock()
_CLASSES = {"cpu": CpuBackend, "cuda": CudaBackend}


def backend_for(device=None):
    """The backend of ``device`` ("cpu" | "cuda" | "auto" | None: the
    default device), one instance per device; raises
    ``DeviceUnavailableError`` for a device that cannot run here."""
    if isinstance(device, Backend):
        return device
    return _named(_device.resolve(device))


def backend_of(array):
    """The backend of the device ``array`` lives on (no availability probe:
    the array is there already)."""
    return _named(_device.device_of(array))


def _named(name):
    be = _BACKENDS.get(name)
    if be is None:
        with _LOCK:
            be = _BACKENDS.setdefault(name, _CLASSES[name]())
    return be
