"""Test and benchmark tooling, used from the checkout: fake API server, control plane, kubelet stand-in."""
