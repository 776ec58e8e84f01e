"""Checkpoints: ``save(path, model, opt=None)`` and ``load(path) -> (model, opt)``.

A checkpoint is ONE safetensors file (https://huggingface.co/docs/safetensors):
named arrays plus a string->string metadata header.  Files are data, never
code: nothing is pickled, so loading a stranger's file cannot run anything.

Tensors
    ``params``            the model's flat parameter buffer (float32/float64);
                          layer ``i`` owns ``params[off[i]:off[i+1]]``: its
                          ``W`` row-major ``(n_in, n_out)``, then its ``b``
    ``running_mean``, ``running_var``  float64, one entry per output unit of
                          every layer: batch-norm running statistics (only
                          when some layer has ``norm == "batch"``)
    ``opt.<name>``        each optimizer state buffer, same length and dtype,
                          under its rule's state names (kernels/spec.py
                          ``UPDATE_RULES``: ``opt.exp_avg``, ``opt.exp_avg_sq``,
                          ``opt.max_exp_avg_sq``, ``opt.momentum_buffer``,
                          ``opt.square_avg``, ``opt.grad_avg``)

Metadata
    ``"fastgrad"``        one JSON document::

        {"format": "fastgrad-checkpoint", "format_version": 2,
         "fastgrad_version": "0.1.0",
         "model": {"class": "MLP", "dtype": "float32", "seed": 0,
                   "dropout_step": 0, "mask_seed": 0, "training": true,
                   "layers": [{"n_in": 784, "n_out": 256, "activation": "relu",
                               "alpha": 0.0, "init": "he_normal",
                               "dropout": 0.0, "residual": false,
                               "norm": null, "weight_norm": false}, ...]},
         "optimizer": null | {"kind": "adam", "step": 20, "n_skipped": 0,
                              "n_calls": 20, "hyper": {...}, "state": ["exp_avg", ...]},
         "checksums": {"algorithm": "sha256", "tensors": {"params": "<hex>", ...}}}

    ``checksums`` holds the SHA-256 of every tensor's bytes (as stored:
    little-endian, row-major); :func:`load` recomputes them and refuses a
    file whose data does not match (a flipped bit, a torn copy).  Files
    without ``checksums`` (written before it existed) load unchecked.

    ``hyper`` holds the optimizer's hyper-parameters, its learning-rate
    schedule as ``Schedule.to_config()`` data.  An optimizer with several
    parameter groups also writes ``"groups"`` (``Optimizer.state_dict``:
    per group its ``ranges`` of ``params``, ``hyper``, ``lr``,
    ``lr_scale``); files without it load as one group.  An optimizer with a
    state buffer started mid-run (SGD's momentum turned on) writes
    ``"since"``: per group, the update count it started at (absent: 0).
    ``dropout_step`` is the
    dropout counter the next training forward draws its masks from (so a
    resumed run draws what an uninterrupted one would), ``mask_seed`` the
    seed of those masks.  Files without ``dropout``, ``residual``,
    ``dropout_step``, ``mask_seed``, ``training`` or ``norm`` (written
    before these existed, same format version) load as a plain model at
    counter 0.  A layer with ``norm`` ("layer" or "batch") owns ``W``, ``b``,
    then ``gamma`` and ``beta`` in ``params``; a layer with ``weight_norm``
    keeps ``v`` where ``W`` would be and ends with ``g``.

    Format versions: 2 is written.  1 is read too: its ``"gelu"`` was the
    tanh approximation and loads as ``"gelu_tanh"`` (version 2's ``"gelu"``
    is the exact erf GELU).  An activation added by
    ``fastgrad.register_activation`` is saved by name; loading the file
    needs it registered again first.

The file opens in plain safetensors, from NumPy, PyTorch
(``safetensors.torch.load_file``), JAX or Hugging Face tools.

Writes are atomic: the bytes go to a temporary file in the destination's
directory, are flushed and ``fsync``-ed, then ``os.replace`` puts the file in
place and the directory is ``fsync``-ed.  A process killed in the middle of
a save leaves the previous checkpoint intact and at worst a stray
``.<name>.<host>.<pid>.<random>.tmp`` file next to it, which the next save of
the same target from the same host removes (when process ``<pid>`` no longer
runs there; POSIX).  ``<host>`` is a hash of the machine's name and PID
namespace, so that ranks on other hosts sharing the folder never remove a
live save's file.

Loading checks everything before building anything: a truncated, foreign,
crafted or newer-version file raises ``ValueError`` saying what is wrong.
"""
import hashlib
import json
import math
import numbers
import os
import secrets
import socket

