"""Bot commands: declarative specs, a parser that never raises on chat input, and one
module per group of handlers."""
