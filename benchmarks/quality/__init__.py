"""Retrieval-quality benchmarks built from installable data, scored by ``visualsearch eval``.

Build and score everything (``make bench-quality``), or one benchmark::

    python -m benchmarks.quality.build NAME --out DIR [--seed S] [--limit N]
    visualsearch eval DIR/NAME/queries.csv --manifest DIR/NAME/catalogue.csv --data-dir DIR/NAME/data --json

Each benchmark is a folder ``DIR/NAME/`` holding
- ``catalogue.csv``: an ordinary manifest (``sku,image,title,category``; rows sharing a
  sku are views of one product), images under ``images/``;
- ``queries.csv``: ``image`` (under ``queries/``, or a catalogue image),
  ``expected_sku`` (``|``-separated relevant skus; empty: judged by category only),
  ``expected_category``, and ``exclude_image`` (a catalogue image that is the query
  itself and must not count as a match);
- ``CREDITS.md``: where the pictures come from, their licence and what was changed.
All paths are relative to the folder. A build removes what an earlier build wrote
there, except ``data/`` (the eval's data directory). The same seed gives the same bytes.

- ``multiview``: catalogue the 45 demo images (31 products); queries the 23 views of
  the 9 multi-view products, each excluding itself. Saleor demo (CC BY 4.0), ``data/demo``.
- ``shopper``: catalogue the demo plus 1,000 product-like distractors (``--limit``:
  how many), colourised Fashion-MNIST items; queries 3 hard shopper photos of each
  demo image (135: product cut out, cropped, warped, pasted small into clutter over
  scikit-image photos or noise, colour cast, blur, JPEG 18-35). Saleor demo (CC BY 4.0),
  Fashion-MNIST (MIT), scikit-image photos (public domain / CC0).
- ``fashion``: catalogue the 60,000 Fashion-MNIST training images, queries the 10,000
  test images judged by category (``--limit N``: N and N / 6, class-balanced).
  Fashion-MNIST (MIT).
- ``crossstyle``: catalogue the Papirus drawings of the apps/devices/places icon names
  that Breeze also draws, queries the Breeze drawings (``--query-theme Adwaita`` for
  another style; ``--limit``: how many names). Papirus (GPL-3.0), Breeze (LGPL-3.0+).

The Debian packages (``apt-get install -y dataset-fashion-mnist papirus-icon-theme
breeze-icon-theme librsvg2-bin``) are needed to build, not to run the test suite.
"""
