"""A stand-in for a session on a device provider, for the tests of kept IOBindings."""

from __future__ import annotations

import onnxruntime as ort


class DeviceSession:
    """An ONNX Runtime session as a GPU provider (CUDA, DirectML) runs it, on the CPU: its IOBinding copies each
    input to the device when it is bound (onnxruntime's IOBinding::BindInput, CopyOneInputAcrossDevices), so
    numbers written into a bound array afterwards are never read."""

    def __init__(self, session):
        self.session = session

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def io_binding(self):
        io, copies = self.session.io_binding(), []
        bind = io.bind_ortvalue_input

        def bind_copy(name, value):
            copies.append(ort.OrtValue.ortvalue_from_numpy(value.numpy().copy()))
            bind(name, copies[-1])

        io.bind_ortvalue_input, io.copies = bind_copy, copies
        return io

    def __getattr__(self, name):
        return getattr(self.session, name)

