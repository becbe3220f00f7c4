"""The real helper's memory bounds: its options and many tokens against a real Consul."""

from __future__ import annotations

import pytest

from tests.support.plugin import run_plugin
from tests.support.util_procs import Helper


def test_real_helper_keeps_few_caches_for_many_tokens(consul, make_pool, conf_for, tmp_path):
    pools = [make_pool(), make_pool()]
    helper = Helper(tmp_path, args=["--max-settings", "3", "--max-pools", "4"])
    try:
        for t in range(6):
            for pool in pools:
                conf = conf_for(pool, consul_token=f"token-{t}")
                out = run_plugin("ADD", conf, container=f"tok-{t}", env=helper.env)
                assert out.rc == 0, out
        stats = helper.stats()
    finally:
        helper.close()
    assert stats["served"] == 12, stats
    assert stats["caches"] == 3 and stats["pools"] == 4, stats


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_bounds_must_be_positive(bad, tmp_path):
    import subprocess

    from tests.support.plugin import executable

    out = subprocess.run(
        [executable("ipam-da-consul-helper"), "--socket", str(tmp_path / "s"), "--max-pools", bad],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "at least 1" in out.stderr
