"""VERSION through the installed executable: no Consul, no container needed."""

from __future__ import annotations

import pytest
from ipam_da_consul.cni.schemas import SUPPORTED_VERSIONS

from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("verbose", [False, True])
def test_version_lists_supported_versions(version, verbose, tmp_path):
    out = run_plugin("VERSION", {"cniVersion": version}, container=None, ifname=None,
                     verbose=verbose, env={"IPAM_DA_CONSUL_LOG_FILE": str(tmp_path / "v.log")})
    assert (out.rc, out.stderr) == (0, ""), out
    assert out.stdout.endswith("\n") and out.stdout.count("\n") == 1
    assert out.json == {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
    assert {"0.4.0", "1.0.0"} <= set(out.json["supportedVersions"])


def test_version_with_empty_stdin():
    out = run_plugin("VERSION", b"", container=None, ifname=None)
    assert out.rc == 0, out
    assert out.json["supportedVersions"] == list(SUPPORTED_VERSIONS)
    assert out.json["cniVersion"] in SUPPORTED_VERSIONS


def test_version_ignores_the_rest_of_the_config():
    # A whole network config, even one ADD would reject, is fine for VERSION.
    conf = {"cniVersion": "1.0.0", "name": "n", "ipam": {"consul_servers": []}}
    out = run_plugin("VERSION", conf, container=None, ifname=None)
    assert out.rc == 0, out
    assert out.json == {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
