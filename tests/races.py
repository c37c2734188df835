"""Cross-program data-race detection for the interpreted kernels (CPU, TRITON_INTERPRET=1).

The interpreter runs a launch's programs one after another, so a kernel whose programs communicate
through global memory (one program stores what another loads, or two store the same element) gives
the right answer on CPU and an order-dependent one on a GPU, where programs run concurrently.
`races_checked()` records, per launch, which program stored and loaded each address and reports
every address that one program stores and another loads or stores. Atomics are not tracked.
"""
import contextlib

import numpy as np


@contextlib.contextmanager
def races_checked():
    """Yields the list of races found while the block runs (empty when programs never share memory)."""
    from triton.runtime import interpreter
    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    saved = {name: getattr(cls, name) for cls, name in ((executor, "_init_args_hst"), (builder, "create_masked_load"),
                                                        (builder, "create_masked_store"))}
    races, state = [], dict(kernel="", writer={}, reader={}, reported=set())
    MANY = -1

    def init(self, args_dev, kwargs):
        state.update(kernel=getattr(self.fn, "__name__", str(self.fn)), writer={}, reader={})
        return saved["_init_args_hst"](self, args_dev, kwargs)

    def report(kind, address, first, second):
        key = (state["kernel"], kind)
        if key not in state["reported"]:
            state["reported"].add(key)
            races.append(f"{state['kernel']}: {kind} at {address:#x} (programs {first} and {second})")

    def tracked(name, what):
        def access(self, ptrs, *args):
            mask = args[0] if what == "load" else args[1]
            addresses = np.unique(ptrs.data[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)])
            program = self.grid_idx
            writer, reader = state["writer"], state["reader"]
            for address in addresses.tolist():
                w = writer.get(address)
                if what == "load":
                    if w is not None and w != program:
                        report("load of another program's store", address, w, program)
                    r = reader.get(address)
                    reader[address] = program if r is None or r == program else MANY
                else:
                    if w is not None and w != program:
                        report("two programs store", address, w, program)
                    r = reader.get(address)
                    if r is not None and r != program:
                        report("store after another program's load", address, r, program)
                    writer[address] = program
            return saved[name](self, ptrs, *args)
        return access

    executor._init_args_hst = init
    builder.create_masked_load = tracked("create_masked_load", "load")
    builder.create_masked_store = tracked("create_masked_store", "store")
    try:
        yield races
    finally:
        executor._init_args_hst = saved["_init_args_hst"]
        builder.create_masked_load, builder.create_masked_store = saved["create_masked_load"], saved["create_masked_store"]
