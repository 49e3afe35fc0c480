"""Registries: decorators, clear errors, and third-party entry points."""

import sys

import pytest

from leakbench.registry import ATTACKS, Registry, UnknownNameError


def test_duplicate_names_are_refused():
    registry = Registry("widget", "leakbench.attacks", "leakbench.test-none")
    registry.register("a")(type("First", (), {}))
    with pytest.raises(ValueError, match="widget name 'a' is already registered"):
        registry.register("a")(type("Second", (), {}))


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError, match="unknown attack 'x'; valid names: .*bias"):
        ATTACKS.get("x")


def test_third_party_attack_registers_through_an_entry_point(tmp_path, monkeypatch):
    package = tmp_path / "thirdparty_attack.py"
    package.write_text(
        "from leakbench import Attack, Reconstruction\n"
        "class Mine(Attack):\n"
        "    def reconstruct(self, observation):\n"
        "        raise NotImplementedError\n"
    )
    dist = tmp_path / "thirdparty_attack-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-attack\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[leakbench.attacks.test]\nmine = thirdparty_attack:Mine\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("attack", "leakbench.attacks", "leakbench.attacks.test")
    assert "mine" in registry.names()
    assert registry.get("mine").__name__ == "Mine"
    assert registry.get("mine").registered_name == "mine"
    sys.modules.pop("thirdparty_attack", None)
