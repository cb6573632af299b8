"""spool producer library: enqueue jobs, wait for results and tail token streams over Redis."""
from producer.aio import AsyncClient
from producer.client import Client
from producer.errors import RedisFullError
from protocol.keys import Keys
from protocol import PROTOCOL_VERSION, Job, JobError, Limits, Result, TokenEvent

__all__ = ["AsyncClient", "Client", "Job", "JobError", "Keys", "Limits", "PROTOCOL_VERSION", "RedisFullError", "Result", "TokenEvent"]
