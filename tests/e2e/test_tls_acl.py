"""ACL tokens, TLS and datacenter/prefix options against a real Consul 1.8.7 that demands them:
ACLs on with default policy deny, and an HTTPS port that requires a client certificate. The
installed plugin runs as a subprocess, standalone (`ipam.pools`), as a runtime would run it:
every test runs once in-process and once through the optional helper (`ipam-da-consul-helper`),
whose cache and logging are a second path a token or an ACL refusal could get lost in."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.agent import SecureConsulAgent, TLSFiles
from tests.support.plugin import Outcome, executable, run_plugin

RANGES = [
    {
        "subnet": "10.0.30.0/24",
        "rangeStart": "10.0.30.10",
        "rangeEnd": "10.0.30.20",
        "gateway": "10.0.30.1",
    }
]
# What the README asks of a plugin's token: its pools (and their fences), and sessions, which
# end the fences (and releases cooling down) on Consul's time.
KEY_RULES = (
    'key_prefix "ipam/" { policy = "write" }\nkey_prefix "custom/ipam/" { policy = "write" }'
)
WRITE_RULES = KEY_RULES + '\nsession_prefix "" { policy = "write" }'
READ_RULES = 'key_prefix "ipam/" { policy = "read" }'
_names = itertools.count()


class Secure:
    """The agent plus the tokens and files the tests hand to the plugin."""

    def __init__(self, agent: SecureConsulAgent, directory: Path) -> None:
        self.agent = agent
        self.tls: TLSFiles = agent.tls
        self.dir = directory
        self.write_token = agent.create_token("ipam-write", WRITE_RULES)
        self.keys_token = agent.create_token("ipam-keys-only", KEY_RULES)
        self.read_token = agent.create_token("ipam-read", READ_RULES)
        # A CA that did not sign the server's certificate.
        self.other = TLSFiles(directory / "other")

    def cert_keys(self) -> dict[str, str]:
        return {
            "consul_ca_file": self.tls.ca,
            "consul_cert_file": self.tls.client_cert,
            "consul_key_file": self.tls.client_key,
        }

    def cert_env(self) -> dict[str, str]:
        return {
            "CONSUL_CACERT": self.tls.ca,
            "CONSUL_CLIENT_CERT": self.tls.client_cert,
            "CONSUL_CLIENT_KEY": self.tls.client_key,
        }


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    directory = tmp_path_factory.mktemp("secure-consul")
    agent = SecureConsulAgent(directory).start()
    try:
        yield Secure(agent, directory)
    finally:
        agent.close()


class Helper:
    def __init__(self, socket: Path, proc: subprocess.Popen[bytes], stderr: Path) -> None:
        self.socket = socket
        self.proc = proc
        self.stderr = stderr


@pytest.fixture(scope="module")
def helper(secure: Secure) -> Iterator[Helper]:
    sock = secure.dir / "run" / "helper.sock"
    stderr = secure.dir / "helper.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [executable("ipam-da-consul-helper"), "--socket", str(sock)], stderr=err
        )
    try:
        end = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < end, "the helper did not create its socket"
            time.sleep(0.05)
        yield Helper(sock, proc, stderr)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


Runner = Callable[..., Outcome]


@pytest.fixture(params=["in-process", "helper"])
def plugin(request: pytest.FixtureRequest) -> Runner:
    """run_plugin, in-process or through the module's helper."""
    via: dict[str, str] = {}
    if request.param == "helper":
        via["IPAM_DA_CONSUL_SOCKET"] = str(request.getfixturevalue("helper").socket)

    def run(
        command: str, conf: dict[str, Any], env: dict[str, str] | None = None, **kw: Any
    ) -> Outcome:
        return run_plugin(command, conf, env=(env or {}) | via, **kw)

    return run


@pytest.fixture
def pool(secure: Secure) -> str:
    return secure.agent.create_pool(f"tls-{os.getpid()}-{next(_names)}", RANGES)


def conf(secure: Secure, pool: str, **ipam: Any) -> dict[str, Any]:
    """A standalone network config (pools in `ipam.pools`) naming the HTTPS server."""
    return {
        "cniVersion": "1.0.0",
        "name": "securenet",
        "type": "bridge",
        "ipam": {
            "type": "ipam-da-consul",
            "consul_servers": [secure.agent.url],
            "pools": [{"name": pool}],
            "pick": "lowest",  # tests name the address a call gets
            **ipam,
        },
    }


