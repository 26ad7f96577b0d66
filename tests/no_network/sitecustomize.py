"""Loaded by tests that put this folder on PYTHONPATH: any attempt to open a network connection fails loudly
(unix sockets stay allowed), so a run that passes with it never touched the network."""
import socket

_connect = socket.socket.connect


def _refuse(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError(f"network blocked by tests/no_network: connect to {address}")
    return _connect(self, address)


socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = lambda address, *args, **kwargs: _refuse(socket.socket(), address)
