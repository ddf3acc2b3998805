"""The applications: the command line, the demo, the chat."""
