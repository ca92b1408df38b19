"""Host-controlled egress for sandboxes: namespace plumbing, DNS, policy and the proxy.

See docs/network.md for the design contract.
"""
