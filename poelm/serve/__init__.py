"""`poelm serve`: an OpenAI-compatible server for a base and its specialists (the `serve` extras:
FastAPI and uvicorn). app.py builds and runs it; docs/serving.md maps the other modules and says why
each is as it is."""
