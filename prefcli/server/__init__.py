"""`prefcli serve`: an OpenAI-compatible HTTP server over prefcli's own generation engine.

engine.py  continuous batching: one background decode loop per model (no HTTP here)
app.py     the HTTP layer (FastAPI): request checks, chat template, SSE, errors in OpenAI's shape
"""
