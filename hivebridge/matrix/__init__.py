"""Matrix side: intake of appservice transactions, per-room ordering, sending."""
