"""`poelm serve`: an OpenAI-compatible server for a base and its specialists (the `serve` extras:
FastAPI and uvicorn). models.py loads the models (the base held once), scheduler.py is the batching
worker, protocol.py the API shapes, app.py the routes and `serve`."""
