"""spool's HTTP face: an OpenAI-compatible API (chat, completions, streaming, files, batches, models) in front of
the Redis queue. Imports protocol and producer only (never engine, worker or torch); see docs/SERVER.md.

    from spool.gateway.app import create_app          # a FastAPI app; `spool serve` runs it under uvicorn
"""
