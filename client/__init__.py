"""A small Python client for darkroom's HTTP API. It needs only httpx."""

from client.sync import Client, DarkroomAPIError

__all__ = ["Client", "DarkroomAPIError"]