import numpy as np

from . import device as _device
from . import epilogue
from .optim import COUNTER_BOUND

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fastgrad-checkpoint"
FORMAT_VERSION = 2
# Version 1 (fastgrad 0.1) named the tanh approximation of GELU "gelu"; from
# version 2 "gelu" is the exact (erf) GELU and the approximation "gelu_tanh".
# Older files load as what they were trained with.  The table is the
# activation field's (fastgrad.epilogue): each piece's fields say how
# older versions' values read.
_RENAMED_BEFORE_2 = epilogue.piece("activation").fields[0].renamed_before[2]
META_KEY = "fastgrad"
PARAMS = "params"
OPT_PREFIX = "opt."
RUNNING_MEAN, RUNNING_VAR = "running_mean", "running_var"
CHECKSUM_ALGORITHM = "sha256"

_DTYPES = ("float32", "float64")
_MODEL_CLASSES = ("Sequential", "MLP")
# Limits that only a crafted file reaches; they bound the work done before
# the architecture is compared with the stored parameter count.
_MAX_LAYERS = 1_000_000


# --- helpers ----------------------------------------------------------------

def _to_host(a):
    """A C-contiguous NumPy copy-free view (NumPy) or copy (CuPy) of ``a``."""
    return np.ascontiguousarray(_device.to_numpy(a))


def _optimizer_classes():
    from .optim import optimizer_classes
    return optimizer_classes()


def _fsync_dir(dirname):
    """fsync a directory so the rename itself is durable (POSIX only)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(dirname, flags)
    except OSError:          # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:          # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _checksum(arr):
    """SHA-256 (hex) of a host array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(arr).view(np.uint8)).hexdigest()


def _process_gone(pid):
    """True when no process ``pid`` exists (POSIX; False when unsure)."""
    if os.name != "posix" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:          # PermissionError: it exists, owned by someone else
        return False
    return False


def _host_tag():
    """This machine and PID namespace, as a short file-name part (12 hex
    digits of a hash, whatever the host name's length or characters): a
    process id means something only there (ranks on other hosts, or in
    containers, share a checkpoint folder)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{ns}".encode()).hexdigest()[:12]


def _remove_stale_temps(dirname, base):
    """Delete ``.<base>.<host>.<pid>.<hex>.tmp`` files of earlier saves of
    the same target from this host whose process is gone (killed mid-save);
    a live process's (this one's included) may still be writing and is left
    alone, as is every other host's."""
    prefix = f".{base}.{_host_tag()}."
    try:
        names = os.listdir(dirname)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid, _, token = name[len(prefix):-len(".tmp")].partition(".")
        if not (pid.isdigit() and len(token) == 8) or int(pid) == os.getpid():
            continue
        if _process_gone(int(pid)):
            try:
                os.unlink(os.path.join(dirname, name))
            except OSError:
                pass


