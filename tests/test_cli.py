"""The `livevlm` command: the table and the parser agree, and every subcommand has working --help."""

import subprocess
import sys

import pytest

from livevlm.app.cli import COMMANDS, build_parser, run


def test_every_table_entry_is_a_subcommand():
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*name.split(), "--help"])
        assert exit_info.value.code == 0


def test_no_command_prints_help_and_returns_2(capsys):
    assert run([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_console_script_help_runs_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "livevlm.app.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name.split()[0] in result.stdout


def test_a_command_group_lists_its_subcommands_in_the_top_level_help(capsys):
    with pytest.raises(SystemExit):
        build_parser({"stream": COMMANDS["stream"], "data convert": COMMANDS["data convert"],
                      "data encode": COMMANDS["data encode"]}).parse_args(["--help"])
    assert "data subcommands: convert, encode" in capsys.readouterr().out


def test_a_command_group_alone_prints_its_own_help_and_returns_2(capsys):
    assert run(["data"]) == 2
    assert "usage: livevlm data" in capsys.readouterr().out
