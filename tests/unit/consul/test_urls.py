"""How a server URL is shown (consul/urls.py): never its user-info, whatever it holds."""

from __future__ import annotations

import pytest
from ipam_da_consul.consul.urls import shown_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("https://consul.example:8501/", "https://consul.example:8501/"),
        ("http://[::1]:8500", "http://[::1]:8500"),
        ("http://user:pw@host:8500", "http://***@host:8500"),
        ("https://user@host:8501", "https://***@host:8501"),
        ("http://:pw@host", "http://***@host"),
        ("http://user:p@ss@host:8500", "http://***@host:8500"),
        ("http://user:pw@[::1]:8500/consul", "http://***@[::1]:8500/consul"),
        # Invalid URLs an error message quotes: a password with an unencoded / ? # or space.
        ("http://user:pa/ss@host:8500", "http://***@host:8500"),
        ("http://user:pa?ss@host:8500", "http://***@host:8500"),
        ("http://user:p#ss@host:8500", "http://***@host:8500"),
        ("http://user:12/34@host", "http://***@host"),
        ("http://user:p ss@host", "http://***@host"),
        # Without a scheme, as CONSUL_HTTP_ADDR may give it.
        ("user:pw@host:8500", "***@host:8500"),
        ("host:8500", "host:8500"),
        ("", ""),
    ],
)
def test_user_info_is_never_shown(url: str, shown: str) -> None:
    assert shown_url(url) == shown


@pytest.mark.parametrize("secret", ["pw", "p@ss", "pa/ss", "pa?ss", "p#ss"])
def test_no_password_survives(secret: str) -> None:
    for url in (f"http://user:{secret}@h:1", f"https://u:{secret}@h/x", f"u:{secret}@h"):
        assert secret not in shown_url(url)