def _atomic_write(path, data):
    """Write ``data`` (bytes) to ``path`` so that ``path`` always holds either
    its previous content or all of ``data``."""
    path = os.path.abspath(os.fspath(path))
    dirname, base = os.path.split(path)
    if not os.path.isdir(dirname):      # said of the user's path, not of the temp file
        raise FileNotFoundError(f"cannot save {path!r}: no directory {dirname!r}")
    _remove_stale_temps(dirname, base)
    # Not tempfile.mkstemp: its files are mode 0600; this one gets the
    # umask's mode, as a plain open(path, "wb") would.
    while True:
        tmp = os.path.join(dirname, f".{base}.{_host_tag()}.{os.getpid()}."
                                    f"{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
            break
        except FileExistsError:      # pragma: no cover - a 32-bit collision
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(dirname)


# --- save -------------------------------------------------------------------

def _model_meta(model):
    return {
        "class": "MLP" if type(model).__name__ == "MLP" else "Sequential",
        "dtype": np.dtype(model.dtype).name,
        "seed": (int(model.seed) if isinstance(model.seed, numbers.Integral)
                 and not isinstance(model.seed, bool) and model.seed >= 0 else None),
        "dropout_step": int(model.dropout_step),
        "mask_seed": int(model._mask_seed),
        "training": bool(model.training),
        "layers": [_layer_meta(l) for l in model.layers],
    }


def _json_value(v):
    """A layer setting as plain JSON (NumPy scalars become Python's)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _layer_meta(layer):
    """A layer's entry: its widths, initializer and every epilogue piece's
    checkpoint fields (``fastgrad.epilogue``)."""
    meta = {"n_in": int(layer.n_in), "n_out": int(layer.n_out), "init": layer.init}
    meta.update((k, _json_value(v)) for k, v in epilogue.config_of(layer).items())
    return meta


def save(path, model, opt=None):
    """Write ``model`` (and ``opt``, if given) to ``path`` as one safetensors file.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; replaced atomically (any extension, e.g. ``run.fgz``).
    model : fastgrad.Sequential / MLP
    opt : fastgrad optimizer built on ``model`` (``fg.Adam(model, ...)``), optional

    Raises
    ------
    TypeError
        ``model`` is not a fastgrad model, or ``opt`` not a fastgrad optimizer.
    ValueError
        ``opt`` was built on other parameters.
    """
    from safetensors.numpy import save as _st_save

    from .layers import Sequential
    from .optim import Optimizer

    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a fastgrad Sequential/MLP, got {type(model).__name__}")
    if opt is not None:
        if not isinstance(opt, Optimizer):
            raise TypeError(f"opt must be a fastgrad optimizer, got {type(opt).__name__}")
        if opt.params is not model.params:
            raise ValueError("opt must be built on this model (fg.Adam(model, ...))")
    # One snapshot, under the model's lock (shared by its optimizers and
    # steps) and copied: a step in another thread tore a save otherwise
    # (parameters of one update, step count of another, checksums of a third).
    with model._lock:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "fastgrad_version": _version(), "model": _model_meta(model), "optimizer": None}
        tensors = {PARAMS: np.array(_to_host(model.params))}
        for name in _buffer_names(model.layers):
            tensors[name] = np.array(_to_host(getattr(model, name)))
        if opt is not None:
            sd = opt.state_dict()
            state = sd.pop("state")
            sd["state"] = sorted(state)
            meta["optimizer"] = sd
            for name, arr in state.items():
                tensors[OPT_PREFIX + name] = _to_host(arr)
    meta["checksums"] = {"algorithm": CHECKSUM_ALGORITHM,
                         "tensors": {name: _checksum(a) for name, a in tensors.items()}}
    text = json.dumps(meta, allow_nan=False, sort_keys=True)
    data = _st_save(tensors, metadata={META_KEY: text})
    _atomic_write(path, data)


def _version():
    try:
        from . import __version__
        return __version__
    except ImportError:      # pragma: no cover - partial import
        return "unknown"


# --- load -------------------------------------------------------------------

class _Bad(Exception):
    """Internal: a checkpoint problem; becomes the ValueError's message."""


def _need(cond, msg):
    if not cond:
        raise _Bad(msg)


def _get(d, key, types, where):
    """``d[key]``, checked to be one of ``types`` (a bool is no integer here)."""
    _need(isinstance(d, dict) and key in d, f"{where}: missing field {key!r}")
    v = d[key]
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(v, types) and (bool in types or not isinstance(v, bool))
    _need(ok, f"{where}.{key}: expected {_type_names(types)}, got {type(v).__name__} {v!r:.80}")
    return v


def _type_names(types):
    names = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", bool: "a boolean", type(None): "null"}
    if float in types:
        types = tuple(t for t in types if t is not int)
    return " or ".join(names.get(t, t.__name__) for t in types)


def _pos_int(d, key, where):
    v = _get(d, key, int, where)
    _need(v >= 1, f"{where}.{key}: must be a positive integer, got {v}")
    return v


def _buffer_names(layers):
    """The model buffers (checkpoint tensors) some layer's pieces use."""
    return sorted({b.name for layer in layers for b in epilogue.layer_buffers(layer)})


def _layer_settings(spec, version, where, n_in, n_out):
    """Every epilogue piece's settings of a layer entry, checked: a field a
    file lacks takes its ``absent`` value (files written before it existed),
    older versions' values are renamed."""
    settings = {}
    for field in epilogue.FIELDS:
        if field.absent is epilogue.REQUIRED or field.name in spec:
            settings[field.name] = _get(spec, field.name, field.types, where)
        else:
            settings[field.name] = field.absent
    settings = epilogue.upgrade(settings, version)
    alpha = settings.get("alpha")
    _need(alpha is None or math.isfinite(alpha), f"{where}.alpha: must be finite, got {alpha!r}")
    try:
        attrs = epilogue.check_config(settings, n_in, n_out)
    except ValueError as exc:
        raise _Bad(f"{where}: {exc}") from None
    return {name: attrs[name] for name in epilogue.FIELD_NAMES}


def _reject_constant(name):
    raise _Bad(f"metadata JSON holds the non-standard number {name}")


def _parse_model(m, version=FORMAT_VERSION):
    from .layers import INITIALIZERS

    _need(isinstance(m, dict), "model: expected an object")
    cls = _get(m, "class", str, "model")
    _need(cls in _MODEL_CLASSES, f"model.class: unknown model class {cls!r:.80}; "
          f"expected one of {list(_MODEL_CLASSES)}")
    dtype = _get(m, "dtype", str, "model")
    _need(dtype in _DTYPES,
          f"model.dtype: unsupported dtype {dtype!r:.80}; expected one of {list(_DTYPES)}")
    seed = m.get("seed")
    _need(seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0),
          f"model.seed: expected a non-negative integer or null, got {seed!r:.80}")
    state = {}
    for key in ("dropout_step", "mask_seed"):
        if key in m:
            v = _get(m, key, int, "model")
            # a counter ends below 2**62: training from it still fits in int64
            bound = COUNTER_BOUND if key == "dropout_step" else 2 ** 63
            _need(0 <= v < bound, f"model.{key}: must be in [0, {bound}), got {v}")
            state[key] = v
    if "training" in m:
        state["training"] = _get(m, "training", bool, "model")
    layers = _get(m, "layers", list, "model")
    _need(1 <= len(layers) <= _MAX_LAYERS,
          f"model.layers: expected 1 to {_MAX_LAYERS} layers, got {len(layers)}")
    specs, n_params = [], 0
    for i, spec in enumerate(layers):
        where = f"model.layers[{i}]"
        _need(isinstance(spec, dict), f"{where}: expected an object")
        n_in, n_out = _pos_int(spec, "n_in", where), _pos_int(spec, "n_out", where)
        if i:
            _need(n_in == specs[-1]["n_out"], f"{where}.n_in: {n_in} does not match the "
                  f"previous layer's n_out {specs[-1]['n_out']}")
        settings = _layer_settings(spec, version, where, n_in, n_out)
        init = _get(spec, "init", str, where)
        _need(init in INITIALIZERS, f"{where}.init: unknown initializer {init!r:.80}")
        n_params += epilogue.layer_size(settings, n_in, n_out)
        specs.append({"n_in": n_in, "n_out": n_out, "init": init, **settings})
    return cls, np.dtype(dtype), seed, specs, n_params, state


