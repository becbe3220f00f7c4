"""`bash scripts/demo.sh`, the README's first command (issue 22, finding 10): it does what the
README says and only that (the virtualenv and the Consul binary, no system package, no root
needed), prints only its own steps (no pip, setuptools or apt chatter), and shows the config it
used in the standalone style a runtime user writes (`ipam.pools`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_is_quiet_and_shows_its_standalone_config() -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CNI_", "CONSUL_", "IPAM_DA_"))}
    out = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stderr == "", out.stderr
    text = out.stdout
    for noise in ("setuptools", "Editable", "WARNING", "W: ", "apt", "pip", "Traceback"):
        assert noise not in text, (noise, text)
    # Its own steps: setup's two lines (the virtualenv, Consul), then the demo's.
    assert len([line for line in text.splitlines() if line.startswith("setup: ")]) == 2, text
    assert "$ ipam-da-consul-admin create demo-pool --range" in text
    # The network config, as a runtime user writes it: the pools in the ipam section.
    shown = json.loads(re.search(r"^\{\n.*?^\}$", text, re.M | re.S).group(0))  # type: ignore[union-attr]
    assert shown["ipam"]["type"] == "ipam-da-consul"
    assert shown["ipam"]["pools"] == [{"name": "demo-pool"}]
    assert "prevResult" not in shown and "delegates" not in shown["ipam"]
    for command in ("ADD", "CHECK", "DEL"):
        assert f"$ CNI_COMMAND={command} " in text
    assert text.count("[exit 0]") == 5, text
    assert "nothing left under ipam/demo-pool/" in text
    # Only what the README says: nothing installed outside this folder, no system package.
    log = (ROOT / ".cache" / "setup.log").read_text()
    assert "apt-get install" not in log and "Setting up" not in log
