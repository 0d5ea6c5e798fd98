"""Private homeserver and human client for the demo and the tests."""