def with_prev(config: dict[str, Any], prev: dict[str, Any]) -> dict[str, Any]:
    return {**config, "prevResult": prev}


def assert_error(out: Outcome, code: int, *words: str) -> str:
    assert out.rc == code, out
    body = out.json
    assert body["code"] == code, out
    assert "Traceback" not in out.stdout
    for word in words:
        assert word in body["msg"], out
    return str(body["msg"])


def test_consul_demands_credentials(secure: Secure) -> None:
    """What the other tests build on: the leader check answers without a token in 1.8.7 (the
    plugin sends its token there anyway), KV refuses without one, HTTPS refuses without a
    client certificate."""
    s = requests.Session()
    s.trust_env = False
    url, certs = secure.agent.url, (secure.tls.client_cert, secure.tls.client_key)
    leader = s.get(f"{url}/v1/status/leader", verify=secure.tls.ca, cert=certs, timeout=5)
    assert leader.status_code == 200 and leader.json()
    kv = s.get(f"{url}/v1/kv/ipam/anything", verify=secure.tls.ca, cert=certs, timeout=5)
    assert kv.status_code == 403
    with pytest.raises(requests.exceptions.SSLError):
        s.get(f"{url}/v1/status/leader", verify=secure.tls.ca, timeout=5)


# Each way of giving the token, and each way of giving the certificates, at least once.
@pytest.mark.parametrize(
    ("token_via", "certs_via"),
    [("ipam", "ipam"), ("ipam_file", "env"), ("env", "ipam"), ("env_file", "env")],
)
def test_add_check_del_with_token_and_client_cert(
    plugin: Runner, secure: Secure, pool: str, token_via: str, certs_via: str, tmp_path: Path
) -> None:
    ipam: dict[str, Any] = secure.cert_keys() if certs_via == "ipam" else {}
    env: dict[str, str] = secure.cert_env() if certs_via == "env" else {}
    token_file = tmp_path / "token"
    token_file.write_text(secure.write_token + "\n")  # files usually end in a newline
    if token_via == "ipam":
        ipam["consul_token"] = secure.write_token
    elif token_via == "ipam_file":
        ipam["consul_token_file"] = str(token_file)
    elif token_via == "env":
        env["CONSUL_HTTP_TOKEN"] = secure.write_token
    else:
        env["CONSUL_HTTP_TOKEN_FILE"] = str(token_file)
    config = conf(secure, pool, **ipam)
    container = f"tls-{token_via}-{certs_via}"

    add = plugin("ADD", config, container=container, env=env)
    assert add.rc == 0, add
    assert [ip["address"] for ip in add.json["ips"]] == ["10.0.30.10/24"]
    assert add.json["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.0.30.1"}]
    assert secure.agent.allocations(pool) == {"10.0.30.10": container}

    check = plugin("CHECK", with_prev(config, add.json), container=container, env=env)
    assert check.rc == 0, check

    delete = plugin("DEL", with_prev(config, add.json), container=container, env=env)
    assert delete.rc == 0, delete
    assert secure.agent.allocations(pool) == {}
    assert secure.agent.get(f"ipam/{pool}/") == b""  # the folder key stays


def test_ipam_token_wins_over_environment(plugin: Runner, secure: Secure, pool: str) -> None:
    config = conf(secure, pool, consul_token=secure.write_token, **secure.cert_keys())
    out = plugin("ADD", config, container="c-prec", env={"CONSUL_HTTP_TOKEN": "not-a-token"})
    assert out.rc == 0, out
    assert secure.agent.allocations(pool) == {"10.0.30.10": "c-prec"}


@pytest.mark.parametrize(
    "token", [None, "00000000-0000-0000-0000-000000000000"], ids=["no-token", "unknown-token"]
)
def test_without_a_valid_token_add_fails_with_a_hint(
    plugin: Runner, secure: Secure, pool: str, token: str | None
) -> None:
    ipam = secure.cert_keys() | ({"consul_token": token} if token else {})
    before = secure.agent.kv_index()
    out = plugin("ADD", conf(secure, pool, **ipam), container="c-denied")
    assert_error(out, 111, "403", "ACL token")
    assert secure.agent.allocations(pool) == {}
    assert secure.agent.kv_index() == before


