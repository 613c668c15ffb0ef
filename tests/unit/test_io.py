"""Atomic writers: a failure leaves the old result (or nothing) and no temporary files."""
import os

import pytest

from circuit_discovery.io import atomic_dir, atomic_write_json, atomic_write_text, read_json


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert read_json(p) == {"a": 2}
    assert os.listdir(p.parent) == ["x.json"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # usual permissions, not mkstemp's 0600


def test_atomic_dir_commits_or_leaves_old(tmp_path):
    final = tmp_path / "sae"
    with atomic_dir(final) as d:
        atomic_write_text(d / "cfg.json", "{}")
    assert (final / "cfg.json").read_text() == "{}"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            atomic_write_text(d / "cfg.json", '{"new": 1}')
            raise RuntimeError("killed half way")
    assert (final / "cfg.json").read_text() == "{}"  # the old folder survives
    assert sorted(os.listdir(tmp_path)) == ["sae"]  # no temporary folder left
