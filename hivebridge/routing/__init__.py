"""Pure routing rules: who answers (dispatch), loop brakes (loop_guard), rate limits.

No I/O here; callers convert events into plain views.
"""
