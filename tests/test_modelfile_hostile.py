"""Corrupt, truncated and hostile model files: each is refused with a clear error, nothing huge allocated."""

import json
import struct
import tracemalloc

import numpy as np
import pytest

import engine
from engine import ModelFileError, nn
from engine.serialize import container
from engine.serialize.container import ContainerError
from engine.serialize.modelfile import graph_digest, loads


@pytest.fixture(scope="module")
def good():
    nn.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(2 * 4 * 4, 3)
    )
    return engine.serialize.modelfile.dumps(net.build((1, 6, 6)))


def tamper(data: bytes, edit, rehash: bool = True) -> bytes:
    """Apply `edit(metadata)` and re-pack, with a valid graph hash so the targeted check is the one hit."""
    c = container.loads(data)
    edit(c.metadata)
    if rehash:
        c.metadata["graph_sha256"] = graph_digest(c.metadata["graph"])
    return container.dumps(c.tensors, c.metadata, kind=c.kind)


def node_index(data: bytes, op: str) -> int:
    nodes = container.loads(data).metadata["graph"]["nodes"]
    return next(i for i, n in enumerate(nodes) if n["op"] == op)


def refused(data: bytes, *patterns: str):
    with pytest.raises(ContainerError) as info:
        loads(data)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    return info.value


def test_the_good_file_loads(good):
    assert loads(good).output.shape == (None, 3)


def test_wrong_magic(good):
    refused(b"NOTPFTEN" + good[8:], "wrong magic")


@pytest.mark.parametrize("cut", [0, 10, 30, -1, -200])
def test_truncated(good, cut):
    refused(good[:cut], *(() if cut else ("too short",)))


def test_flipped_payload_byte(good):
    bad = bytearray(good)
    bad[-3] ^= 0xFF
    refused(bytes(bad), "checksum")


def test_altered_graph_without_rehash(good):
    def edit(meta):
        meta["graph"]["nodes"][-1]["attrs"]["transpose_b"] = False

    refused(tamper(good, edit, rehash=False), "graph_sha256")


def test_weight_shape_disagrees_with_graph(good):
    c = container.loads(good)
    c.tensors["5.weight"] = np.zeros((3, 31), np.float32)  # the graph feeds it 32 features
    data = container.dumps(c.tensors, c.metadata, kind="model")
    refused(data, "SharedDeviceTensor", "declares shape (3, 32)")
    for node in c.metadata["graph"]["nodes"]:  # without declared shapes the operator's shape rule catches it
        node["shape"] = None
    c.metadata["graph_sha256"] = graph_digest(c.metadata["graph"])
    refused(container.dumps(c.tensors, c.metadata, kind="model"), "(MatrixMul)", "inner sizes differ")


def test_declared_shape_disagrees_with_graph(good):
    i = node_index(good, "Convolution")

    def edit(meta):
        meta["graph"]["nodes"][i]["shape"] = [None, 2, 5, 5]

    refused(tamper(good, edit), f"node {i} (Convolution)", "declares shape (None, 2, 5, 5)")


def test_unknown_operator(good):
    def edit(meta):
        meta["graph"]["nodes"][-1]["op"] = "os.system"

    refused(tamper(good, edit), "unknown operator 'os.system'")


def test_inputs_referring_forward(good):
    i = node_index(good, "Relu")

    def edit(meta):
        meta["graph"]["nodes"][i]["inputs"] = [i + 1]

    refused(tamper(good, edit), f"node {i} (Relu)", "must name earlier nodes")


@pytest.mark.parametrize(
    "attrs,message",
    [
        ({"stride": "2"}, "attribute 'stride'"),
        ({"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1.5}, "attribute 'groups'"),
        ({"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": True}, "attribute 'groups'"),
        ({"__class__": 1}, "unknown attribute '__class__'"),
        ({"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}, "cannot be rebuilt"),  # groups missing
    ],
)
def test_bad_attribute_types(good, attrs, message):
    i = node_index(good, "Convolution")

    def edit(meta):
        meta["graph"]["nodes"][i]["attrs"] = attrs

    refused(tamper(good, edit), f"node {i} (Convolution)", message)


def test_huge_sizes_in_the_graph_are_refused_without_allocating(good):
    i = node_index(good, "Host2DeviceCopy")

    def edit(meta):
        node = meta["graph"]["nodes"][i]
        node["attrs"]["shape"] = node["shape"] = [None, 1, 1 << 20, 1 << 20]

    tracemalloc.start()
    try:
        refused(tamper(good, edit), "larger than the limit")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


def test_huge_tensor_declared_in_the_header_is_refused_without_allocating(good):
    magic, version, header_len = struct.unpack_from("<8sIQ", good)
    header = json.loads(good[20 : 20 + header_len])
    header["tensors"][0]["shape"] = [1 << 20, 1 << 20, 1 << 10]
    header["tensors"][0]["nbytes"] = 4 << 50
    raw = json.dumps(header).encode()
    data = struct.pack("<8sIQ", magic, version, len(raw)) + raw + good[20 + header_len :]
    tracemalloc.start()
    try:
        refused(data, "past the payload")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


def test_huge_header_length_is_refused(good):
    refused(good[:12] + struct.pack("<Q", 1 << 62) + good[20:], "header length")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(format="something-else"), "not a pocketfed model file"),
        (lambda m: m.update(format_version=99), "version 99 is not supported"),
        (lambda m: m["graph"].update(outputs={}), "lists no outputs"),
        (lambda m: m["graph"].update(outputs={"y": 10_000}), "do not exist"),
        (lambda m: m["graph"].update(inputs={"x": 1}), "must refer to Host2DeviceCopy"),
        (lambda m: m["graph"]["nodes"][-1].update(side_updates=7), "side_updates must be a list"),
        (lambda m: m["graph"]["nodes"][-1].update(side_updates=[0]), "is not an update node"),
        (lambda m: m["graph"]["nodes"].__setitem__(0, "boom"), "is not an object"),
        (lambda m: m["graph"].update(nodes={}), "has no graph"),
    ],
)
def test_malformed_graph_sections(good, edit, message):
    refused(tamper(good, edit), message)


def test_missing_weight(good):
    c = container.loads(good)
    del c.tensors["5.bias"]
    refused(container.dumps(c.tensors, c.metadata, kind="model"), "weight '5.bias' is missing")


def test_model_file_error_is_a_container_error():
    assert issubclass(ModelFileError, ContainerError) and issubclass(ContainerError, ValueError)
