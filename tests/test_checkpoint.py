"""Checkpoint I/O: round trips, strict loading and the mismatch report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from builders import build_unet

from fastdiff.models import (
    CheckpointError,
    build_preset,
    load_state_dict,
    load_weights,
    read_metadata,
    save_weights,
)

FLAGS = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions="16",
    class_cond=True,
    num_classes=10,
    learn_sigma=True,
    num_head_channels=32,
    resblock_updown=True,
)


def random_model(**kw) -> torch.nn.Module:
    model = build_unet(**{**FLAGS, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def forward(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([1, 999]), torch.tensor([0, 9]))


def test_round_trip_pt(tmp_path):
    src = random_model()
    path = tmp_path / "model.pt"
    torch.save(src.state_dict(), path)
    dst = load_weights(build_unet(**FLAGS), path)
    assert torch.equal(forward(dst), forward(src))
    torch.save({"state_dict": src.state_dict(), "step": 3}, tmp_path / "wrapped.pth")
    assert load_state_dict(tmp_path / "wrapped.pth").keys() == src.state_dict().keys()


def test_round_trip_safetensors_with_metadata(tmp_path):
    src = random_model()
    path = tmp_path / "model.safetensors"
    meta = {"preset": "tiny", "flags": FLAGS, "step": 12}
    save_weights(src, path, metadata=meta)
    assert read_metadata(path) == meta
    dst = load_weights(build_unet(**FLAGS), str(path))
    assert torch.equal(forward(dst), forward(src))
    save_weights(src, tmp_path / "plain.safetensors")
    assert read_metadata(tmp_path / "plain.safetensors") == {}
    with pytest.raises(ValueError, match=".safetensors"):
        save_weights(src, tmp_path / "model.pt")


def test_save_weights_writes_the_same_bytes_in_every_process(tmp_path):
    """safetensors keeps metadata in a hash map seeded anew per save: the same weights and flags
    were other bytes each time (another sha256 for run.json). The file stays one that safetensors
    reads, metadata included, whatever its strings hold."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    meta = {f"key{i}": i for i in range(8)} | {"odd": 'q"\\ \n\x01 é ∑ \u2028 \x7f', "ü": [1.5, None]}
    save = (
        "import sys, torch; from fastdiff.models import save_weights; "
        "w = {'w': torch.arange(6.0).reshape(2, 3), 'b': torch.ones(2, dtype=torch.float16)}; "
        f"save_weights(w, sys.argv[1], {meta!r})"
    )
    subprocess.run([sys.executable, "-c", save, str(tmp_path / "child.safetensors")], check=True)
    for i in range(3):
        save_weights(weights, tmp_path / f"{i}.safetensors", metadata=meta)
    data = (tmp_path / "child.safetensors").read_bytes()
    assert all((tmp_path / f"{i}.safetensors").read_bytes() == data for i in range(3))
    assert read_metadata(tmp_path / "0.safetensors") == meta
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == {k: json.dumps(v) for k, v in meta.items()}
    assert all(torch.equal(v, weights[k]) for k, v in load_file(tmp_path / "0.safetensors").items())


def test_save_weights_is_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous file (or none), never a torn one."""
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    save_weights({"w": torch.ones(3)}, path)

    def dies(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(OSError, match="killed"):
        save_weights({"w": torch.zeros(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(safetensors.torch.load_file(path)["w"], torch.ones(3))


@pytest.mark.parametrize(
    "message",
    [
        'Error while serializing: I/O error: No space left on device (os error 28) at path "x"',
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })',
    ],
    ids=["safetensors>=0.6.1", "safetensors<0.6.1"],
)
def test_a_safetensors_io_error_is_an_oserror(tmp_path, monkeypatch, message):
    """safetensors raises its own error for a full disk, which callers report in one line as an
    OSError; before 0.6.1 it spelled the errno another way, and the error stayed a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError(message)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as e:
        save_weights({"w": torch.zeros(3)}, tmp_path / "model.safetensors")
    assert e.value.errno == 28 and e.value.strerror == "No space left on device"


