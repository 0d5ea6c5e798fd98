"""The persona service layer: turns "a message for persona P in room R" into a reply.

directory (who the personas are), lifecycle (spawn, despawn), history (what a
persona sees), replies (delivery: typing, stream, edits, exactly once),
summaries (chapters folded in the background), limits (rates and budgets).
"""
