"""`who-has IP`, `ip-of ID-OR-NAME` and `usage --warn-at`, through the installed CLI against a
real Consul: operators find holders by the runtime's own names (hashicorp/nomad#16779)."""

from __future__ import annotations

from tests.e2e.test_admin import PROBLEMS, STATE, admin, assert_fails, create
from tests.e2e.test_runtime_names import ALLOC_ID, CONTAINERD, NOMAD, cni_args
from tests.support.plugin import run_plugin


def test_who_has_and_ip_of_by_runtime_names(consul, pool_name, conf_for):
    create(consul, pool_name, "10.0.50.0/24,10.0.50.10-10.0.50.50")
    pod = CONTAINERD["K8S_POD_INFRA_CONTAINER_ID"]
    assert run_plugin("ADD", conf_for(pool_name), container=pod,
                      env={"CNI_ARGS": cni_args(CONTAINERD)}).rc == 0
    assert run_plugin("ADD", conf_for(pool_name), container=ALLOC_ID,
                      env={"CNI_ARGS": cni_args(NOMAD)}).rc == 0
    out = admin(consul, "who-has", "10.0.50.10", "--json")
    assert out.rc == 0, out
    assert [(a["pool"], a["target"]) for a in out.json] == [(pool_name, pod)]
    assert out.json[0]["runtime"]["K8S_POD_NAME"] == "web-0"
    table = admin(consul, "who-has", "10.0.50.11")
    assert "web/frontend" in table.stdout and ALLOC_ID in table.stdout, table
    for name in ("prod/web-0", pod[:12], "web/frontend", ALLOC_ID, ALLOC_ID[:8]):
        out = admin(consul, "ip-of", name, "--json")
        assert out.rc == 0, (name, out)
        assert len(out.json) == 1, (name, out)
    assert [a["ip"] for a in admin(consul, "ip-of", "prod/web-0", "--json").json] == [
        "10.0.50.10"]
    # --pool: other tests leave broken pools in the shared agent, which would add notes.
    assert_fails(admin(consul, "who-has", "10.0.50.40", "--pool", pool_name), STATE,
                 "nobody holds 10.0.50.40")
    assert_fails(admin(consul, "ip-of", "prod/nothing", "--pool", pool_name), STATE,
                 "no allocation names")


def test_ip_of_a_podman_container_by_its_name(consul, pool_name, conf_for):
    """Podman 4's CNI backend passes `IgnoreUnknown=1;K8S_POD_NAME=<container name>` and no
    namespace (tests/e2e/test_podman.py sees it from a real Podman). Issue 22, finding 7:
    `ip-of nc2` found nothing, and `ip-of -/nc2` (as the NAME column showed it) was taken for
    an option."""
    create(consul, pool_name, "10.0.52.0/24,10.0.52.10-10.0.52.50")
    cid = "5f0c" * 16
    out = run_plugin("ADD", conf_for(pool_name), container=cid,
                     env={"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=nc2"})
    assert out.rc == 0, out
    for name in ("nc2", "-/nc2"):
        for args in (["ip-of", name, "--pool", pool_name], ["ip-of", "--pool", pool_name, name]):
            found = admin(consul, *args)
            assert found.rc == 0, (args, found)
            assert found.stdout.splitlines()[1].split() == [
                pool_name, "10.0.52.10", cid, "eth0", "testnet", found.stdout.split()[-2], "nc2"
            ], found
    assert_fails(admin(consul, "ip-of", "-/nc3", "--pool", pool_name), STATE,
                 "no allocation names '-/nc3'")


def test_usage_warn_at(consul, pool_name, conf_for):
    create(consul, pool_name, "10.0.51.0/24,10.0.51.10-10.0.51.13")  # four addresses
    for cid in ("w-1", "w-2", "w-3"):
        assert run_plugin("ADD", conf_for(pool_name), container=cid).rc == 0
    assert admin(consul, "usage", pool_name, "--warn-at", "80").rc == 0  # 75%
    out = admin(consul, "usage", pool_name, "--warn-at", "50%", "--json")
    assert out.rc == PROBLEMS, out
    assert out.json[0]["percent"] == 75.0  # the JSON is printed all the same
    assert "75.0% used, above --warn-at 50%" in out.stderr
