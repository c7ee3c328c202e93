"""The data the loop keeps: formats and manifests, the anchor, the inbox, human review into the
append-only pool, the triggers, the replay mix and the demo data."""