def _check_json_value(v, depth=0):
    """Only plain JSON scalars, lists and objects, and not too deep."""
    _need(depth < 32, "metadata JSON nests too deeply")
    if isinstance(v, dict):
        for k, x in v.items():
            _check_json_value(x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _check_json_value(x, depth + 1)
    elif isinstance(v, float):
        _need(math.isfinite(v), "metadata JSON holds a non-finite number")


def _parse_optimizer(o, tensor_names):
    from .schedules import from_config

    classes = _optimizer_classes()
    _need(isinstance(o, dict), "optimizer: expected an object or null")
    kind = _get(o, "kind", str, "optimizer")
    _need(kind in classes, f"optimizer.kind: unknown optimizer {kind!r:.80}; "
          f"expected one of {sorted(classes)}")
    for key in ("step", "n_skipped", "n_calls"):
        v = _get(o, key, int, "optimizer")
        # below 2**62: the kernels count updates in int64 from there
        _need(0 <= v < COUNTER_BOUND, f"optimizer.{key}: must be in [0, 2**62), got {v}")
    hyper = _get(o, "hyper", dict, "optimizer")
    _check_json_value(hyper)
    cls = classes[kind]
    keys = {"lr", "clip_norm", "clip_value", "skip_nonfinite", "maximize"} | set(cls._defaults)
    # files written before maximize existed lack it (loaded as False)
    _need(keys - {"maximize"} <= set(hyper) <= keys,
          f"optimizer.hyper: fields {sorted(hyper)} do not match {kind!r}'s {sorted(keys)}")
    for key, v in hyper.items():
        if key == "lr":
            _need(isinstance(v, (dict, int, float)) and not isinstance(v, bool),
                  f"optimizer.hyper.lr: expected a number or a schedule config, got {v!r:.80}")
            try:
                from_config(v)
            except Exception as exc:
                raise _Bad(f"optimizer.hyper.lr: not a valid schedule "
                           f"({type(exc).__name__}: {exc})") from None
        elif isinstance(cls._defaults.get(key), tuple):         # betas: a pair
            _need(isinstance(v, list) and len(v) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) for b in v),
                f"optimizer.hyper.{key}: expected two numbers, got {v!r:.80}")
        else:
            want = bool if isinstance(cls._defaults.get(key), bool) or key in (
                "skip_nonfinite", "maximize") \
                else (int, float, type(None)) if key.startswith("clip_") else (int, float)
            _get(hyper, key, want, "optimizer.hyper")
    if o.get("groups") is not None:
        # parameter groups (absent in files of one group or written before
        # groups existed); their values are checked again by load_state_dict
        groups = _get(o, "groups", list, "optimizer")
        _check_json_value(groups)
        _need(groups, "optimizer.groups: expected at least one group")
        for i, g in enumerate(groups):
            where = f"optimizer.groups[{i}]"
            _need(isinstance(g, dict) and {"ranges", "hyper"} <= set(g)
                  <= {"ranges", "hyper", "lr", "lr_scale"},
                  f"{where}: expected an object with ranges, hyper, lr and lr_scale")
            _need(isinstance(g["ranges"], list) and all(
                isinstance(r, list) and len(r) == 2 and all(
                    isinstance(x, int) and not isinstance(x, bool) for x in r)
                for r in g["ranges"]), f"{where}.ranges: expected [lo, hi] integer pairs")
            _need(isinstance(g["hyper"], dict), f"{where}.hyper: expected an object")
            _need(g.get("lr") is None or isinstance(g["lr"], dict),
                  f"{where}.lr: expected null or a schedule config")
            sc = g.get("lr_scale")
            _need(sc is None or (isinstance(sc, list) and len(sc) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in sc)),
                f"{where}.lr_scale: expected null or two numbers")
    if o.get("since") is not None:
        # per group, the update count a state buffer started at (absent: 0)
        since = _get(o, "since", list, "optimizer")
        _need(all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= o["step"]
                  for s in since), "optimizer.since: expected update counts in [0, step]")
    state = _get(o, "state", list, "optimizer")
    _need(all(isinstance(s, str) for s in state), "optimizer.state: expected a list of names")
    stored = {n[len(OPT_PREFIX):] for n in tensor_names if n.startswith(OPT_PREFIX)}
    _need(set(state) == stored, f"optimizer.state lists {sorted(state)} but the file holds "
          f"state tensors {sorted(stored)}")
    _need(set(state) <= set(classes[kind].state_names),
          f"optimizer.state: {sorted(set(state) - set(classes[kind].state_names))} "
          f"are not states of {kind!r}")
    return classes[kind]


