"""The `fastdiff` group: its --help lists every command without importing torch."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fastdiff.cli.main import LazyGroup, main
from fastdiff.runs.errors import RunError


def _help_imports_torch(*args: str) -> tuple[bool, str]:
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom fastdiff.cli.main import main\n"
        f"r = CliRunner().invoke(main, {[*args, '--help']!r})\nassert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\nprint(r.output)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, _, rest = out.partition("\n")
    return first == "True", rest


def test_help_does_not_import_torch():
    imported, out = _help_imports_torch()
    assert not imported, "fastdiff --help imported torch"
    for name in LazyGroup.commands_by_name:
        assert name in out


def test_each_commands_help_starts_without_torch():
    """sample, upsample, invert, interpolate, presets, gd-run, train and train-classifier imported
    torch for their --help (5 to 8 s on a loaded machine, against 0.3 s for evaluate's): the
    choices they list come from fastdiff.choices now, and the work's modules are imported when
    the command runs."""
    for name in sorted(set(LazyGroup.commands_by_name) - {"export"}):
        assert not _help_imports_torch(name)[0], f"fastdiff {name} --help imported torch"
    for sub in ("onnx", "trt"):
        assert not _help_imports_torch("export", sub)[0]


def test_the_names_help_lists_are_the_registries_names():
    from fastdiff.choices import DTYPE_NAMES, ENGINE_NAMES, SAMPLER_NAMES
    from fastdiff.diffusion import SAMPLERS
    from fastdiff.engines import ENGINES
    from fastdiff.engines.sampler import DTYPES

    assert (tuple(SAMPLERS), tuple(ENGINES), tuple(DTYPES)) == (SAMPLER_NAMES, ENGINE_NAMES, DTYPE_NAMES)


def test_summaries_are_the_commands_own_first_lines():
    group = LazyGroup()
    for name in group.commands_by_name:
        command = group.get_command(None, name)
        first = command.help.strip().splitlines()[0]
        assert LazyGroup.summaries[name] == first, name
    assert CliRunner().invoke(main, ["sample", "--help"]).exit_code == 0


def test_ctrl_c_exits_130_and_says_how_to_continue(monkeypatch):
    import fastdiff.runs.interpolation
    import fastdiff.runs.invert
    import fastdiff.runs.sample

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastdiff.runs.sample, "sample_run", interrupted)
    monkeypatch.setattr(fastdiff.runs.interpolation, "interpolate", interrupted)
    monkeypatch.setattr(fastdiff.runs.invert, "invert_images", interrupted)
    for args in (["sample", "--out", "unused"], ["invert", "a.png", "--out", "unused"]):
        r = CliRunner().invoke(main, args)
        assert (
            r.exit_code == 130 and r.output == "interrupted: run the same command with --resume to continue\n"
        )
    r = CliRunner().invoke(main, ["interpolate", "--from", "0", "--to", "1"])
    assert r.exit_code == 130 and r.output == "interrupted\n"  # no --resume to offer


def test_ctrl_c_while_numpy_loads_is_an_interrupt():
    """torch's C start-up imports numpy and swallows what that raises: a Ctrl-C landing there was
    lost (the command went on, or died later of a half-imported numpy: 'module numpy has no
    attribute matrix'). The group imports numpy first, where an interrupt is one."""
    code = (
        "import os, runpy, signal, sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'numpy':\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Hook())\n"
        "sys.argv = ['fastdiff', 'sample', '--help']\n"
        "runpy.run_module('fastdiff.cli.main', run_name='__main__')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (130, "", "interrupted\n")


def test_the_suite_takes_ctrl_c_when_its_runner_ignores_it():
    """A runner started as a script's background job (`cmd &`, nohup) ignores SIGINT, and so did
    the suite and every CLI it started: the Ctrl-C tests failed there (exit 0, or a 60 s wait).
    conftest gives the suite SIGINT's default handling back, which the CLIs then inherit."""
    code = (
        "import signal, subprocess, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import conftest\n"
        "child = 'import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)'\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
        "sys.stdout.flush()\n"
        "subprocess.run([sys.executable, '-c', child], check=True)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert (r.returncode, r.stdout) == (0, "True\nTrue\n"), r.stderr[-3000:]


def test_usage_errors_are_one_line_exit_2():
    """A bad option or value is one line naming the command's --help (click would print a usage
    block of four), with click's usage exit status 2; nothing runs."""
    cases = [
        (["sample", "--stepz", "3"], "Error: No such option", "fastdiff sample --help"),
        (["sample", "--steps", "abc"], "'abc' is not a valid integer", "fastdiff sample --help"),
        (["export", "onnx", "--dtype", "q"], "Invalid value for '--dtype'", "fastdiff export onnx --help"),
        (["invert"], "Missing argument 'IMAGES...'", "fastdiff invert --help"),
        (["train", "--threads", "0"], "Invalid value for '--threads'", "fastdiff train --help"),
        (["samplez"], "No such command 'samplez'", "fastdiff --help"),
    ]
    for args, message, hint in cases:
        r = CliRunner().invoke(main, args, prog_name="fastdiff")
        assert r.exit_code == 2, r.output
        assert r.output.count("\n") == 1 and message in r.output and f"(see '{hint}')" in r.output, r.output


def test_a_value_no_option_takes_exits_2_and_what_the_files_refuse_exits_1(tmp_path):
    """fastdiff's own checks of an option's value exit 2 as click's range checks do (train's
    --batch-size 0 and sample's --steps 1 exited 1, sample's --num-samples 0 exited 2); a value the
    model or the data refuse stays 1, as do options that conflict (an eta given to DDPM exited 2)."""
    train = ["train", "--data", "mnist", "--out", str(tmp_path / "t")]
    sample = ["sample", "--out", str(tmp_path / "s")]
    cases = [
        (train + ["--batch-size", "0"], 2, "--batch-size must be at least 1"),
        (train + ["--image-size", "0"], 2, "--image-size must be at least 1"),
        (train + ["--ema", "2"], 2, "EMA rate 2.0 is not in (0, 1)"),
        (sample + ["--steps", "1"], 2, "--steps must be between 2 and 1000"),
        (sample + ["--classifier-scale", "-1"], 2, "--classifier-scale must be >= 0"),
        (sample + ["--device", "foo"], 2, "unknown device 'foo'"),
        (sample + ["--num-samples", "0"], 2, "0 is not in the range x>=1"),
        (sample + ["--eta", "inf"], 2, "--eta must be a finite number >= 0 and <= 1"),
        (sample + ["--sampler", "ddpm", "--eta", "0.5"], 1, "sampler ddpm does not use it"),  # a conflict
        (sample + ["--steps", "1001"], 1, "--steps must be between 2 and 1000"),  # the bundled model's
        (sample + ["--classes", "10"], 1, "the model has 10 classes"),
        (["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "t")], 1, "is none of these"),
    ]
    for args, status, message in cases:
        r = CliRunner().invoke(main, args, prog_name="fastdiff")
        assert (r.exit_code, r.output.count("\n")) == (status, 1) and message in r.output, (args, r.output)


def test_train_errors_name_the_option_typed(tmp_path):
    """Findings of a new user's run: --ema and --microbatch errors named no option (the microbatch
    one came after the data was read), a training-script flag in --flags was only "unknown",
    --precision fp16 trained on the CPU 14x slower than fp32 (sample's --dtype fp16 refuses the
    CPU), and --resume into a folder that does not exist started a new run silently."""
    train = ["train", "--data", "mnist", "--out", str(tmp_path / "t")]
    cases = [
        (train + ["--ema", "1.5"], 2, "Error: --ema: EMA rate 1.5 is not in (0, 1)"),
        (train + ["--microbatch", "3"], 2, "Error: --microbatch 3 does not divide the batch of 64;"),
        (
            train + ["--flags", "--lr 1e-4"],
            1,
            "Error: --lr is a training-script flag; fastdiff train takes --lr",
        ),
        (train + ["--flags", "--ema_rate 0.99"], 1, "training-script flag; fastdiff train takes --ema\n"),
        (train + ["--flags", "--resume_checkpoint m.pt"], 1, "fastdiff train takes --resume (with the"),
        (
            train + ["--precision", "fp16", "--device", "cpu"],
            1,
            "Error: --precision fp16 needs a CUDA device",
        ),
        (train + ["--resume"], 2, f"Error: --resume: --out {tmp_path / 't'} does not exist"),
        (["sample", "--out", str(tmp_path / "s"), "--resume"], 2, "Error: --resume: --out"),
    ]
    for args, status, message in cases:
        r = CliRunner().invoke(main, args, prog_name="fastdiff")
        assert (r.exit_code, r.output.count("\n")) == (status, 1) and message in r.output, (args, r.output)
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()


def test_train_size_error_of_the_datas_size_is_worded_as_the_flags(tmp_path):
    """An npz's 8x8 images under a 5-level --channel_mult: the fitted config's error named its
    fields (image_size, channel_mult) and said "pass channel_mult", no option of train's."""
    import numpy as np

    np.savez(tmp_path / "d.npz", np.zeros((4, 8, 8, 1), np.uint8), np.arange(4) % 2)
    args = ["train", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, [*args, "--flags", "--channel_mult 1,2,2,2,2"], prog_name="fastdiff")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: the data's image size 8 must be divisible by 16 (--channel_mult")
    assert r.output.endswith('add "--channel_mult 1,2,2,2" to --flags\n')


def test_train_resume_leaves_a_missing_out_on_other_ranks_to_the_loop(tmp_path, monkeypatch):
    """Under torchrun only rank 0 refuses a --resume whose --out does not exist: on another rank
    it is an --out the ranks do not share, which the trainer's rank check names as such."""
    from fastdiff.cli.train_run import _check_out

    o = {"data": "mnist", "out": str(tmp_path / "t"), "resume": True, "max_steps": 10}
    monkeypatch.setenv("RANK", "1")
    _check_out(o, "diffusion")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunError, match="does not exist"):
        _check_out(o, "diffusion")


def test_a_bare_group_prints_its_help_as_the_top_level_does():
    """`fastdiff export` with no subcommand shows export's help as `fastdiff` shows its own
    (exit 2), not that help wrapped as an 'Error: Usage: ...' line ending in a --help hint."""
    for args, command in (([], "fastdiff"), (["export"], "fastdiff export")):
        r = CliRunner().invoke(main, args, prog_name="fastdiff")
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"Usage: {command} [OPTIONS] COMMAND"), r.output
        assert "Error" not in r.output and "(see '" not in r.output, r.output


def test_every_option_says_what_it_does():
    import click

    def options(name, command):
        if isinstance(command, click.Group):
            for sub, c in command.commands.items():
                yield from options(f"{name} {sub}", c)
            return
        for p in command.params:
            if isinstance(p, click.Option):
                yield name, p

    group = LazyGroup()
    for name in group.commands_by_name:
        for command, option in options(name, group.get_command(None, name)):
            assert option.help, f"fastdiff {command} {option.opts[0]} has no help text"


def test_summary_line_counts_threads_in_english():
    from fastdiff.cli.sample import summary_line

    s = dict(images=2, skipped=0, seconds=1.0, warmup_s=0.0, writing_s=0.0, images_per_s=2.0, s_per_step=0.1,
             steps=10, device="cpu", dtype="fp32", engine="eager", threads=1, out="o")  # fmt: skip
    assert summary_line(s).endswith("engine eager, 1 thread -> o")
    assert summary_line({**s, "threads": 2}).endswith("engine eager, 2 threads -> o")


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _redraws(tty: bool, monkeypatch, seconds=300) -> int:
    """Carriage returns a bar writes over ``seconds`` one-second steps of a fake clock."""
    from fastdiff.progress import progress_bar

    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    now = [time.time() + 1]
    bar = progress_bar(total=seconds)  # on stderr, as every command's bars are
    bar._time = lambda: now[0]
    for _ in range(seconds):
        now[0] += 1.0
        bar.update(1)
    bar.close()
    return stream.getvalue().count("\r")


def test_progress_bars_in_a_log_redraw_every_30_seconds(monkeypatch):
    """stderr in a file or pipe (a CI log) kept tqdm's ten redraws a second: thousands of
    carriage-return lines an hour of sampling or training. A terminal keeps the live bar, and
    TQDM_MININTERVAL, tqdm's own setting, still wins."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert _redraws(True, monkeypatch) > 300
    assert _redraws(False, monkeypatch) <= 12  # the first draw, one per 30 s, the last
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    assert _redraws(False, monkeypatch) > 300


def test_a_path_too_long_for_the_file_system_is_one_line(tmp_path, monkeypatch):
    """A name over the file system's limit was an OSError traceback (ENAMETOOLONG) from whichever
    check met it first: Python 3.11's Path.exists() raises it rather than answering False."""
    monkeypatch.chdir(tmp_path)
    long = "a" * 300
    (tmp_path / "s.npz").write_bytes(b"")
    for args, named in (
        (["sample", "--steps", "2", "--num-samples", "1", "--no-progress", "--out", long], long),
        (["sample", "--checkpoint", f"{long}.pt", "--out", "s"], f"{long}.pt"),
        (["evaluate", "mnist", "s.npz", "--json", f"{long}.json"], f"{long}.json"),
        (["train", "--data", "mnist", "--out", long], f"{long}/latest.json"),
    ):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.output == f"Error: path too long for the file system (a name or the whole path): {named}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # nothing made


def test_the_sampling_commands_share_their_device_options():
    """invert and interpolate had their own --engine, --threads, --dtype and --device, whose help
    gave no defaults (and said fp16 needs CUDA where sample's said what it does): the four
    commands now take the same options, and the CPU-bound others the same --threads."""
    group = LazyGroup()

    def described(command, name):
        (option,) = [p for p in group.get_command(None, command).params if p.name == name]
        return (
            tuple(option.opts),
            option.help,
            option.default,
            option.show_default,
            tuple(getattr(option.type, "choices", ())),
        )

    for name in ("engine", "threads", "dtype", "device", "progress"):
        forms = {
            command: described(command, name) for command in ("sample", "upsample", "invert", "interpolate")
        }
        if name in ("threads", "device"):  # theirs were copies too, without the threads' default
            forms.update({command: described(command, name) for command in ("evaluate", "nearest")})
        if name == "threads":  # training took torch's default of every core
            forms.update({command: described(command, name) for command in ("train", "train-classifier")})
        if name == "progress":  # invert and interpolate had none; train's bar is of its steps too
            forms.update({command: described(command, name) for command in ("train", "train-classifier")})
        assert len(set(forms.values())) == 1, forms


def test_evaluate_and_nearest_share_their_feature_and_folder_options():
    """nearest's --features and --inception said 'Feature network.' and 'FID Inception weights.',
    without what auto picks or that FASTDIFF_INCEPTION sets it, which it reads as evaluate does;
    neither took train's --skip-bad-images for the same folder reader."""
    group = LazyGroup()

    def described(command, name):
        (option,) = [p for p in group.get_command(None, command).params if p.name == name]
        return tuple(option.opts), option.help, option.default, option.envvar, option.is_flag

    for name in ("features", "inception", "skip_bad_images"):
        train = ("train", "train-classifier") if name == "skip_bad_images" else ()
        forms = {command: described(command, name) for command in ("evaluate", "nearest", *train)}
        assert len(set(forms.values())) == 1, forms


@pytest.fixture
def help_examples(tmp_path, monkeypatch):
    """(command name, its parsed options) of each example a command's --help shows; a usage error
    raises."""
    import re
    import shlex

    monkeypatch.chdir(tmp_path)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "classifier_sample.py").write_text("")  # gd-run's SCRIPT must exist
    group = LazyGroup()
    examples = []
    for name in group.commands_by_name:
        command = group.get_command(None, name)
        lines = re.sub(r"\\\n\s*", " ", command.help).splitlines()  # continuation lines joined
        for line in lines:
            if f"fastdiff {name} " in line:
                example = line.split(f"fastdiff {name} ", 1)[1].split(" | ")[0]
                examples.append((name, command.make_context(f"fastdiff {name}", shlex.split(example)).params))
    return examples


def test_the_examples_in_each_help_parse(help_examples):
    """The complex commands' --help shows examples (none had any); each one's options exist and
    its values are valid, so the help cannot drift from the options."""
    shown = {name for name, _ in help_examples}
    assert shown >= {"sample", "train", "train-classifier", "evaluate", "gd-run"}


def test_the_training_examples_networks_build_at_their_image_size(help_examples):
    """train-classifier's example (--flags "--classifier_width 32" at --image-size 32) was refused
    as written: the default attention at 32x32 has 32 channels, not one 64-channel head."""
    from fastdiff.models.flags import configs_from_flags, parse_flags

    built = 0
    for name, params in help_examples:
        if name in ("train", "train-classifier") and params["image_size"]:
            flags = {**parse_flags(params["flag_string"] or ""), "image_size": params["image_size"]}
            configs_from_flags("diffusion" if name == "train" else "classifier", flags)
            built += 1
    assert built == 2


def test_a_leading_tilde_in_a_path_is_the_home_folder(tmp_path, monkeypatch):
    """bash leaves the ~ of --out=~/s alone, as does a CI config's argument list: sample made a
    folder literally named ~ in the working folder, and a ~/ input was 'not found'. Every path
    option, and the text options that take a path or a name, expand it now."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    (home / "x.py").write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    group = LazyGroup()
    cases = [
        (
            "sample",
            ["--out", "~/s", "--checkpoint", "~/m.pt"],
            {"out": home / "s", "checkpoint": home / "m.pt"},
        ),
        ("train", ["--data", "~/d.npz", "--out", "~/r"], {"data": f"{home}/d.npz", "out": f"{home}/r"}),
        ("train", ["--data", "mnist"], {"data": "mnist"}),  # a name is left as it is
        ("evaluate", ["~/ref.npz", "~/s.npz", "--json", "~/j.json"], {"ref": f"{home}/ref.npz"}),
        ("nearest", ["~/s.npz", "--data", "~/d", "--held-out", "~/h"], {"held_out": f"{home}/h"}),
        ("interpolate", ["--from", "~/l.npz:1", "--to", "3"], {"start": f"{home}/l.npz:1", "end": "3"}),
        (
            "gd-run",
            ["~/x.py", "~/not-expanded"],
            {"script": f"{home}/x.py", "script_args": ("~/not-expanded",)},
        ),
    ]
    for name, args, expected in cases:
        params = group.get_command(None, name).make_context(name, args).params
        assert {k: params[k] for k in expected} == expected, (name, params)
    r = CliRunner().invoke(
        main, ["sample", "--steps", "2", "--num-samples", "1", "--no-progress", "--out=~/s"]
    )
    assert r.exit_code == 0, r.output
    assert (home / "s" / "samples_1x32x32x1.npz").exists() and not (work / "~").exists()


def test_a_sigterm_the_caller_ignores_stays_ignored(tmp_path):
    """A process started with SIGTERM ignored (a wrapper handling it itself) kept running on it
    in the training loop, but the command group put its own handler in: one SIGTERM ended it."""
    script = tmp_path / "show.py"
    script.write_text("import signal\nprint(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)\n")
    entry = [sys.executable, "-m", "fastdiff.cli.gd_run", str(script)]
    for ignored in (True, False):
        start = (lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)) if ignored else None
        r = subprocess.run(entry, capture_output=True, text=True, preexec_fn=start, timeout=120)
        assert (r.returncode, r.stdout) == (0, f"{ignored}\n"), r.stderr[-2000:]


# Prints 'started', then waits 60 s in short sleeps. One sleep(60) lost a signal that landed after
# Python's last check and before the sleep began (handled when the sleep returned, 60 s on: the
# test's whole timeout; it failed so once under a load of 8); a short sleep bounds that to 0.1 s.
WAIT_SCRIPT = "import time\nprint('started', flush=True)\nfor _ in range(600):\n    time.sleep(0.1)\n"


def test_the_wait_script_ends_on_a_signal_its_sleep_did_not_see():
    """A signal flagged while the child's sleep goes on (interrupt_main: as one that lands just
    before the sleep starts) is handled within one short sleep, not after the whole wait."""
    flag = "import _thread, threading\nthreading.Timer(0.2, _thread.interrupt_main).start()\n"
    code = WAIT_SCRIPT.replace("for ", flag + "for ")  # once the wait has begun
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert r.returncode == -signal.SIGINT and "KeyboardInterrupt" in r.stderr, r.stderr


def test_gd_runs_own_entry_point_ends_as_the_group_does(tmp_path):
    """`python -m fastdiff.cli.gd_run` (README's torchrun form) ran the command without the group:
    SIGTERM killed it with no clean-up, Ctrl-C was 'Aborted!' and exit 1, a bad option click's
    usage block."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT_SCRIPT)
    entry = [sys.executable, "-m", "fastdiff.cli.gd_run"]
    for sig, code, line in ((signal.SIGTERM, 143, "terminated\n"), (signal.SIGINT, 130, "interrupted\n")):
        p = subprocess.Popen([*entry, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "started\n"
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        assert (p.returncode, err) == (code, line)
    r = subprocess.run([*entry, "--bogus", str(script)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr  # unknown options are SCRIPT's
    assert r.stderr.startswith("Error: Invalid value for 'SCRIPT': File '--bogus' does not exist."), r.stderr


def test_a_gd_run_scripts_cycles_are_still_collected_at_exit(tmp_path):
    """The commands leave what is alive at exit to the OS (gc.freeze: the last collections walk
    torch's objects, 0.2-0.4 s); a script gd-run runs keeps the interpreter's exit, which
    finalizes its garbage cycles (here one whose __del__ prints, as a file would flush)."""
    script = tmp_path / "cycle.py"
    script.write_text(
        "import gc\ngc.disable()\n"
        "class Node:\n    def __del__(self):\n        print('finalized', flush=True)\n"
        "node = Node()\nnode.me = node\ndel node\n"
    )
    entry = [sys.executable, "-m", "fastdiff.cli.gd_run", str(script)]
    r = subprocess.run(entry, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "finalized\n"), r.stderr[-2000:]


def test_a_command_that_imported_triton_ends_without_nanobinds_leak_report():
    """Leaving the objects alive at exit to the OS (a CPU run's 0.2-0.4 s) made triton's
    nanobind bindings print "nanobind: leaked 4 instances!" and a line per object on stderr at
    the end of every command that had imported triton (a GPU run)."""
    pytest.importorskip("triton")
    code = (
        "from fastdiff.cli.main import LazyGroup\nLazyGroup().get_command(None, 'presets')\n"
        "import triton  # noqa: F401\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr[-2000:]


@pytest.fixture
def stand_in_libc(monkeypatch):
    """The C library as the CLI's malloc tuning sees it: ``confstr`` set by the test, ``mallopt``
    recording its calls; no MALLOC_ or GLIBC_TUNABLES setting of the caller's."""
    import ctypes
    import os

    for k in list(os.environ):
        if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES":
            monkeypatch.delenv(k)
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    return calls


def _confstr_raising(error):
    def confstr(name):
        raise error

    return confstr


@pytest.mark.parametrize("platform", ["musl", "an older musl", "macOS", "Windows"])
def test_a_c_library_other_than_glibc_leaves_malloc_as_it_is(stand_in_libc, monkeypatch, platform):
    """On musl (Alpine) every command died of confstr's OSError before it began (musl defines
    _CS_GNU_LIBC_VERSION, so Python lists the name, but its confstr answers EINVAL): only glibc's
    malloc is tuned, and the others' commands run untouched."""
    import os

    if platform == "musl":
        monkeypatch.setattr(os, "confstr", _confstr_raising(OSError(22, "Invalid argument")))
    elif platform == "an older musl":
        monkeypatch.setattr(os, "confstr", lambda name: "")
    elif platform == "macOS":
        monkeypatch.delitem(os.confstr_names, "CS_GNU_LIBC_VERSION", raising=False)
        monkeypatch.setattr(os, "confstr", _confstr_raising(ValueError("unrecognized configuration name")))
    else:
        monkeypatch.delattr(os, "confstr", raising=False)
        monkeypatch.delattr(os, "confstr_names", raising=False)
    r = CliRunner().invoke(main, ["presets"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert stand_in_libc == []


def test_glibcs_malloc_keeps_freed_memory_unless_the_user_tuned_it(stand_in_libc, monkeypatch):
    import os

    monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.41")
    assert CliRunner().invoke(main, ["presets"]).exit_code == 0
    assert stand_in_libc == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    stand_in_libc.clear()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert CliRunner().invoke(main, ["presets"]).exit_code == 0
    assert stand_in_libc == []
