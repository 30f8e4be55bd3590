"""``denseseg serve``: an HTTP API and a web page over a :class:`~denseseg.Segmenter`.

The optional extra ``denseseg[serve]`` (FastAPI, uvicorn, python-multipart, prometheus_client)
provides it. The modules, bottom up:

- :mod:`~denseseg.serve.settings`: :class:`ServeSettings`, the server's limits and options.
- :mod:`~denseseg.serve.encode`: responses (palette label PNG, overlay PNG, JSON with COCO RLE).
- :mod:`~denseseg.serve.batcher`: one inference thread, a bounded queue, dynamic batching.
- :mod:`denseseg.data.sample_scenes` (not here: the command line writes them too): the
  sample images of the web page, generated.
- :mod:`~denseseg.serve.app`: :func:`create_app`, the FastAPI application.
- :mod:`~denseseg.serve.run`: loading the model and running uvicorn (``denseseg serve``).

Only :mod:`settings` and :mod:`encode` import without the extra.
"""

from __future__ import annotations

from denseseg.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
