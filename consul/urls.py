"""How a server URL is shown: in logs, error messages (the CNI error JSON that runtimes turn
into events), metrics labels and the admin CLI's output. A URL may carry a password
(`http://user:pw@host:8500`); the request still uses it as given (requests sends it as basic
auth), but it is never shown.

Standard library only, and nothing else in `consul/` imported: the settings rules and the client
both use it."""

from __future__ import annotations

HIDDEN = "***"


def shown_url(url: str) -> str:
    """`url` with its user-info replaced by `***`: `http://user:pw@host:8500` is shown as
    `http://***@host:8500`; a URL without user-info is shown as it is.

    Everything between the scheme and the last `@` counts as user-info, not only what a URL
    parser would call so: an unencoded `/`, `?` or `#` in a password makes the URL invalid, and
    it is exactly the invalid URL an error message quotes. The cost is that an `@` in a path or
    query also hides what precedes it; a Consul server URL has neither."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url  # `user:pw@host:8500`, as CONSUL_HTTP_ADDR may give it
    _, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}{HIDDEN}@{host}"
