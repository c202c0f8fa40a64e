"""`citer serve`: a trained router pair behind OpenAI's chat and completions API on Ray Serve.

- `protocol`: OpenAI's request and response shapes, and the checks that refuse a malformed request;
- `scheduler`: the engine's step loop on a replica (continuous batching, a bounded queue, cancellation);
- `service`: requests in text to engine requests and back (prompts, routing, stop strings, usage);
- `app`: the Ray Serve deployment, its FastAPI routes, the app builder and `citer serve` itself.
"""
