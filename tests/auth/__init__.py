"""Access control (api/auth): tokens, selectors, the verifier, in process and against real nodes and Chromium."""
