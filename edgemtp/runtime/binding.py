"""An IOBinding kept for runs of one shape over one KV cache's rows: the target's small passes (runtime/target.py)
and the MTP drafter's steps (runtime/drafter_session.py), both kept in `KVCache.passes`.

Binding every input and the KV buffers afresh cost ~0.6 ms of Python per target step (Gemma 3 270M: 72 KV
bindings, 7 small inputs copied into new OrtValues, 38 outputs wrapped back), 1-2% of an fp32 decode step, and
~125 us per drafter step, ~0.5 ms a round at K = 4 (int4, session 49). A kept binding leaves the KV buffers bound,
its inputs are numpy arrays the binding reads in place (each run writes its numbers into them), and the outputs
asked for are fresh OrtValues of the shapes the first run gave, so arrays handed out earlier (logits a caller
keeps) are never overwritten."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def reads_in_place(session) -> bool:
    """Whether a kept binding sees the numbers written into its input arrays after they were bound: only on the
    CPU. A device provider (CUDA, DirectML) copies each input when it is bound (IOBinding::BindInput), so a kept
    binding would run every step on the first one's inputs."""
    return set(session.get_providers()) == {"CPUExecutionProvider"}


class KeptBinding:
    def __init__(self, owner, session, inputs: dict[str, np.ndarray], kv_inputs: dict[str, ort.OrtValue],
                 kv_outputs: dict[str, ort.OrtValue], names: tuple[str, ...]):
        """owner: the Target or DrafterSession whose id is part of the key the binding is kept under, held so that
        the id stays its own; inputs: the first run's arrays (bound with their numbers, what a device provider
        copies); names: the outputs `run` returns, in order."""
        self.owner, self.session, self.names, self.inputs = owner, session, names, inputs
        self.io = session.io_binding()
        for name, value in inputs.items():
            self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
        for name, value in kv_inputs.items():
            self.io.bind_ortvalue_input(name, value)
        for name, value in kv_outputs.items():
            self.io.bind_ortvalue_output(name, value)
        self.shapes: list | None = None  # of the named outputs, known after the first run

    def run(self, feeds: dict) -> list[np.ndarray]:
        for name, value in feeds.items():
            self.inputs[name][...] = value
        if self.shapes is None:
            for name in self.names:
                self.io.bind_output(name)
            self.session.run_with_iobinding(self.io)
            outputs = self.io.get_outputs()[-len(self.names):]  # in binding order: any KV outputs came first
            self.shapes = [(o.shape(), o.numpy().dtype) for o in outputs]
            return [o.numpy() for o in outputs]
        outputs = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype) for shape, dtype in self.shapes]
        for name, value in zip(self.names, outputs):
            self.io.bind_ortvalue_output(name, value)
        self.session.run_with_iobinding(self.io)
        return [o.numpy() for o in outputs]
