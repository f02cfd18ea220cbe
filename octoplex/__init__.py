"""
Octoplex: an HTTP request multiplexer.

A caller POSTs one JSON batch of HTTP requests; Octoplex sends them all at
once over a shared keep-alive pool and answers with every outcome, in
order, by the batch's deadline.

Follow a batch through the modules: :mod:`octoplex.web` (the HTTP front),
:mod:`octoplex.wire` (the JSON format), :mod:`octoplex.multiplexer` (the
fan-out and deadline), :mod:`octoplex.client` (the shared treq client),
:mod:`octoplex.pool` (the connection pool's policy), :mod:`octoplex.endpoints`
(how a connection is dialled), :mod:`octoplex.dns` (name resolution),
:mod:`octoplex.tls` (TLS both ends), :mod:`octoplex.body` (reading a
response) and :mod:`octoplex.errors` (explaining a failure).
:mod:`octoplex.tap` wires them into ``twistd octoplex``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