def test_missing_and_unreadable_files(tmp_path):
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nothing.pt"):
        load_state_dict(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_weights(build_unet(**FLAGS), tmp_path / "nothing.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_load_and_save_weights_refuse_the_wrong_kind_of_argument(tmp_path):
    """None or numpy arrays for the weights, None for the model: one error naming the argument
    (were AttributeErrors and numpy's 'truth value of an array is ambiguous')."""
    model = random_model()
    numpy_sd = {k: v.numpy() for k, v in model.state_dict().items()}
    for weights in (None, 3, numpy_sd):
        with pytest.raises(CheckpointError, match="load_weights: state_dict_or_path must be a state dict"):
            load_weights(model, weights)
    with pytest.raises(TypeError, match="load_weights: model must be an nn.Module, got NoneType"):
        load_weights(None, model.state_dict())
    with pytest.raises(
        TypeError, match="save_weights: model must be an nn.Module or a state dict, got NoneType"
    ):
        save_weights(None, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


def test_mismatch_message():
    sd = random_model(num_channels=64, num_head_channels=64).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["label_emb.weight"]
    with pytest.raises(CheckpointError) as info:
        load_weights(build_unet(**FLAGS), sd, preset="tiny")
    msg = str(info.value)
    assert "(preset 'tiny')" in msg
    assert "missing keys (1): label_emb.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "input_blocks.0.0.weight: checkpoint [64,3,3,3] vs model [32,3,3,3]" in msg
    assert "wrong shapes (" in msg and "more)" in msg  # long lists are cut
    assert "no preset fits" in msg


def test_mismatch_suggests_fitting_preset():
    sd = build_preset("classifier64", device="meta").state_dict()
    with pytest.raises(CheckpointError, match="fits preset 'classifier64'"):
        load_weights(build_unet(**FLAGS), sd)
    sd = build_preset("lsun-cat", device="meta").state_dict()
    fits = "fits presets 'imagenet256-uncond', 'lsun-bedroom', 'lsun-cat', 'lsun-horse'"
    with pytest.raises(CheckpointError, match=fits):
        load_weights(build_unet(**FLAGS), sd, preset="imagenet256")
    with pytest.raises(CheckpointError) as info:
        load_weights(build_unet(**FLAGS), {})
    assert f"missing keys ({len(build_unet(**FLAGS).state_dict())})" in str(info.value)


def test_fp32_weights_into_fp16_model(tmp_path):
    src = random_model()
    path = tmp_path / "fp32.safetensors"
    save_weights(src, path)
    dst = load_weights(build_unet(**FLAGS, use_fp16=True), path)
    conv = dst.input_blocks[1][0].in_layers[2].weight
    assert conv.dtype == torch.float16
    assert torch.equal(conv, src.input_blocks[1][0].in_layers[2].weight.half())
    assert dst.time_embed[0].weight.dtype == torch.float32
    assert ((forward(dst) - forward(src)).abs().max() / forward(src).abs().max()) < 1e-2


def test_vector_checkpoint_file(case_path):
    """A vector case file holds a guided-diffusion state dict under "state_dict"."""
    from conftest import load_case

    flags = load_case(case_path)["flags"]
    model = load_weights(build_unet(**flags), case_path)
    assert model.input_blocks[0][0].weight.abs().sum() > 0


def _hostile(tmp_path, kind: str):
    """A .safetensors file damaged the way disks, downloads and attackers damage them."""
    import json
    import struct

    good = tmp_path / "good.safetensors"
    save_weights({"w": torch.zeros(4, 4), "b": torch.zeros(4)}, good, {"flags": {"image_size": 8}})
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])

    def with_header(h):
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + raw[8 + n :]

    w = header["w"]
    return {
        "empty": b"",
        "text": b"this is not a checkpoint at all, just some text\n",
        "truncated": raw[: len(raw) - 10],
        "header-8GB": struct.pack("<Q", 8 * 2**30) + raw[8:],
        "header-not-json": struct.pack("<Q", 4) + b"\xff\xfe{]" + raw[12:],
        "header-a-list": with_header([1, 2]),
        "offsets-lie": with_header({**header, "w": {**w, "data_offsets": [0, 10**9]}}),
        "shape-lies": with_header({**header, "w": {**w, "shape": [4096, 4096]}}),
        "negative-shape": with_header({**header, "w": {**w, "shape": [-4, -4]}}),
        "bad-dtype": with_header({**header, "w": {**w, "dtype": "Q99"}}),
        "bad-metadata": with_header({**header, "__metadata__": {"flags": 3}}),
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "empty",
        "text",
        "truncated",
        "header-8GB",
        "header-not-json",
        "header-a-list",
        "offsets-lie",
        "shape-lies",
        "negative-shape",
        "bad-dtype",
        "bad-metadata",
    ],
)
def test_unreadable_safetensors_is_one_line(tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(_hostile(tmp_path, kind))
    for read in (read_metadata, load_state_dict):
        with pytest.raises(CheckpointError) as info:
            read(path)
        msg = str(info.value)
        assert "cannot read checkpoint" in msg and str(path) in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "content", [b"junk\n", b"", b"PK\x03\x04 truncated zip", b"\x80\x02 truncated pickle"]
)
def test_unreadable_torch_file_is_one_line(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert msg.startswith(f"cannot read checkpoint {path}: ") and "\n" not in msg, msg
    assert not msg.rstrip().endswith(": "), msg


def test_header_shapes_without_reading_data_and_hash(tmp_path):
    import hashlib

    from fastdiff.models.checkpoint import check_fits, file_sha256, read_header

    model = random_model()
    path = tmp_path / "m.safetensors"
    save_weights(model, path, {"step": 1})
    shapes, meta = read_header(path)
    assert meta == {"step": "1"} and shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        skeleton = build_unet(**FLAGS)
    check_fits(shapes, skeleton)
    with torch.device("meta"):
        wide = build_unet(**{**FLAGS, "num_channels": 64})
    with pytest.raises(CheckpointError, match="wrong shapes"):
        check_fits(shapes, wide)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_error_line_is_a_messages_first_line_else_its_type():
    """The one rule by which checkpoints, devices, ranks and the feature networks quote a library's
    error in a one-line message (each wrote the same expression before)."""
    from fastdiff.config import error_line

    assert error_line(RuntimeError("  cut short\n  at byte 12\n")) == "cut short"
    assert error_line(EOFError()) == "EOFError"
    assert error_line(RuntimeError("   ")) == "RuntimeError"


def test_a_model_built_on_meta_takes_the_weights_as_a_built_one_does(tmp_path):
    """fastdiff's loading builds each network once, on meta, and loads it there (the bundled
    model's second build with random weights and the copy into it were a tenth of a second of
    each run): the same weights, dtypes (fp32 into a use_fp16 model) and contiguous layout as
    a model built on the CPU, from a safetensors file or from a .pt saved channels_last."""
    from fastdiff.models import build_network, configs_from_flags

    src = random_model()
    pt = tmp_path / "cl.pt"
    torch.save(src.to(memory_format=torch.channels_last).state_dict(), pt)
    save_weights(src, tmp_path / "w.safetensors")
    for weights in (tmp_path / "w.safetensors", pt):
        for fp16 in (False, True):
            config = configs_from_flags("diffusion", {**FLAGS, "use_fp16": fp16})[0]
            built = load_weights(build_network(config), weights).state_dict()
            on_meta = load_weights(build_network(config, "meta"), weights).state_dict()
            assert on_meta.keys() == built.keys()
            for k, v in built.items():
                w = on_meta[k]
                assert (w.device, w.dtype, w.is_contiguous()) == (v.device, v.dtype, True), k
                assert torch.equal(w, v), k


def test_a_meta_model_with_non_persistent_buffers_is_refused_not_left_half_empty():
    """A user's network on meta with a buffer no state dict holds would keep it without data and
    fail at its first forward, far from the load; load_weights says so at the load instead."""
    net = torch.nn.Linear(2, 2, device="meta")
    net.register_buffer("table", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(ValueError, match="non-persistent buffers \\(table\\)"):
        load_weights(net, torch.nn.Linear(2, 2).state_dict())
