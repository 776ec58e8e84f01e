"""Where a layer's parameters lie in a model's flat buffers: the kernels' copy.

Layer ``l`` of a model owns ``params[offsets[l]:offsets[l + 1]]`` (and the
same slice of ``grads``), in this order:

    W      n_in x n_out, row-major (weight norm: its direction v)
    b      n_out
    gamma  n_out        with a batch or layer norm
    beta   n_out        with a batch or layer norm
    g      n_out        with weight norm (the per-column magnitude)

The epilogue pieces that own gamma, beta (norm) and g (weight norm) declare
their slots in ``fastgrad/epilogue.py``, from which the layers and the
checkpoints place them (``param_slots``); ``tests/test_epilogue.py`` checks
that these functions give the same offsets for every combination.  They are
integer arithmetic alone, so the Numba kernels inline them
(``kernels/cpu/step*.py``) and the CUDA step calls them on the host;
``kernels/`` never imports ``fastgrad``, hence the copy.
"""


def layer_size(n_in, n_out, norm, weight_norm):
    """How many parameters a layer owns."""
    return layer_slots(0, n_in, n_out, norm, weight_norm)[5]


def layer_slots(offset, n_in, n_out, norm, weight_norm):
    """``(w, b, gamma, beta, g, end)``: the start of each slot of the layer
    at ``offset`` and the end of its parameters.  Absent slots start where
    the next one does (they hold no parameters)."""
    b = offset + n_in * n_out
    gamma = b + n_out
    beta = gamma + n_out if norm else gamma
    g = beta + n_out if norm else beta
    end = g + n_out if weight_norm else g
    return offset, b, gamma, beta, g, end
