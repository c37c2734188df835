"""Out-of-bounds detection for the interpreted kernels (CPU, TRITON_INTERPRET=1).

`bounds_checked()` checks that every active lane of every load and store addresses memory inside one
of its launch's tensor arguments: what a GPU would fault on (or silently read from a neighbouring
buffer). The interpreter itself only dereferences host pointers and would read anything.
`GSA_BOUNDS_CHECK=1 pytest tests/...` applies it to every test (tests/conftest.py).
"""
import contextlib

import numpy as np
import torch


@contextlib.contextmanager
def interpreter_accesses(on_launch, on_access):
    """Patches the Triton interpreter while the block runs: `on_launch(kernel name, host tensors)` at each
    launch, and `on_access(builder, "load" | "store", addresses)` before every masked load and store, with
    the addresses of its active lanes (the builder holds the running program's `grid_idx`)."""
    from triton.runtime import interpreter
    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    saved = {name: getattr(cls, name) for cls, name in ((executor, "_init_args_hst"), (builder, "create_masked_load"),
                                                        (builder, "create_masked_store"))}

    def init(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved["_init_args_hst"](self, args_dev, kwargs)
        on_launch(getattr(self.fn, "__name__", str(self.fn)),
                  [x for x in [*args_hst, *kwargs_hst.values()] if isinstance(x, torch.Tensor)])
        return args_hst, kwargs_hst

    def hooked(name, what):
        def access(self, ptrs, *args):
            mask = args[0] if what == "load" else args[1]
            on_access(self, what, ptrs.data[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)])
            return saved[name](self, ptrs, *args)
        return access

    executor._init_args_hst = init
    builder.create_masked_load = hooked("create_masked_load", "load")
    builder.create_masked_store = hooked("create_masked_store", "store")
    try:
        yield
    finally:
        executor._init_args_hst = saved["_init_args_hst"]
        builder.create_masked_load, builder.create_masked_store = saved["create_masked_load"], saved["create_masked_store"]


@contextlib.contextmanager
def bounds_checked():
    """Yields the list of violations found while the block runs (empty when every access was inside)."""
    ranges, faults, kernel = [], [], [""]

    def on_launch(name, tensors):
        storages = [x.untyped_storage() for x in tensors]
        ranges[:] = [(st.data_ptr(), st.data_ptr() + st.nbytes()) for st in storages]
        kernel[0] = name

    def on_access(builder, what, addresses):
        addresses = addresses.astype(np.uint64)
        inside = np.zeros(addresses.shape, dtype=bool)
        for low, high in ranges:
            inside |= (addresses >= low) & (addresses < high)
        if not inside.all():
            outside = addresses[~inside].astype(np.int64)
            nearest = min(((int(np.abs(outside - low).min()), low, high) for low, high in ranges), default=None)
            faults.append(f"{kernel[0]}: {what} of {len(outside)} lanes outside every argument "
                          f"(nearest argument [{nearest[1]:#x}, {nearest[2]:#x}), {nearest[0]} bytes from its start)")

    with interpreter_accesses(on_launch, on_access):
        yield faults
