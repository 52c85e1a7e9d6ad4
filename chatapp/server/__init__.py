"""`chatapp serve`: an OpenAI-compatible HTTP server on the engine, with KV cache slots shared across requests.

openai_schema.py reads requests and writes responses (plain Python); slots.py owns the model, its cache slots
and the one engine thread; app.py is the FastAPI app. FastAPI and uvicorn come from the `serve` extra and
are imported only here, when the server starts.
"""