def _parse_checksums(c, names):
    """The ``{tensor: hex digest}`` of the metadata; None when the file
    predates checksums."""
    if c is None:
        return None
    _need(isinstance(c, dict), "checksums: expected an object")
    algo = _get(c, "algorithm", str, "checksums")
    _need(algo == CHECKSUM_ALGORITHM,
          f"checksums.algorithm: {algo!r:.40} is not supported (expected {CHECKSUM_ALGORITHM!r})")
    sums = _get(c, "tensors", dict, "checksums")
    _need(set(sums) == names, f"checksums.tensors: {sorted(sums)!r:.200} do not match the "
          f"file's tensors {sorted(names)}")
    for name, v in sums.items():
        _need(isinstance(v, str) and len(v) == 64 and all(ch in "0123456789abcdef" for ch in v),
              f"checksums.tensors.{name}: not a SHA-256 hex digest")
    return sums


def _open(path):
    from safetensors import safe_open
    return safe_open(os.fspath(path), framework="np")


def load(path, device=None):
    """Read a checkpoint written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
    device : "auto" | "cpu" | "cuda" | None
        Where to build the model (None: ``fastgrad.get_device()``).

    Returns
    -------
    (model, opt)
        ``model`` is a fresh MLP/Sequential with the saved architecture,
        dtype, seed and parameters; ``opt`` the optimizer with its
        hyper-parameters, schedule, state and step count, or None when the
        file holds no optimizer.

    Raises
    ------
    ValueError
        The file is not a fastgrad checkpoint (truncated, foreign, crafted,
        inconsistent) or was written by a newer format version; the message
        says what is wrong.
    OSError
        The path cannot be opened (FileNotFoundError, PermissionError, ...).
    fastgrad.DeviceUnavailableError
        ``device`` cannot run here.
    """
    dev = _device.resolve(device)
    path = os.fspath(path)
    with open(path, "rb"):     # OSError for a missing or unreadable path, as-is
        pass
    try:
        return _load(path, dev)
    except _Bad as exc:
        raise ValueError(f"{path!r} is not a valid fastgrad checkpoint: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path!r} is not a valid fastgrad checkpoint: {exc}") from exc
    except MemoryError:
        raise ValueError(f"{path!r} is not a valid fastgrad checkpoint: "
                         "it asks for more memory than is available") from None
    except Exception as exc:   # SafetensorError, OSError inside the file, TypeError, ...
        raise ValueError(f"{path!r} is not a valid fastgrad checkpoint: "
                         f"{type(exc).__name__}: {exc}") from exc


