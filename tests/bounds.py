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
def bounds_checked():
    """Yields the list of violations found while the block runs (empty when every access was inside)."""
    from triton.runtime import interpreter
    ranges, faults, kernel = [], [], [""]
    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    saved = {name: getattr(cls, name) for cls, name in ((executor, "_init_args_hst"), (builder, "create_masked_load"),
                                                        (builder, "create_masked_store"))}

    def init(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved["_init_args_hst"](self, args_dev, kwargs)
        storages = [x.untyped_storage() for x in [*args_hst, *kwargs_hst.values()] if isinstance(x, torch.Tensor)]
        ranges[:] = [(st.data_ptr(), st.data_ptr() + st.nbytes()) for st in storages]
        kernel[0] = getattr(self.fn, "__name__", str(self.fn))
        return args_hst, kwargs_hst

    def checked(name, what):
        def access(self, ptrs, *args):
            mask = args[0] if what == "load" else args[1]
            addresses = ptrs.data[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)].astype(np.uint64)
            inside = np.zeros(addresses.shape, dtype=bool)
            for low, high in ranges:
                inside |= (addresses >= low) & (addresses < high)
            if not inside.all():
                outside = addresses[~inside].astype(np.int64)
                nearest = min(((int(np.abs(outside - low).min()), low, high) for low, high in ranges), default=None)
                faults.append(f"{kernel[0]}: {what} of {len(outside)} lanes outside every argument "
                              f"(nearest argument [{nearest[1]:#x}, {nearest[2]:#x}), {nearest[0]} bytes from its start)")
            return saved[name](self, ptrs, *args)
        return access

    executor._init_args_hst = init
    builder.create_masked_load = checked("create_masked_load", "load")
    builder.create_masked_store = checked("create_masked_store", "store")
    try:
        yield faults
    finally:
        executor._init_args_hst = saved["_init_args_hst"]
        builder.create_masked_load, builder.create_masked_store = saved["create_masked_load"], saved["create_masked_store"]
