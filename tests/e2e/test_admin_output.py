"""The operator CLI's output: rich on a terminal (tables, fill bars, colour, progress), plain
text piped or under NO_COLOR (byte for byte what scripts read), and `usage --prometheus` parsed
by prometheus_client's own parser, against the session's real Consul."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import time
from typing import Any

import pytest
from ipam_da_consul.admin.errors import PROBLEMS, USAGE
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_admin import PROG, admin, clean_env, create
from tests.support.agent import ConsulAgent
from tests.support.plugin import executable
from tests.support.util_procs import drain_pty

ESC = "\x1b["


def terminal_env(consul: ConsulAgent, **extra: str) -> dict[str, str]:
    env = clean_env() | {"CONSUL_HTTP_ADDR": consul.url, "TERM": "xterm-256color"}
    # A pty has no size; rich then falls back to 80 columns. Wide enough for every table here.
    env["COLUMNS"] = "200"
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    return env | extra


def run_pty(
    consul: ConsulAgent, *args: str, tty: str = "stdout", **env: str
) -> tuple[int, str, str]:
    """Run with `tty` (stdout or stderr) on a pseudo-terminal and the other on a pipe: status,
    what the terminal got (its \\r\\n turned back into \\n), and the pipe's text."""
    main, secondary = pty.openpty()
    streams: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    streams[tty] = secondary
    try:
        p = subprocess.Popen([executable(PROG), *args], env=terminal_env(consul, **env), **streams)
    finally:
        os.close(secondary)
    try:
        got = drain_pty(main)
    finally:
        os.close(main)
    piped = p.stdout if tty == "stderr" else p.stderr
    other = piped.read().decode() if piped else ""
    return p.wait(30), got.decode(errors="replace").replace("\r\n", "\n"), other


def fill(consul: ConsulAgent, prefix: str, pool: str, subnet: str, count: int) -> None:
    for i in range(1, count + 1):
        consul.put(f"{prefix}{pool}/{subnet}.{i}", {"target": f"{pool}-c{i}"})


@pytest.fixture
def pools(consul: ConsulAgent) -> str:
    """Three pools of 20 addresses, 50%, 85% and 100% used, under a fresh prefix."""
    prefix = f"out-{os.getpid()}-{os.urandom(3).hex()}/"
    for pool, octet, used in (("calm", 80, 10), ("busy", 81, 17), ("full", 82, 20)):
        create(consul, pool, f"10.0.{octet}.0/24,10.0.{octet}.1-10.0.{octet}.20", prefix=prefix)
        fill(consul, prefix, pool, f"10.0.{octet}", used)
    return prefix


# -- the terminal ------------------------------------------------------------------------------
def test_usage_on_a_terminal_draws_coloured_fill_bars(consul, pools):
    rc, tty, err = run_pty(consul, "--prefix", pools, "usage")
    assert (rc, err) == (0, ""), tty
    lines = {line.split()[0]: line for line in tty.splitlines() if "10.0.8" in line}
    assert set(lines) == {"busy", "calm", "full"}, tty
    # 85% is yellow, 100% red, 50% green: the USED cell and the bar share the colour.
    for pool, colour, cells in (("calm", "32", 10), ("busy", "33", 17), ("full", "31", 20)):
        line = lines[pool]
        assert f"{ESC}{colour}m" in line, (pool, line)
        assert line.count("█") == cells and line.count("░") == 20 - cells, (pool, line)
    assert "FILL" in tty and "USED" in tty


def test_no_color_and_pipes_get_the_same_plain_table(consul, pools):
    piped = admin(consul, "--prefix", pools, "usage")
    assert piped.rc == 0 and "█" not in piped.stdout and ESC not in piped.stdout, piped
    assert piped.stdout.startswith("POOL  RANGE")
    for env in ({"NO_COLOR": "1"}, {"TERM": "dumb"}):
        rc, tty, _ = run_pty(consul, "--prefix", pools, "usage", **env)
        assert (rc, tty) == (0, piped.stdout), env
    # NO_COLOR set but empty does not count (no-color.org).
    rc, tty, _ = run_pty(consul, "--prefix", pools, "usage", NO_COLOR="")
    assert rc == 0 and "█" in tty


