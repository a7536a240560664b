"""Streams initializers into one external data file as the graph is built (no 2 GB protobuf limit,
and only one layer's weights in memory at a time)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

_ALIGN = 64  # so onnxruntime can memory-map each tensor aligned


class WeightWriter:
    def __init__(self, data_path: Path):
        self.location = data_path.name  # relative to the .onnx file, which sits beside it
        self._file = open(data_path, "wb")
        self.initializers: list[TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        offset = self._file.tell()
        pad = -offset % _ALIGN
        self._file.write(b"\0" * pad)
        offset += pad
        self._file.write(array.tobytes())
        tensor = TensorProto(name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        self._file.close()
