"""Slipstream's wire contract: what the gateway and the workers agree on in Redis.

Nothing here imports ``gateway`` or ``worker``; both import this package.
"""

PROTOCOL_VERSION = 1
