"""Ahead-of-time kernel choices (fastdiff/ops/_tuning.py) and attention's tile autotuning: measured
only inside ``autotuning``, once per key, kept in one file shared by every op's section."""

from __future__ import annotations

import functools
import json
import types

import pytest
import torch

from fastdiff.files import _umask
from fastdiff.ops import _tuning, autotuning


@pytest.fixture
def choice_file(monkeypatch, tmp_path):
    path = tmp_path / "choices.json"
    monkeypatch.setenv("FASTDIFF_BACKEND_CACHE", str(path))
    return path


def test_choices_share_one_file_and_survive_a_restart(choice_file):
    gn, attn = _tuning.Choices("gn"), _tuning.Choices("attn")
    gn.put("a", "cuda")
    attn.put("b", [64, 32, 4, 2])
    assert json.loads(choice_file.read_text()) == {"gn": {"a": "cuda"}, "attn": {"b": [64, 32, 4, 2]}}
    again = _tuning.Choices("attn")  # another process
    assert again.get("b") == [64, 32, 4, 2] and again.get("a") is None
    other = _tuning.Choices("gn")  # a second process adds its own key: both stay
    other.put("c", "triton")
    assert json.loads(choice_file.read_text())["gn"] == {"a": "cuda", "c": "triton"}


def test_choice_file_lives_in_fastdiffs_cache_folder(monkeypatch, tmp_path):
    """Beside the ONNX exports: $FASTDIFF_CACHE, else $XDG_CACHE_HOME/fastdiff (it ignored both and
    always wrote ~/.cache), written with the umask's mode as every other file."""
    from fastdiff.export.onnx_runtime import cache_dir

    monkeypatch.delenv("FASTDIFF_BACKEND_CACHE", raising=False)
    monkeypatch.delenv("FASTDIFF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _tuning.cache_path() == tmp_path / "xdg" / "fastdiff" / "backend_choice.json"
    assert cache_dir() == tmp_path / "xdg" / "fastdiff" / "onnx"
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "mine"))
    assert _tuning.cache_path() == tmp_path / "mine" / "backend_choice.json"
    assert cache_dir() == tmp_path / "mine" / "onnx"
    _tuning.Choices("gn").put("a", "cuda")
    assert _tuning.cache_path().stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["backend_choice.json"]  # no temp left


def test_the_tests_cache_is_in_the_sessions_temp_folder(tmp_path_factory):
    """conftest's: no ONNX graph or kernel choice of an earlier run (of other code) is this one's."""
    from fastdiff.files import cache_root

    assert cache_root().is_relative_to(tmp_path_factory.getbasetemp())


def test_choices_survive_a_bad_file(choice_file, monkeypatch):
    choice_file.write_text("{ not json")
    store = _tuning.Choices("gn")
    assert store.get("a") is None  # a corrupt file only costs a measurement
    store.put("a", "cuda")
    assert json.loads(choice_file.read_text()) == {"gn": {"a": "cuda"}}
    monkeypatch.setenv("FASTDIFF_BACKEND_CACHE", "0")
    memory = _tuning.Choices("gn")
    memory.put("z", "triton")  # in memory only
    assert memory.get("z") == "triton" and "z" not in choice_file.read_text()


def test_fastest_passes_over_what_fails():
    times = {"a": 3.0, "b": 1.0, "c": 2.0}

    def timer(fn):
        return fn()

    def run(c):
        if c == "b":
            raise RuntimeError("out of resources")
        return times[c]

    assert _tuning.fastest(["a", "b", "c"], run, timer=timer) == "c"
    assert _tuning.fastest(["b"], run, timer=timer) is None


def test_measuring_only_inside_autotuning():
    x = torch.zeros(1)
    assert not _tuning.measuring(x)
    with autotuning():
        assert _tuning.measuring(x)
        with autotuning():
            pass
        assert _tuning.measuring(x)  # nested blocks restore, not reset
    assert not _tuning.measuring(x)


triton = pytest.importorskip("triton")


@pytest.fixture
def attn(monkeypatch):
    from fastdiff.ops.attention import triton_kernel

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter has one fixed tile
    triton_kernel._CHOICES.clear()
    yield triton_kernel
    triton_kernel._CHOICES.clear()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 192, 256])
@pytest.mark.parametrize("length", [64, 65, 256, 1024])
def test_attention_candidates(attn, dtype, head_dim, length):
    for kernel in ("fwd", "dkdv", "dq"):
        options = attn.candidates(kernel, head_dim, length, dtype)
        assert options[0] == attn._config(kernel, head_dim, length, dtype)  # the default first
        assert len(set(options)) == len(options) <= 3
        fit = max(16, triton.next_power_of_2(length))
        for block_m, block_n, warps, stages in options:
            for block in (block_m, block_n):
                assert 16 <= block <= fit and block & (block - 1) == 0
            assert warps in (4, 8) and stages >= 1
        if dtype == torch.float32 and head_dim > 128:
            assert len(options) == 1  # the one tile that does not spill


def test_attention_tiles_measured_once_inside_autotuning(attn, choice_file, monkeypatch):
    """On a (stand-in) GPU tensor: the default outside autotuning; inside, every candidate launched
    and timed once, the fastest kept per (GPU, kernel, dtype, d, T) and read back later."""
    monkeypatch.setattr(attn, "gpu_name", lambda device: "Stand-in GPU")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    speed = {}  # candidate -> fake milliseconds: the last candidate is the fastest
    monkeypatch.setattr(attn, "fastest", functools.partial(_tuning.fastest, timer=lambda fn: speed[fn()]))
    x = types.SimpleNamespace(is_cuda=True, dtype=torch.float16, device="cuda:0")
    options = attn.candidates("fwd", 64, 256, torch.float16)
    for i, c in enumerate(options):
        speed[c] = 10.0 - i
    launched = []

    def launch(tiles):
        launched.append(tiles)
        return tiles

    assert attn._tiles("fwd", x, 64, 256, launch) == options[0] and not launched
    with autotuning():
        assert attn._tiles("fwd", x, 64, 256, launch) == options[-1]
        assert sorted(launched) == sorted(options)
        assert attn._tiles("fwd", x, 64, 256, launch) == options[-1]  # recorded: not measured again
        assert len(launched) == len(options)
    attn._CHOICES.clear()  # a new process reads the file
    assert attn._tiles("fwd", x, 64, 256, launch) == options[-1]
    saved = json.loads(choice_file.read_text())["attention"]
    assert saved == {"Stand-in GPU|fwd|float16|d64|T256": list(options[-1])}
