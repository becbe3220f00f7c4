"""The shipped systemd units, as systemd itself reads them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[3] / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for unit in ("ipam-da-consul-helper.service", "ipam-da-consul-helper.socket"):
        shutil.copy(UNITS / unit, tmp_path / unit)
    service = tmp_path / "ipam-da-consul-helper.service"
    # ExecStart must name an executable here, and /opt/cni/bin may hold none: every other line
    # is checked as shipped. systemd-analyze exits 0 on an unknown key or a bad value, so
    # anything it says is a failure.
    text, swapped = re.subn(
        r"^ExecStart=/opt/cni/bin/ipam-da-consul-helper", "ExecStart=/usr/bin/true",
        service.read_text(), flags=re.MULTILINE,
    )
    assert swapped == 1
    service.write_text(text)
    out = subprocess.run(
        [str(ANALYZE), "verify", str(service), str(tmp_path / "ipam-da-consul-helper.socket")],
        capture_output=True, text=True, timeout=60,
    )
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_the_helper_has_room_for_its_descriptors() -> None:
    # Well above systemd's soft default of 1024: see the comment in the unit.
    found = re.search(
        r"^LimitNOFILE=(\d+)$", (UNITS / "ipam-da-consul-helper.service").read_text(), re.M
    )
    assert found and int(found.group(1)) >= 4096
