"""`prefcli serve`: an OpenAI-compatible HTTP server over prefcli's own generation engine.

engine.py   continuous batching: one background decode loop per model (torch only, no HTTP)
schemas.py  the served models, OpenAI-shaped errors, the checks of a request body
streams.py  a request in flight: its engine jobs, their tokens as text cut at stop strings
app.py      the HTTP layer (FastAPI): endpoints, SSE, API key, one log line per request
"""
