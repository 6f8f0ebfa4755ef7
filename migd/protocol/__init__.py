"""The wire protocol, free of I/O: frames, handshake, the session state machine."""
