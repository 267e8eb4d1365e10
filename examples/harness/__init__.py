"""The experiment harness behind ``examples/train.py``, one module per concern.

* :mod:`harness.data`: the datasets (mnist1d, digits, cifar10);
* :mod:`harness.image_folder`: decoding and caching image-folder datasets;
* :mod:`harness.augment`: random crop and flip, in JAX;
* :mod:`harness.models`: the networks and their normalization layers;
* :mod:`harness.training`: the compiled training loop and its timing;
* :mod:`harness.results`: the results csv and the markdown summary;
* :mod:`harness.plots`: the curves.

Import it with ``examples/`` on ``sys.path`` (``train.py`` is there).
"""
