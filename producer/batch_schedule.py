"""Old import path of the rq job functions, kept so that rq jobs enqueued by spool 0.1 (which store the
function's dotted path in Redis) still run after an upgrade. New jobs name producer.batch.schedule."""
from producer.batch.schedule import run_batch_job, run_scheduled  # noqa: F401
