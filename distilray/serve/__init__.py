"""`distilray serve`: a checkpoint as a batched, autoscaling, hardened HTTP classifier on Ray Serve.

The layers, one module each: `predictor` (torch), `batching` (asyncio), `schema` (the HTTP
contract), `http` (FastAPI app, middlewares, auth), `deployments` (the Serve classes, Ray),
`app` (options, Serve config, `build_app`) and `lifecycle` (start, wait, stop).

Only the two import paths written into emitted Serve configs and k8s manifests are
re-exported here, from the Ray-free `app`, so importing this package imports no Ray.
"""

from distilray.serve.app import build_app, texts_in_flight_policy

__all__ = ["build_app", "texts_in_flight_policy"]
