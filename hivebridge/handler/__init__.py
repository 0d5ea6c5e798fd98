"""The Matrix event handler: every routed event, in room order, to the floors below.

room_events (per-room ordered work, resume after a crash, handled marks),
membership (invites, leaving rooms without humans), messages (commands for the
bot; dispatch, loop guard and limits per persona; then a reply job).
"""
