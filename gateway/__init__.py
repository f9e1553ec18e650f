"""Sandgate: edge gateway and reverse proxy with policy enforcement for AI-agent platforms."""

__version__ = "0.1.0"
