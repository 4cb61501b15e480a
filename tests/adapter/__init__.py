"""The HTTP adapter onto uvicorn (api/adapter): the protocol, the stream lane, the connection guard."""
