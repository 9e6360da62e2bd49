"""The top layer: the ``distill`` command line. Commands parse options and print; the work is in ``distill.recipes``.
Nothing below imports it."""
