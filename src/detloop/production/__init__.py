"""The production side: serving (request checks, hot swap, batching), failure reports, the
prediction log, monitoring and the A/B set."""