def test_without_rich_a_terminal_gets_the_plain_output(consul, pools, tmp_path):
    # rich is the optional `cli` extra (the single-file build leaves it out): shadow it with a
    # package that cannot be imported.
    (tmp_path / "rich").mkdir()
    (tmp_path / "rich" / "__init__.py").write_text("raise ImportError('no rich here')\n")
    piped = admin(consul, "--prefix", pools, "usage")
    rc, tty, err = run_pty(consul, "--prefix", pools, "usage", PYTHONPATH=str(tmp_path))
    assert (rc, tty, err) == (0, piped.stdout, ""), (tty, err)
    rc, tty, stdout = run_pty(
        consul, "--prefix", pools, "check", "busy", tty="stderr", PYTHONPATH=str(tmp_path)
    )
    assert (rc, stdout) == (0, "busy: ok, 17 allocation(s)\n")
    assert "checking busy 17/17" in tty and tty.endswith("\r\x1b[K"), repr(tty)


def test_tables_print_kv_text_literally(consul, pools):
    # Targets come from KV: rich markup in one must print as written, not as style.
    consul.put(f"{pools}calm/10.0.80.19", {"target": "[bold red]odd[/]", "host": "h[1]"})
    rc, tty, _ = run_pty(consul, "--prefix", pools, "allocations", "calm")
    assert rc == 0, tty
    assert "[bold red]odd[/]" in tty and "h[1]" in tty, tty
    rc, tty, _ = run_pty(consul, "--prefix", pools, "list")
    assert rc == 0 and "CAPACITY" in tty and "10.0.82.0/24" in tty, tty
    rc, tty, _ = run_pty(consul, "--prefix", pools, "who-has", "10.0.80.19")
    assert rc == 0 and "[bold red]odd[/]" in tty, tty


def test_check_is_coloured_on_a_terminal_with_the_same_words(consul, pools):
    consul.put(f"{pools}calm/junk", "x")
    rc, tty, _ = run_pty(consul, "--prefix", pools, "check")
    piped = admin(consul, "--prefix", pools, "check")
    assert rc == piped.rc == PROBLEMS, (tty, piped)
    assert f"{ESC}32mok" in tty and f"{ESC}31minvalid-key" in tty, tty
    plain = "".join(part.split("m", 1)[-1] for part in tty.split(ESC))
    assert plain == piped.stdout


def test_progress_on_a_terminal_is_rich_and_stdout_stays_plain(consul, pools):
    rc, tty, stdout = run_pty(consul, "--prefix", pools, "check", "busy", tty="stderr")
    assert (rc, stdout) == (0, "busy: ok, 17 allocation(s)\n")
    assert "checking busy" in tty and "17/17" in tty, tty
    # The cursor is given back and the display wiped before exit.
    assert f"{ESC}?25h" in tty and tty.endswith(f"{ESC}2K"), repr(tty[-40:])


