"""The operator CLI's range specs."""

from __future__ import annotations

import pytest
from ipam_da_consul.admin.rangespec import parse_spec


def test_range_spec_parsing():
    assert parse_spec(" 10.0.20.0/23 , 10.0.21.100-10.0.21.150 , GW=10.0.20.1 ") == {
        "subnet": "10.0.20.0/23",
        "rangeStart": "10.0.21.100",
        "rangeEnd": "10.0.21.150",
        "gateway": "10.0.20.1",
    }
    assert parse_spec("fd00::/64,end=fd00::ff") == {"subnet": "fd00::/64", "rangeEnd": "fd00::ff"}
    for bad in ("", ",gw=10.0.0.1", "10.0.0.0/24,gw=", "10.0.0.0/24,x", "10.0.0.0/24,1-2,3-4"):
        with pytest.raises(Exception, match="--range"):
            parse_spec(bad)
