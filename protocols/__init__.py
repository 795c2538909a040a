"""Secure layer on CrypTen (installed as ``mpckv.protocols``). Not implemented yet: see the README."""
