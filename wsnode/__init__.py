"""The push node: a Tornado WebSocket server that delivers what arrives in its own queue.

Exceptions: :class:`wsnode.protocol.ProtocolError` (a client frame the node cannot accept; carries
its close code), :class:`wsnode.auth.AuthRejected` and :class:`wsnode.auth.AuthUnavailable`
(both :class:`wsnode.auth.AuthError`).
"""
