"""The parameter layout of kernels/layout.py is the one the layers bind, the
checkpoints count and the kernels read: slots tile a layer's slice exactly."""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad.kernels.layout import layer_size, layer_slots


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
@pytest.mark.parametrize("weight_norm", [False, True])
def test_slots_tile_the_layer_and_match_the_bound_views(rng, norm, weight_norm):
    n_in, n_out = (int(v) for v in rng.integers(1, 40, 2))
    model = fg.Sequential([fg.Dense(3, n_in, activation="tanh"),
                           fg.Dense(n_in, n_out, activation="identity", norm=norm,
                                    weight_norm=weight_norm)], dtype="float64")
    layer, offset = model.layers[1], int(model.layer_offsets[1])
    w, b, gamma, beta, g, end = layer_slots(offset, n_in, n_out, norm is not None, weight_norm)
    assert end == int(model.layer_offsets[2]) == offset + layer_size(
        n_in, n_out, norm is not None, weight_norm)
    # the slots in order, each the size the layout says, covering [offset, end)
    sizes = [b - w, gamma - b, beta - gamma, g - beta, end - g]
    assert w == offset and sum(sizes) == end - offset
    assert sizes == [n_in * n_out, n_out, n_out if norm else 0, n_out if norm else 0,
                     n_out if weight_norm else 0]

    # each view of the layer is that slice of the flat buffer
    model.params[...] = np.arange(model.n_params)
    weight = layer.v if weight_norm else layer.W
    np.testing.assert_array_equal(weight.ravel(), np.arange(w, b))
    np.testing.assert_array_equal(layer.b, np.arange(b, gamma))
    if norm:
        np.testing.assert_array_equal(layer.gamma, np.arange(gamma, beta))
        np.testing.assert_array_equal(layer.beta, np.arange(beta, g))
    if weight_norm:
        np.testing.assert_array_equal(layer.g, np.arange(g, end))
