"""Credentials: JWT verification against JWKS key sets."""
