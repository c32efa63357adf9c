"""Sockets and addresses: the only I/O the proxier drives."""
