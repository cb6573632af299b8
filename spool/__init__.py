"""spool: a queue-fed LLM batch inference worker, as one package.

Its parts (docs/ARCHITECTURE.md): spool.protocol (the wire contract), spool.engine (generation) over
spool.kernels (Triton kernels), spool.worker (the Redis consumer around the engine), spool.producer (the client
library and batches), spool.gateway (`spool serve`), spool.cli (the `spool` command) and spool.testing (test
scaffolding). This module imports none of them: `import spool.producer` loads no torch.
"""
