"""Host <-> device copies that never make the host wait for the device.

A copy between pageable NumPy memory and the device (``cupy.asarray``,
``.get()``) waits for the stream to drain: inside a training loop that is a
sync per step.  Copies through page-locked (pinned) memory can be queued on
the stream like a kernel.  Both classes here keep a ring of pinned slots,
each guarded by an event recorded after its copy, so a slot is reused only
once its previous copy has run: the host waits only when it is a whole ring
ahead of the device.

* :class:`Uploader` -- ``upload(host, dst)``: host array -> device array
  (the optimizer's hyper-parameter table, a training step's NumPy batch).
* :class:`RecordReader` -- ``push(dev)`` queues a copy of a small device
  array into a slot; ``ready(slot)`` asks without waiting whether it has
  arrived; ``take(slot)`` returns it (waiting if needed) and frees the slot.
"""
import cupy
import numpy as np

__all__ = ["Uploader", "RecordReader", "uploader"]


def _wait(event):
    """Block on ``event`` only if it has not completed (a completed event
    costs a query, not a sync)."""
    if event is not None and not event.done:
        event.synchronize()


class Uploader:
    """Asynchronous host -> device copies through a ring of ``slots`` pinned
    buffers (each grown to the largest array it has carried)."""

    def __init__(self, slots=16):
        self._mem = [None] * slots
        self._bytes = [0] * slots
        self._events = [None] * slots
        self._next = 0

    def upload(self, host, dst):
        """Enqueue ``dst[...] = host`` on the current stream; returns ``dst``.

        ``host`` is a C-contiguous NumPy array of ``dst``'s dtype and size
        (``dst`` C-contiguous).  The host data is copied into the pinned slot
        before this returns, so the caller may overwrite ``host`` at once.
        """
        host = np.ascontiguousarray(host)
        if host.dtype != dst.dtype or host.size != dst.size or not dst.flags.c_contiguous:
            raise ValueError(f"upload of {host.dtype}{host.shape} into {dst.dtype}{dst.shape}")
        nbytes = host.nbytes
        if nbytes == 0:
            return dst
        i = self._next
        self._next = (i + 1) % len(self._mem)
        _wait(self._events[i])
        mem = self._mem[i]
        if self._bytes[i] < nbytes:
            self._bytes[i] = max(nbytes, 4096)
            mem = self._mem[i] = cupy.cuda.alloc_pinned_memory(self._bytes[i])
        np.frombuffer(mem, np.uint8, nbytes)[:] = host.reshape(-1).view(np.uint8)
        stream = cupy.cuda.get_current_stream()
        dst.data.copy_from_host_async(mem.ptr, nbytes, stream)
        ev = self._events[i]
        if ev is None:
            ev = self._events[i] = cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        return dst


_uploaders = {}     # device id -> Uploader


def uploader():
    """The current device's shared :class:`Uploader`."""
    dev = cupy.cuda.runtime.getDevice()
    up = _uploaders.get(dev)
    if up is None:
        up = _uploaders[dev] = Uploader()
    return up


class RecordReader:
    """Asynchronous device -> host copies of float64 records of ``size``
    elements into ``slots`` pinned slots.  The caller frees each slot it
    pushed with :meth:`take`; :meth:`push` on a full ring raises."""

    def __init__(self, size, slots=16):
        self.size = int(size)
        self._mem = [cupy.cuda.alloc_pinned_memory(max(self.size, 1) * 8) for _ in range(slots)]
        self._host = [np.frombuffer(m, np.float64, self.size) for m in self._mem]
        self._events = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(slots)]
        self._free = list(range(slots - 1, -1, -1))

    @property
    def full(self):
        return not self._free

    def push(self, dev):
        """Enqueue a copy of the float64 device array ``dev`` (``size``
        elements, contiguous); returns its slot."""
        if not self._free:
            raise RuntimeError("RecordReader: every slot is waiting to be taken")
        if dev.dtype != np.float64 or dev.size != self.size or not dev.flags.c_contiguous:
            raise ValueError(f"record must be {self.size} contiguous float64, got "
                             f"{dev.dtype}{dev.shape}")
        slot = self._free.pop()
        stream = cupy.cuda.get_current_stream()
        dev.data.copy_to_host_async(self._mem[slot].ptr, self.size * 8, stream)
        self._events[slot].record(stream)
        return slot

    def ready(self, slot):
        """True when the record of ``slot`` is on the host (never waits)."""
        return bool(self._events[slot].done)

    def take(self, slot):
        """The record of ``slot`` (a NumPy copy), waiting for it if needed;
        frees the slot."""
        _wait(self._events[slot])
        rec = self._host[slot].copy()
        self._free.append(slot)
        return rec