@pytest.mark.parametrize("with_prev_result", [True, False])
def test_del_without_a_token_fails_instead_of_finding_nothing(
    plugin: Runner, secure: Secure, pool: str, with_prev_result: bool
) -> None:
    """Consul hides unreadable keys from a listing (404, not 403): a DEL without permissions
    must report them, not "nothing of ours" and leak the key. Its first request is the
    attachment's fence, a write: refused, 125."""
    writer = conf(secure, pool, consul_token=secure.write_token, **secure.cert_keys())
    add = plugin("ADD", writer, container="c-del-denied")
    assert add.rc == 0, add
    anonymous = conf(secure, pool, **secure.cert_keys())
    if with_prev_result:
        anonymous = with_prev(anonymous, add.json)
    out = plugin("DEL", anonymous, container="c-del-denied")
    assert_error(out, 125, "403", "ACL token", "ipam/.fences/")
    assert secure.agent.allocations(pool) == {"10.0.30.10": "c-del-denied"}


def test_fences_go_with_a_session_and_without_session_rights_stay(
    plugin: Runner, secure: Secure, pool: str
) -> None:
    """A DEL's fence is tied to a session (the token may create sessions), which Consul ends
    an hour later at the earliest. A token without session rights still gets its fence, kept
    until an operator removes it, with a warning naming the missing right."""
    agent = secure.agent
    for token, container in ((secure.write_token, "c-fence-s"), (secure.keys_token, "c-fence-k")):
        c = conf(secure, pool, consul_token=token, **secure.cert_keys())
        assert plugin("ADD", c, container=container).rc == 0
        gone = plugin("DEL", c, container=container)
        assert gone.rc == 0, gone
        def get(path: str) -> Any:
            return agent.http.get(
                f"{agent.url}{path}", verify=agent.verify, cert=agent.cert, timeout=10
            ).json()

        [fence] = get(f"/v1/kv/ipam/.fences/securenet/{container}/eth0")
        if token == secure.write_token:
            session = get(f"/v1/session/info/{fence['Session']}")[0]
            assert float(session["TTL"].rstrip("s")) >= 3600 and session["Behavior"] == "delete"
        else:
            assert not fence.get("Session")
            assert "session" in gone.stderr and "fences" in gone.stderr, gone


def test_read_only_token_cannot_allocate_or_release(
    plugin: Runner, secure: Secure, pool: str
) -> None:
    read_only = conf(secure, pool, consul_token=secure.read_token, **secure.cert_keys())
    before = secure.agent.kv_index()
    out = plugin("ADD", read_only, container="c-ro")
    assert_error(out, 125, "403", "ACL token")
    assert secure.agent.allocations(pool) == {}
    assert secure.agent.kv_index() == before

    # An allocation made with the write token survives a DEL attempted with the read token.
    writer = conf(secure, pool, consul_token=secure.write_token, **secure.cert_keys())
    add = plugin("ADD", writer, container="c-ro")
    assert add.rc == 0, add
    out = plugin("DEL", with_prev(read_only, add.json), container="c-ro")
    assert_error(out, 125, "403", "ACL token")
    assert secure.agent.allocations(pool) == {"10.0.30.10": "c-ro"}


@pytest.mark.parametrize("case", ["wrong-ca", "no-client-cert", "no-ca"])
def test_tls_failure_is_reported_as_unreachable_tls(
    plugin: Runner, secure: Secure, pool: str, case: str
) -> None:
    ipam: dict[str, Any] = secure.cert_keys() | {"consul_token": secure.write_token, "timeout": 1.5}
    if case == "wrong-ca":
        ipam["consul_ca_file"] = secure.other.ca
    elif case == "no-client-cert":
        del ipam["consul_cert_file"], ipam["consul_key_file"]
    else:
        del ipam["consul_ca_file"]  # the system CAs do not know the test CA
    before = secure.agent.kv_index()
    out = plugin("ADD", conf(secure, pool, **ipam), container="c-tls")
    assert_error(out, 11, "no Consul server could be reached", secure.agent.url, "TLS")
    assert secure.agent.kv_index() == before


