"""spool producer library: enqueue jobs, wait for results and tail token streams over Redis."""
from spool.producer.aio import AsyncClient
from spool.producer.client import Client
from spool.producer.errors import RedisFullError
from spool.protocol.keys import Keys
from spool.protocol import PROTOCOL_VERSION, Job, JobError, Limits, Result, TokenEvent

__all__ = ["AsyncClient", "Client", "Job", "JobError", "Keys", "Limits", "PROTOCOL_VERSION", "RedisFullError", "Result", "TokenEvent"]
