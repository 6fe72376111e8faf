"""The Slipstream worker: pulls jobs from Redis when it has token capacity, runs an engine."""
