"""Placeholder replaced by the admin CLI implementation."""


def main() -> None:
    raise SystemExit("ipam-da-consul-admin: not implemented yet")
