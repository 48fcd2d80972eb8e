"""`intrafusion --help` lists every subcommand with its one line; each subcommand's --help groups
its flags as the docs do (what to prune, budget, method, data, output)."""
from __future__ import annotations

import argparse

import pytest

from intrafusion.cli import COMMANDS, command_parser, package_parser

GROUPS = {
    "grid": ["what to prune", "budget", "method", "data", "output", "where and how it runs"],
    "compress": ["what to prune", "budget", "method", "data", "output", "where it runs"],
    "evaluate": ["what to evaluate", "data", "output", "where it runs"],
    "train": ["model", "data", "training", "output"],
}


def test_package_help_lists_each_command_with_its_summary():
    text = " ".join(package_parser().format_help().split())
    for name, command in COMMANDS.items():
        assert f"{name} {' '.join(command.summary.split())}" in text


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_every_flag_of_a_command_is_in_one_of_its_named_groups(name):
    parser = command_parser(name)
    titled = {g.title: g for g in parser._action_groups if g._group_actions}
    assert [t for t in titled if t not in ("options", "positional arguments")] == GROUPS[name]
    loose = [a.option_strings for a in titled.get("options", argparse._ArgumentGroup(parser, "x"))._group_actions
             if not isinstance(a, argparse._HelpAction)]
    assert loose == []