def test_token_never_appears_in_output_or_verbose_log(
    plugin: Runner, secure: Secure, pool: str, tmp_path: Path
) -> None:
    log = tmp_path / "verbose.log"
    token_file = tmp_path / "token"
    token_file.write_text(secure.write_token)
    runs: list[Outcome] = []
    base = {"IPAM_DA_CONSUL_LOG_FILE": str(log)}
    # Success paths, with the token in the config, in a file and in the environment.
    by_key = conf(secure, pool, consul_token=secure.write_token, **secure.cert_keys())
    by_file = conf(secure, pool, consul_token_file=str(token_file), **secure.cert_keys())
    by_env = conf(secure, pool, **secure.cert_keys())
    env = base | {"CONSUL_HTTP_TOKEN": secure.write_token}
    add = plugin("ADD", by_key, container="c-log", env=base, verbose=True)
    runs.append(add)
    assert add.rc == 0, add
    runs.append(
        plugin("CHECK", with_prev(by_file, add.json), container="c-log", env=base, verbose=True)
    )
    runs.append(
        plugin("DEL", with_prev(by_env, add.json), container="c-log", env=env, verbose=True)
    )
    assert [r.rc for r in runs] == [0, 0, 0], runs
    # Failure paths: a refused write and a TLS failure log errors and warnings.
    read_only = conf(secure, pool, consul_token=secure.read_token, **secure.cert_keys())
    runs.append(plugin("ADD", read_only, container="c-log", env=base, verbose=True))
    bad_tls = conf(
        secure,
        pool,
        consul_token=secure.write_token,
        timeout=0.5,
        **(secure.cert_keys() | {"consul_ca_file": secure.other.ca}),
    )
    runs.append(plugin("ADD", bad_tls, container="c-log", env=base, verbose=True))
    assert [r.rc for r in runs[3:]] == [125, 11], runs

    text = log.read_text()
    assert "<redacted>" in text  # the config was logged, with the token hidden
    assert "/v1/kv/ipam/" in text  # requests were logged
    # The helper's own stderr, when it served these calls (empty or absent otherwise).
    helper_err = secure.dir / "helper.stderr"
    helper_text = helper_err.read_text() if helper_err.exists() else ""
    for secret in (secure.write_token, secure.read_token):
        assert secret not in text
        assert secret not in helper_text
        for r in runs:
            assert secret not in r.stdout and secret not in r.stderr


def test_custom_kv_prefix(plugin: Runner, secure: Secure) -> None:
    name = secure.agent.create_pool(
        f"tls-{os.getpid()}-{next(_names)}", RANGES, prefix="custom/ipam/"
    )
    config = conf(
        secure,
        name,
        consul_token=secure.write_token,
        kv_prefix="custom/ipam/",
        **secure.cert_keys(),
    )
    add = plugin("ADD", config, container="c-prefix")
    assert add.rc == 0, add
    assert secure.agent.allocations(name, prefix="custom/ipam/") == {"10.0.30.10": "c-prefix"}
    assert secure.agent.tree(f"ipam/{name}") == {}
    delete = plugin("DEL", with_prev(config, add.json), container="c-prefix")
    assert delete.rc == 0, delete
    assert secure.agent.allocations(name, prefix="custom/ipam/") == {}

    # The default prefix does not see that pool.
    default = conf(secure, name, consul_token=secure.write_token, **secure.cert_keys())
    assert_error(plugin("ADD", default, container="c-prefix"), 114, name)


def test_datacenter_dc1_works(plugin: Runner, secure: Secure, pool: str) -> None:
    config = conf(
        secure, pool, consul_token=secure.write_token, consul_datacenter="dc1", **secure.cert_keys()
    )
    add = plugin("ADD", config, container="c-dc")
    assert add.rc == 0, add
    assert secure.agent.allocations(pool) == {"10.0.30.10": "c-dc"}
    delete = plugin("DEL", with_prev(config, add.json), container="c-dc")
    assert delete.rc == 0, delete
    assert secure.agent.allocations(pool) == {}


def test_unknown_datacenter_fails_clearly(plugin: Runner, secure: Secure, pool: str) -> None:
    config = conf(
        secure,
        pool,
        consul_token=secure.write_token,
        consul_datacenter="dc-nowhere",
        timeout=3.0,
        **secure.cert_keys(),
    )
    before = secure.agent.kv_index()
    out = plugin("ADD", config, container="c-dc")
    msg = assert_error(out, 111, "dc-nowhere", "check the datacenter")
    assert "No path to datacenter" in msg
    assert secure.agent.kv_index() == before
    assert json.loads(out.stdout)["cniVersion"] == "1.0.0"
