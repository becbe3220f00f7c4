"""ipam-da-consul: a CNI IPAM plugin allocating addresses from pools in Consul KV."""

__version__ = "0.1.0"
