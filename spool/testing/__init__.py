"""Test and benchmark scaffolding (tiny models, private redis-servers, worker chaos, hostile jobs); not shipped code."""
