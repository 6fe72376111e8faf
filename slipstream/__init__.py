"""The ``slipstream`` command: composes the gateway, the worker and the operator tools."""
