"""The error a user fixes in their configuration, shown by ``train.py`` as one message."""

from __future__ import annotations


class ConfigError(ValueError):
    """An option, a combination of options, or the data they point at cannot work.

    The message names the option (``--model.patch_size``, ``--data.root``, ...) and says what
    to set instead.
    """
