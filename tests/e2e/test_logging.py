"""Logging through the installed executables: stdout carries only CNI JSON, warnings and errors go
to stderr, the verbose flavour writes a debug log (and never an ACL token)."""

from __future__ import annotations

import json
import re

import pytest

from ipam_da_consul import __version__
from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import put_alloc

ADD_STATES = [
    "state start -> parsed (parse)",
    "state parsed -> connected (connect)",
    "state connected -> pool_loaded (next_pool)",
    "state pool_loaded -> ip_picked (pick_ip)",
    "state ip_picked -> pool_done (write)",
    "state pool_done -> done (emit)",
]


def state_lines(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"state \w+ -> \w+ \(\w+\)", text)]


@pytest.mark.parametrize("verbose", [False, True])
def test_stdout_carries_only_cni_json(consul, make_pool, conf_for, tmp_path, verbose):
    pool = make_pool()
    env = {"IPAM_DA_CONSUL_LOG_FILE": str(tmp_path / "plugin.log")}
    add = run_plugin("ADD", conf_for(pool), container="quiet", verbose=verbose, env=env)
    assert add.rc == 0 and add.stderr == "", add
    assert add.stdout.count("\n") == 1 and add.stdout.endswith("}\n"), add
    assert json.loads(add.stdout)["ips"][0]["address"] == "10.0.21.100/23"

    failed = run_plugin("ADD", conf_for(f"{pool}-absent"), verbose=verbose, env=env)
    assert failed.rc == 114, failed
    assert failed.stdout.count("\n") == 1 and json.loads(failed.stdout)["code"] == 114
    # Errors always reach stderr, in both flavours.
    assert "ERROR" in failed.stderr and f"{pool}-absent" in failed.stderr, failed
    assert not failed.stderr.lstrip().startswith("{")

    gone = run_plugin("DEL", conf_for(pool), container="quiet", verbose=verbose, env=env)
    assert (gone.rc, gone.stdout, gone.stderr) == (0, "", ""), gone
    assert (tmp_path / "plugin.log").exists() == verbose  # only the verbose flavour logs


def test_verbose_debug_log(consul, make_pool, conf_for, tmp_path):
    pool = make_pool()
    log = tmp_path / "missing" / "folders" / "ipam.log"  # created on demand
    out = run_plugin("ADD", conf_for(pool), container="logged", verbose=True,
                     env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
    assert out.rc == 0 and out.stderr == "", out
    text = log.read_text()
    first = text.splitlines()[0]  # the version at start, with the command and the container
    assert f"ipam-da-consul {__version__}" in first and "ADD" in first and "logged" in first
    assert consul.url in text and pool in text  # the config
    assert state_lines(text) == ADD_STATES  # each state transition, in order
    url = re.escape(consul.url)
    # each Consul request with its status and latency
    assert re.search(rf"GET {url}/v1/status/leader -> 200 in \d+(\.\d+)? ms", text), text
    assert re.search(rf"PUT {url}/v1/txn -> 200 in \d+(\.\d+)? ms", text), text
    chosen = [line for line in text.splitlines() if "10.0.21.100" in line and "PUT" not in line]
    assert chosen, text  # the address chosen


def test_verbose_log_appends_and_records_failures(consul, conf_for, tmp_path):
    log = tmp_path / "ipam.log"
    env = {"IPAM_DA_CONSUL_LOG_FILE": str(log)}
    first = run_plugin("ADD", conf_for("absent-pool-for-log"), verbose=True, env=env)
    second = run_plugin("ADD", conf_for("absent-pool-for-log"), verbose=True, env=env)
    assert first.rc == second.rc == 114
    text = log.read_text()
    assert state_lines(text).count("state connected -> failed (fail)") == 2
    assert text.count(f"ipam-da-consul {__version__}") == 2


def test_unwritable_log_path_is_a_warning_not_a_failure(consul, make_pool, conf_for, tmp_path):
    pool = make_pool()
    blocker = tmp_path / "regular-file"
    blocker.write_text("not a folder")
    path = blocker / "sub" / "ipam.log"
    out = run_plugin("ADD", conf_for(pool), container="nolog", verbose=True,
                     env={"IPAM_DA_CONSUL_LOG_FILE": str(path)})
    assert out.rc == 0, out
    assert out.json["ips"][0]["address"] == "10.0.21.100/23"
    assert str(path) in out.stderr and "WARNING" in out.stderr, out
    assert consul.allocations(pool) == {"10.0.21.100": "nolog"}
    assert blocker.read_text() == "not a folder"


def test_token_never_logged(consul, make_pool, conf_for, tmp_path):
    token = "f00dfeed-5ec2-e7a1-b0b0-70c0e2a1d0ne"
    env_token = "0ther5ecret-from-the-environment"
    pool = make_pool()
    put_alloc(consul, pool, "10.0.21.120", "previous")  # a take-over logs a warning too
    log = tmp_path / "ipam.log"
    env = {"IPAM_DA_CONSUL_LOG_FILE": str(log), "CONSUL_HTTP_TOKEN": env_token}
    outs = [
        run_plugin("ADD", conf_for({"name": pool, "requested-ip": "10.0.21.120"},
                                   consul_token=token), container="secretive",
                   verbose=True, env=env),
        run_plugin("ADD", conf_for(f"{pool}-absent", consul_token=token), verbose=True, env=env),
        run_plugin("DEL", conf_for(pool, consul_token=token), container="secretive",
                   verbose=True, env=env),
    ]
    assert [o.rc for o in outs] == [0, 114, 0], outs
    assert "previous" in outs[0].stderr  # stderr did get lines, none with the token
    text = log.read_text()
    assert "<redacted>" in text  # the config is logged, its secret is not
    for blob in [text] + [o.stdout + o.stderr for o in outs]:
        assert token not in blob
        assert env_token not in blob
