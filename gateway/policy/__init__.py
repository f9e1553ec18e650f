"""Policies (Envoy Gateway vocabulary): loading, attachment, and pure decision functions."""
