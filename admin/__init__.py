"""Operator CLI for pools in Consul KV (ipam-da-consul-admin)."""
