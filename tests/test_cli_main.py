"""The `fastdiff` group: its --help lists every command without importing torch."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from fastdiff.cli.main import LazyGroup, main


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom fastdiff.cli.main import main\n"
        "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules, 'fastdiff --help imported torch'\nprint(r.output)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in LazyGroup.commands_by_name:
        assert name in out


def test_summaries_are_the_commands_own_first_lines():
    group = LazyGroup()
    for name in group.commands_by_name:
        command = group.get_command(None, name)
        first = command.help.strip().splitlines()[0]
        assert LazyGroup.summaries[name] == first, name
    assert CliRunner().invoke(main, ["sample", "--help"]).exit_code == 0
