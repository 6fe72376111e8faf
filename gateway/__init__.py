"""The Slipstream gateway: OpenAI-compatible HTTP in front of Redis queues."""
