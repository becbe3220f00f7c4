"""The shipped systemd units, as systemd itself reads them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[3] / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze")


UNIT_FILES = (
    "ipam-da-consul-helper.service", "ipam-da-consul-helper.socket",
    "ipam-da-consul-usage.service", "ipam-da-consul-usage.timer",
    "ipam-da-consul-reconcile.service", "ipam-da-consul-reconcile.timer",
)


@pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # ExecStart must name an executable here, and /opt/cni/bin may hold none: every other line
    # is checked as shipped. systemd-analyze exits 0 on an unknown key or a bad value, so
    # anything it says is a failure. The man pages their Documentation= names are the Debian
    # package's (tests/e2e/test_deb.py), not installed here.
    swapped = 0
    for unit in UNIT_FILES:
        text, n = re.subn(r"/opt/cni/bin/ipam-da-consul-(helper|admin)\b", "/usr/bin/true",
                          (UNITS / unit).read_text())
        swapped += n
        (tmp_path / unit).write_text(text)
    assert swapped == 4  # the helper, the usage and reconcile runs, and its unit's comment
    out = subprocess.run(
        [str(ANALYZE), "verify", "--man=no", *(str(tmp_path / u) for u in UNIT_FILES)],
        capture_output=True, text=True, timeout=60,
    )
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_the_timers_do_nothing_until_configured() -> None:
    """Both timers are enabled by the package; what they run is chosen in
    /etc/default/ipam-da-consul, and an empty setting skips the run (ExecCondition=)."""
    for unit, setting in (("ipam-da-consul-usage.service", "USAGE_TEXTFILE"),
                          ("ipam-da-consul-reconcile.service", "RECONCILE_LIVE_CMD")):
        text = (UNITS / unit).read_text()
        assert f"""ExecCondition=/bin/sh -c 'test -n "${setting}"'""" in text, unit
        assert "EnvironmentFile=-/etc/default/ipam-da-consul" in text, unit
        default = (UNITS.parent / "debian" / "ipam-da-consul.default").read_text()
        assert re.search(rf"^{setting}=$", default, re.M), setting


def test_the_helper_has_room_for_its_descriptors() -> None:
    # Well above systemd's soft default of 1024: see the comment in the unit.
    found = re.search(
        r"^LimitNOFILE=(\d+)$", (UNITS / "ipam-da-consul-helper.service").read_text(), re.M
    )
    assert found and int(found.group(1)) >= 4096