def _load(path, dev):
    try:
        handle = _open(path)
    except Exception as exc:
        raise _Bad(f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    with handle as f:
        meta = f.metadata() or {}
        names = set(f.keys())
        _need(META_KEY in meta, f"no {META_KEY!r} metadata (a safetensors file, "
              "but not one written by fastgrad.save)")
        try:
            doc = json.loads(meta[META_KEY], parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise _Bad(f"metadata is not valid JSON ({exc})") from None
        except RecursionError:
            raise _Bad("metadata JSON nests too deeply") from None
        _need(isinstance(doc, dict), "metadata is not a JSON object")
        _need(doc.get("format") == FORMAT, f"metadata format is {doc.get('format')!r:.80}, "
              f"expected {FORMAT!r}")
        version = doc.get("format_version")
        _need(isinstance(version, int) and not isinstance(version, bool),
              f"format_version must be an integer, got {version!r:.80}")
        _need(1 <= version <= FORMAT_VERSION,
              f"format version {version} is not supported (this fastgrad reads version "
              f"{FORMAT_VERSION}{'; upgrade fastgrad' if version > FORMAT_VERSION else ''})")
        cls_name, dtype, seed, specs, n_params, state = _parse_model(doc.get("model"), version)
        o = doc.get("optimizer")
        opt_cls = None if o is None else _parse_optimizer(o, names)
        expected = {PARAMS} | {OPT_PREFIX + s for s in (o["state"] if o else ())}
        n_units = sum(s["n_out"] for s in specs)
        buffers = _buffer_names(specs)
        expected |= set(buffers)
        _need(names == expected, f"tensors {sorted(names)!r:.200} do not match the "
              f"expected {sorted(expected)}")
        sums = _parse_checksums(doc.get("checksums"), names)
        arrays = {}
        for name in sorted(names):
            sl = f.get_slice(name)
            shape, st_dtype = tuple(sl.get_shape()), sl.get_dtype()
            if name in buffers:
                _need(st_dtype == "F64" and shape == (n_units,),
                      f"tensor {name!r}: expected F64[{n_units}], got {st_dtype}{list(shape)}")
                arrays[name] = f.get_tensor(name)
                continue
            want = {"float32": "F32", "float64": "F64"}[dtype.name]
            _need(st_dtype == want, f"tensor {name!r}: dtype {st_dtype}, expected {want} "
                  f"({dtype.name})")
            _need(shape == (n_params,), f"tensor {name!r}: shape {shape}, but the architecture "
                  f"has {n_params} parameters")
            arr = f.get_tensor(name)
            _need(isinstance(arr, np.ndarray) and arr.dtype == dtype and arr.shape == (n_params,),
                  f"tensor {name!r} did not read back as {dtype.name}[{n_params}]")
            arrays[name] = arr
    if sums is not None:
        for name, want in sums.items():
            _need(_checksum(arrays[name]) == want,
                  f"tensor {name!r} does not match its checksum: the file's data is corrupted")
    model = _build_model(cls_name, dtype, seed, specs, dev)
    model.dropout_step = state.get("dropout_step", 0)
    model.training = state.get("training", True)
    if "mask_seed" in state:
        model._mask_seed = state["mask_seed"]
    xp = _device.array_module(dev)
    for name in buffers:
        getattr(model, name)[...] = xp.asarray(arrays[name])
    model.params[...] = xp.asarray(arrays[PARAMS])
    model._refresh_weight_norm()     # layer.W of weight-normalised layers, as load_state_dict
    opt = None
    if opt_cls is not None:
        opt = opt_cls(model)
        sd = {"kind": o["kind"], "step": o["step"], "n_skipped": o["n_skipped"],
              "n_calls": o["n_calls"], "hyper": o["hyper"],
              "state": {s: arrays[OPT_PREFIX + s] for s in o["state"]}}
        for key in ("groups", "since"):
            if o.get(key) is not None:
                sd[key] = o[key]
        opt.load_state_dict(sd)
        _need(set(opt.state) == set(o["state"]),
              f"optimizer state {sorted(o['state'])} does not fit its hyper-parameters "
              f"(which use {sorted(opt.state)})")
    return model, opt


def _build_model(cls_name, dtype, seed, specs, dev):
    from .layers import MLP, Sequential, model_of_settings

    return model_of_settings(
        MLP if cls_name == "MLP" else Sequential,
        [(s["n_in"], s["n_out"], s["init"], {k: s[k] for k in epilogue.FIELD_NAMES})
         for s in specs], dtype, dev, seed)
