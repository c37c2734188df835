"""Cross-program data-race detection for the interpreted kernels (CPU, TRITON_INTERPRET=1).

The interpreter runs a launch's programs one after another, so a kernel whose programs communicate
through global memory (one program stores what another loads, or two store the same element) gives
the right answer on CPU and an order-dependent one on a GPU, where programs run concurrently.
`races_checked()` records, per launch, which program stored and loaded each address and reports
every address that one program stores and another loads or stores. Atomics are not tracked.
"""
import contextlib

import numpy as np

from bounds import interpreter_accesses


@contextlib.contextmanager
def races_checked():
    """Yields the list of races found while the block runs (empty when programs never share memory)."""
    races, state = [], dict(kernel="", writer={}, reader={}, reported=set())
    MANY = -1

    def on_launch(name, tensors):
        state.update(kernel=name, writer={}, reader={})

    def report(kind, address, first, second):
        key = (state["kernel"], kind)
        if key not in state["reported"]:
            state["reported"].add(key)
            races.append(f"{state['kernel']}: {kind} at {address:#x} (programs {first} and {second})")

    def on_access(builder, what, addresses):
        program, writer, reader = builder.grid_idx, state["writer"], state["reader"]
        for address in np.unique(addresses).tolist():
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

    with interpreter_accesses(on_launch, on_access):
        yield races
