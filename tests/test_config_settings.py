"""Every setting carries its default, help and check in one place, and `essa COMMAND --help` lists them."""

from __future__ import annotations

import pytest

from essa.cli import main
from essa.config import Config, settings


def test_every_setting_has_help_text():
    found = settings()
    assert len(found) > 60
    missing = [s.key for s in found if len(s.help) < 10]
    assert not missing, missing


def test_settings_defaults_are_the_config_defaults():
    cfg = Config().to_dict()
    for s in settings():
        section, *rest = s.key.split(".")
        value = cfg[section] if not rest else cfg[section][rest[0]]
        assert value == s.default, s.key


@pytest.mark.parametrize("command, shown, hidden", [
    ("train", ["essa.popsize = 8", "Candidates per generation", "decoding.max_new_tokens = 48",
               "task.options.reward_funcs = []"], ["grpo.lr = ", "compare.budget_s = ", "sft.lr = "]),
    ("sft", ["sft.lr = 0.001", "lora.rank = 8"], ["essa.popsize = ", "grpo.lr"]),
    ("compare", ["grpo.lr = 0.0001", "compare.budget_s = 1380.0", "essa.popsize = 8"], []),
])
def test_command_help_lists_its_config_keys(capsys, command, shown, hidden):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for text in shown:
        assert text in out, text
    for text in hidden:
        assert text not in out, text