# -- usage --prometheus ------------------------------------------------------------------------
def test_usage_prometheus_parses_and_counts(consul, pools):
    out = admin(consul, "--prefix", pools, "usage", "--prometheus")
    assert (out.rc, out.stderr) == (0, ""), out
    families = {f.name: f for f in text_string_to_metric_families(out.stdout)}
    assert set(families) == {
        "ipam_da_consul_pool_allocated",
        "ipam_da_consul_pool_capacity",
        "ipam_da_consul_pool_free",
        "ipam_da_consul_usage_timestamp_seconds",
    }
    [read_at] = families.pop("ipam_da_consul_usage_timestamp_seconds").samples
    assert read_at.labels == {"consul": consul.url, "prefix": pools}
    assert abs(read_at.value - time.time()) < 60
    got = {
        (name, s.labels["pool"]): s.value
        for name, f in families.items()
        for s in f.samples
    }
    expected = {"calm": 10, "busy": 17, "full": 20}
    for pool, used in expected.items():
        assert got["ipam_da_consul_pool_allocated", pool] == used
        assert got["ipam_da_consul_pool_capacity", pool] == 20
        assert got["ipam_da_consul_pool_free", pool] == 20 - used
    for f in families.values():
        assert f.type == "gauge" and f.documentation
        for s in f.samples:
            assert s.labels == {"consul": consul.url, "prefix": pools, "pool": s.labels["pool"]}
    # The same lines on a terminal: machine output is never decorated (only the time it was
    # read differs).
    rc, tty, _ = run_pty(consul, "--prefix", pools, "usage", "--prometheus")
    assert (rc, _undated(tty)) == (0, _undated(out.stdout))


def _undated(text: str) -> str:
    return re.sub(r"(?m)^(ipam_da_consul_usage_timestamp_seconds\{.*\}) \S+$", r"\1 T", text)


def test_usage_prometheus_with_warn_at_and_without_pools(consul, pools):
    out = admin(consul, "--prefix", pools, "usage", "full", "--prometheus", "--warn-at", "90")
    assert out.rc == PROBLEMS and "above --warn-at 90%" in out.stderr, out
    [allocated, *_] = text_string_to_metric_families(out.stdout)
    assert [s.value for s in allocated.samples] == [20]
    # No pool under the prefix: a valid, empty exposition, so the textfile stays readable.
    out = admin(consul, "--prefix", f"{pools}none/", "usage", "--prometheus")
    assert out.rc == 0, out
    assert [(f.name, len(f.samples)) for f in text_string_to_metric_families(out.stdout)] == [
        ("ipam_da_consul_pool_allocated", 0),
        ("ipam_da_consul_pool_capacity", 0),
        ("ipam_da_consul_pool_free", 0),
        ("ipam_da_consul_usage_timestamp_seconds", 1),
    ]
    bad = admin(consul, "usage", "--prometheus", "--json")
    assert bad.rc == USAGE and "not allowed with" in bad.stderr, bad


def test_an_80_column_terminal_never_gets_a_broken_address_or_header(consul):
    """Issue 22, finding 9: `usage` on 80 columns showed `10.177 / .0.0/2 / 4` and
    `ALLOCA / TED`. Through the installed CLI on a terminal of 80 columns: no line wider, and
    every address, range and header whole on one line (tests/unit/admin/test_output.py has
    the layouts)."""
    prefix = f"narrow-{os.getpid()}-{os.urandom(3).hex()}/"
    create(consul, "blue", "10.177.0.0/24", prefix=prefix)
    create(consul, "wide", "10.178.0.0/24,gw=10.178.0.1",
           "fd00:177:0:1234::/64,fd00:177:0:1234::10-fd00:177:0:1234::ffff,gw=fd00:177:0:1234::1",
           prefix=prefix)
    fill(consul, prefix, "blue", "10.177.0", 3)
    whole = ["10.177.0.0/24", "10.177.0.254", "fd00:177:0:1234::/64", "fd00:177:0:1234::ffff",
             "fd00:177:0:1234::1", "ALLOCATED", "CAPACITY", "SUBNETS"]
    seen = ""
    for command in ("usage", "list", "allocations blue"):
        rc, tty, _ = run_pty(consul, "--prefix", prefix, *command.split(), COLUMNS="80")
        assert rc == 0, tty
        plain = [line for line in strip_ansi(tty).splitlines() if line.strip()]
        assert all(len(line) <= 80 for line in plain), "\n".join(plain)
        seen += "\n".join(plain) + "\n"
    for word in whole:
        assert word in seen, (word, seen)


def strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
