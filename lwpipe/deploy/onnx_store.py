"""The traced ONNX file's weights, one tensor at a time.

torch's tracer writes a model over 2 GiB with its tensors beside the graph. Loading them into the graph
(onnx.load's default) holds a second float32 copy of the model, and each read of a tensor's `raw_data`
copies it again; on a 1.1 B-parameter model that was 17 GiB of RAM for a 4.4 GB file. Here the graph is
loaded without them (`onnx.load(path, load_external_data=False)`), a tensor is read as a memory map of its
bytes where it lies (`values`), and `save` copies the kept tensors into the output's data file a chunk at a
time, next to the new int8 / 4-bit ones the rewrite made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

PROTO_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB for one message, less room for the graph itself
INLINE = 1024  # bytes: smaller tensors stay in the graph
CHUNK = 64 << 20


def external(t: TensorProto) -> dict | None:
    """The tensor's external-data entries (location, offset, length), or None when its bytes are inline."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


def nbytes(t: TensorProto) -> int:
    where = external(t)
    if where is None:
        return len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    return int(where.get("length", int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize))


def values(t: TensorProto, base: Path) -> np.ndarray:
    """The tensor as an array: a read-only memory map of its bytes in `base` when they lie outside the graph."""
    where = external(t)
    if where is None:
        return numpy_helper.to_array(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(int(d) for d in t.dims)
    offset = int(where.get("offset", 0))
    return np.memmap(Path(base) / where["location"], dtype=dtype, mode="r", offset=offset, shape=shape)


def save(proto: onnx.ModelProto, path: Path, base: Path) -> Path | None:
    """Check and write `proto` to `path`, its external tensors read from `base`. Under protobuf's 2 GiB the
    file holds everything; over it, every tensor of INLINE bytes or more goes to `<path>.data` beside it (ONNX
    Runtime reads it from there), copied a chunk at a time. Returns that data file, or None."""
    inits = proto.graph.initializer
    if sum(nbytes(t) for t in inits) < PROTO_LIMIT:
        load_external_data_for_model(proto, str(base))  # the file's own size: a GPTQ'd model's 4-bit weights
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
        return None
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as out:
        for t in inits:
            where = external(t)
            if where is None and nbytes(t) < INLINE:
                continue
            offset = out.tell()
            if where is None:
                out.write(t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes())
            else:
                _copy(Path(base) / where["location"], int(where.get("offset", 0)), nbytes(t), out)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", out.tell() - offset)):
                t.external_data.add(key=key, value=str(value))
            t.data_location = TensorProto.EXTERNAL
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return data


def _copy(src: Path, offset: int, length: int, out) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(CHUNK, length))
            if not chunk:
                raise OSError(f"{src}: {length} bytes short of the tensor it holds")
            out.write(chunk)
            length -= len(chunk)
