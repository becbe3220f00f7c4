from tests.support.plugin import run_plugin


def test_add_then_del(consul, make_pool, conf_for):
    pool = make_pool()
    out = run_plugin("ADD", conf_for(pool), container="smoke")
    assert out.rc == 0, out
    assert out.json["ips"] == [{"address": "10.0.21.100/23", "gateway": "10.0.20.1"}]
    assert consul.allocations(pool) == {"10.0.21.100": "smoke"}
    out = run_plugin("DEL", conf_for(pool), container="smoke")
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == {}
