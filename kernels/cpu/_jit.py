"""Compilation options shared by every CPU kernel.

``error_model="numpy"`` lets loops with a float division vectorise (under the
default "python" model a division by zero must raise, which blocks SIMD).
No ``fastmath``: NaN and Inf must stay visible to the non-finite guards.
``cache=True`` keeps compiled code on disk across processes; Numba falls back
to a user cache directory when the install is read-only.
"""
JIT = dict(cache=True, error_model="numpy", nogil=True)

# Scalar helpers are inlined into their callers at Numba IR level, so that an
# activation code passed as a constant is folded away and each loop compiles
# to a branch-free, vectorisable body.
INLINE = dict(inline="always")
