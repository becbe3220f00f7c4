"""Address allocation from pools: range arithmetic, pools, and the KV storage contract.

Knows nothing of HTTP or CNI: storage goes through the `KV` protocol in `store`.
"""
